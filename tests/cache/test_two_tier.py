"""The two-tier KV cache (`cache.two_tier`) against references computed here.

Oracles are never the library's own functions: which tokens the cache must hold follows from a
layout model written here (sinks, a tail that sheds whole blocks when full, a store of whole blocks
whose oldest are evicted); quantized tokens are compared with the NumPy KIVI of `test_kv_quant`;
attention with a float64 NumPy softmax. The library's block tables are used only to *locate* held
slots where a test must look inside the arrays.

Tiny shapes throughout (2 KV heads, head_dim 8, blocks of 4, a tail of 8, 2 sinks, capacity 26):
each distinct config compiles its own functions, so the tests share a handful of configs.
"""

from __future__ import annotations

import functools
import math
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_kv_quant import dequant_np, kivi_np, kivi_ties

from ruvllm_jax.cache import two_tier as tt
from ruvllm_jax.cache.base import KVPart, PagedKVPart, QuantizedKVPart
from ruvllm_jax.errors import KvCacheError
from ruvllm_jax.types import KvCacheConfig, Precision

P = Precision
KVH, D, BS, TAIL, SINKS, MAX = 2, 8, 4, 8, 2, 26
SCALE = 1.0 / math.sqrt(D)
BITS = {P.Q8: 8, P.Q4: 4}
F16 = 2  # bytes of a float16 scale / zero


def config(store=P.Q4, tail=P.FP32, *, max_tokens=MAX, sinks=SINKS, eviction=True, **kw) -> KvCacheConfig:
    return KvCacheConfig(tail_length=TAIL, tail_precision=tail, store_precision=store, max_tokens=max_tokens,
                         num_kv_heads=KVH, head_dim=D, migration_batch=BS, num_sink_tokens=sinks, eviction=eviction,
                         **kw)


# --------------------------------------------------------------------------------------------------
# The layout model (independent of `_Counts`).


def store_blocks_of(c: KvCacheConfig) -> int:
    return -(-(c.max_tokens - c.num_sink_tokens - c.tail_length) // c.migration_batch)


def capacity_of(c: KvCacheConfig) -> int:
    return c.num_sink_tokens + c.tail_length + store_blocks_of(c) * c.migration_batch


def layout(n: int, c: KvCacheConfig) -> dict:
    """Token counts after n appends: the tail fills to tail_length, then sheds its oldest block each
    time a token arrives with it full; the store keeps the newest store_blocks blocks."""
    bs, sinks = c.migration_batch, min(n, c.num_sink_tokens)
    region = n - sinks
    tail = region if region <= c.tail_length else c.tail_length - bs + (region - c.tail_length - 1) % bs + 1
    migrated = region - tail
    assert migrated % bs == 0
    store = min(migrated, store_blocks_of(c) * bs)
    return dict(sinks=sinks, tail=tail, store=store, evicted=migrated - store, migrated_blocks=migrated // bs,
                oldest=(migrated - store) // bs, total=sinks + store + tail)


def held_tokens(n: int, c: KvCacheConfig) -> np.ndarray:
    """Indices of the tokens held after n appends, oldest first: the sinks, then the newest."""
    lay = layout(n, c)
    return np.concatenate([np.arange(lay["sinks"]), np.arange(lay["sinks"] + lay["evicted"], n)]).astype(int)


def expected_kv(k: np.ndarray, v: np.ndarray, c: KvCacheConfig, block_precision=None):
    """What get_all_kv must return for the appended tokens k, v [n, KVH, D]: sinks and tail rounded to
    the tail dtype, store blocks the NumPy KIVI of those tail-precision values (block j in
    `block_precision(j)`, default the config's store precision), dequantized in float64.

    -> (keys, values, key tolerance, value tolerance): 1e-6 (float32 dequantization), plus one step
    s where the code's quotient is a tie (`kivi_ties`: a compiled x * (1/s) may round it either
    way), plus the difference to the reciprocal-quotient scale where that is another float16."""
    n = k.shape[0]
    lay = layout(n, c)
    tail_dtype = {P.FP32: np.float32, P.FP16: np.float16, P.BF16: jnp.bfloat16}[c.tail_precision]
    kt = np.asarray(jnp.asarray(k).astype(tail_dtype), np.float64)
    vt = np.asarray(jnp.asarray(v).astype(tail_dtype), np.float64)
    ke, ve = kt.copy(), vt.copy()
    ktol, vtol = np.full(kt.shape, 1e-6), np.full(vt.shape, 1e-6)
    for j in range(lay["oldest"], lay["migrated_blocks"]):
        prec = c.store_precision if block_precision is None else block_precision(j)
        rows = slice(lay["sinks"] + j * BS, lay["sinks"] + (j + 1) * BS)
        kb, vb = kt[rows].transpose(1, 0, 2).astype(np.float32), vt[rows].transpose(1, 0, 2).astype(np.float32)
        if prec in BITS:
            bits = BITS[prec]
            for x, axis, tol in ((kb, -2, ktol), (vb, -1, vtol)):
                codes, s, z = kivi_np(x, bits, axis)
                deq = dequant_np(codes, s, z, axis)
                # the other f32 quotient for the scale (`kivi_np`): where it gives another float16,
                # accept either dequantization
                other = dequant_np(*kivi_np(x, bits, axis, reciprocal=True), axis)
                ties = kivi_ties(x, bits, axis) * np.expand_dims(np.asarray(s, np.float64), axis)
                tol[rows] += (np.abs(other - deq) + ties).transpose(1, 0, 2)
                if axis == -2:
                    kb = deq
                else:
                    vb = deq
        else:
            dt = {P.FP32: np.float32, P.FP16: np.float16, P.BF16: jnp.bfloat16}[prec]
            kb, vb = (np.asarray(jnp.asarray(x).astype(dt), np.float64) for x in (kb, vb))
        ke[rows], ve[rows] = kb.transpose(1, 0, 2), vb.transpose(1, 0, 2)
    idx = held_tokens(n, c)
    return ke[idx], ve[idx], ktol[idx], vtol[idx]


def assert_held_kv(got_k, got_v, expected, msg=""):
    """get_all_kv's keys, values against `expected_kv`, element by element within its tolerances."""
    ek, ev, ktol, vtol = expected
    for name, got, e, tol in (("keys", got_k, ek, ktol), ("values", got_v, ev, vtol)):
        got = np.asarray(got, np.float64)
        assert got.shape == e.shape, (name, got.shape, e.shape, msg)
        bad = np.argwhere(np.abs(got - e) > tol)
        assert not len(bad), (f"{name} {msg}: {len(bad)} of {e.size} differ from the NumPy KIVI, first at "
                              f"{tuple(bad[0])}: {got[tuple(bad[0])]} vs {e[tuple(bad[0])]}")


def attention_np(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float) -> np.ndarray:
    """float64 softmax attention of q [H, D] over k, v [T, KVH, D]; head h reads KV head h // (H / KVH)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    h, kvh = q.shape[0], k.shape[1]
    out = np.zeros_like(q)
    for i in range(h):
        g = i // (h // kvh)
        logits = scale * k[:, g] @ q[i]
        p = np.exp(logits - logits.max())
        out[i] = (p / p.sum()) @ v[:, g]
    return out


def tokens(n: int, seed: int, scale: float = 1.0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, KVH, D)).astype(np.float32) * scale,
            rng.standard_normal((n, KVH, D)).astype(np.float32) * scale)


def coded_tokens(n: int):
    """Keys whose every entry names its token: k[t, h, d] = 64 t + 8 h + d + 1 (exact in float32)."""
    t = np.arange(n)[:, None, None] * 64 + np.arange(KVH)[None, :, None] * 8 + np.arange(D)[None, None, :] + 1
    return t.astype(np.float32), -t.astype(np.float32)


def append_chunks(cache, k, v, chunk=8):
    for i in range(0, k.shape[0], chunk):
        cache.append(k[i:i + chunk], v[i:i + chunk])


def snapshot(state) -> tuple:
    """Copies of every array of a state (a donated buffer may be reused later) and its structure."""
    return [np.array(x, copy=True) for x in jax.tree_util.tree_leaves(state)], jax.tree_util.tree_structure(state)


def assert_same_state(before, state):
    leaves, treedef = before
    assert jax.tree_util.tree_structure(state) == treedef
    now = jax.tree_util.tree_leaves(state)
    assert len(now) == len(leaves)
    for a, b in zip(leaves, now, strict=True):
        b = np.asarray(b)
        assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def store_block_bytes(prec: Precision) -> int:
    """Bytes of one stored block of one sequence, from the KIVI layout: codes of keys and values,
    float16 key scales per channel and value scales per token, zero points too for Q4."""
    if prec not in BITS:
        return 2 * KVH * BS * D * np.dtype({P.FP32: np.float32, P.FP16: np.float16, P.BF16: np.float16}[prec]).itemsize
    bits = BITS[prec]
    codes = 2 * KVH * BS * D * bits // 8
    per = 2 if bits == 4 else 1  # scale (+ zero)
    return codes + per * KVH * D * F16 + per * KVH * BS * F16


# --------------------------------------------------------------------------------------------------
# 1. Bytes: int4 codes really take half a byte, stats count the arrays.


@pytest.mark.parametrize("store", [P.Q4, P.Q8, P.FP32])
def test_store_arrays_and_stats_bytes(store):
    c = config(store, P.FP32)
    cache = tt.TwoTierKvCache(c)
    slots = store_blocks_of(c) + 1
    seg = cache.state.tiers.stores[0]
    if store is P.Q4:
        for x in (seg.k, seg.v):
            chex.assert_shape(x, (KVH, slots, BS, D // 2))
            chex.assert_type(x, jnp.uint8)
            assert x.nbytes == KVH * slots * BS * D // 2
        for x in (seg.k_scale, seg.k_zero):
            chex.assert_shape(x, (KVH, slots, D))
        for x in (seg.v_scale, seg.v_zero):
            chex.assert_shape(x, (KVH, slots, BS))
        chex.assert_type([seg.k_scale, seg.k_zero, seg.v_scale, seg.v_zero], jnp.float16)
    elif store is P.Q8:
        chex.assert_shape([seg.k, seg.v], (KVH, slots, BS, D))
        chex.assert_type([seg.k, seg.v], jnp.int8)
        assert seg.k.nbytes == KVH * slots * BS * D
        chex.assert_shape(seg.k_scale, (KVH, slots, D))
        chex.assert_shape(seg.v_scale, (KVH, slots, BS))
        assert seg.k_zero is None and seg.v_zero is None
    else:
        chex.assert_shape([seg.k, seg.v], (KVH, slots, BS, D))
        chex.assert_type([seg.k, seg.v], jnp.float32)
        assert seg.k_scale is None and seg.v_scale is None
    tiers = cache.state.tiers
    sink_part, store_part, tail_part = tt.parts(cache.state)  # what attention reads
    assert isinstance(sink_part, KVPart) and isinstance(tail_part, PagedKVPart)
    if store in BITS:
        assert isinstance(store_part, QuantizedKVPart) and store_part.bits == BITS[store]
    else:
        assert isinstance(store_part, PagedKVPart) and store_part.k_scales is None
    chex.assert_shape([tiers.sink_k, tiers.sink_v], (1, KVH, SINKS, D))
    chex.assert_shape([tiers.tail_k, tiers.tail_v], (KVH, TAIL // BS, BS, D))
    chex.assert_type([tiers.sink_k, tiers.tail_k], jnp.float32)

    k, v = tokens(40, seed=1)
    appended = 0
    for n in (0, 1, 2, 10, 11, 17, 25, 26, 27, 33, 34, 35, 40):  # chunks of 1 and 5 to 8 tokens
        if n > appended:
            cache.append(k[appended:n], v[appended:n])
            appended = n
        s, lay = cache.stats(), layout(n, c)
        token_bytes = 2 * KVH * D * 4  # keys and values of one token in the FP32 tail
        assert (s.total_tokens, s.sink_tokens, s.tail_tokens, s.store_tokens, s.evicted_tokens) == (
            lay["total"], lay["sinks"], lay["tail"], lay["store"], lay["evicted"]), n
        assert s.sink_bytes == lay["sinks"] * token_bytes
        assert s.tail_bytes == lay["tail"] * token_bytes
        assert s.store_bytes == lay["store"] // BS * store_block_bytes(store)
        held = s.sink_bytes + s.tail_bytes + s.store_bytes
        fp16 = lay["total"] * 2 * KVH * D * 2
        assert s.compression_ratio == pytest.approx(fp16 / held if held else 1.0)
        if lay["store"]:
            assert s.store_compression_ratio == pytest.approx(lay["store"] * 2 * KVH * D * 2 / s.store_bytes)
        # allocated: every array of the state, whatever it holds, the int32 bookkeeping included (the
        # length and each segment's [start, end) ids: 12 bytes for one segment, batch 1).
        leaves = jax.tree_util.tree_leaves(cache.state)
        bookkeeping = [x for x in leaves if x.dtype == jnp.int32]
        assert len(bookkeeping) == 3 and sum(x.nbytes for x in bookkeeping) == 12
        assert s.allocated_bytes == sum(x.nbytes for x in leaves)
        assert len(cache) == lay["total"]
    if store is P.Q4:  # the codes of a block are a quarter of its FP16 bytes (scales come on top)
        assert (seg.k.nbytes + seg.v.nbytes) * 4 == 2 * KVH * slots * BS * D * 2


# --------------------------------------------------------------------------------------------------
# 3. Quantize once: a stored block's codes never change.


def held_store_blocks(state) -> dict:
    """{block id: (codes and scales of that block)} for every held block of every store segment,
    located through the library's block tables (slot = table[i] for the i-th held block)."""
    lay = layout(int(state.length), state.spec.config)
    host = jax.device_get(state.tiers)
    found, block_id = {}, lay["oldest"]
    store_parts = tt.parts(state)[1 if SINKS else 0:-1]
    assert len(store_parts) == len(state.tiers.stores)
    for part, seg in zip(store_parts, host.stores, strict=True):
        table, held = np.asarray(part.block_tables[0]), int(part.lengths[0]) // BS
        for i in range(held):
            found[block_id] = [np.array(x[:, table[i]]) for x in seg.arrays()]
            block_id += 1
    assert block_id == lay["migrated_blocks"], (block_id, lay)
    return found


@pytest.mark.parametrize("store", [P.Q4, P.Q8])
def test_stored_blocks_are_quantized_once(store):
    cache = tt.TwoTierKvCache(config(store))
    k, v = tokens(MAX, seed=3)
    append_chunks(cache, k[:18], v[:18])
    first = held_store_blocks(cache.state)
    assert sorted(first) == [0, 1]
    for t in range(18, MAX):  # one by one up to the capacity: every step re-stages the tail's oldest block
        cache.append(k[t:t + 1], v[t:t + 1])
        later = held_store_blocks(cache.state)
        for j, arrays in first.items():
            for a, b in zip(arrays, later[j], strict=True):
                assert a.tobytes() == b.tobytes(), f"block {j} rewritten at token {t}"
    assert sorted(later) == [0, 1, 2, 3]


# --------------------------------------------------------------------------------------------------
# 4. Eviction keeps the sinks and the newest tokens, by whole blocks, and nothing before capacity.


EXACT = config(P.FP32, P.FP32)


def test_capacity_is_max_tokens_when_aligned_and_rounds_up_to_blocks():
    assert tt.TwoTierSpec.from_config(EXACT).capacity == MAX == capacity_of(EXACT)
    odd = config(max_tokens=MAX - 3)
    assert tt.TwoTierSpec.from_config(odd).capacity == capacity_of(odd) == MAX


def all_kv(state):
    """get_all_kv's held rows, sliced on the host (the facade's slice compiles once per count)."""
    k, v, count = jax.device_get(tt.get_all_kv(state))
    chex.assert_shape([k, v], (capacity_of(state.spec.config) + BS, KVH, D))
    assert not np.any(k[int(count):]) and not np.any(v[int(count):])  # rows past count are zero
    return k[:int(count)], v[:int(count)]


@settings(max_examples=12, deadline=None)
@given(chunks=st.lists(st.integers(1, 8), min_size=1, max_size=9))
def test_eviction_keeps_sinks_and_newest_tokens(chunks):
    cache = tt.TwoTierKvCache(EXACT)
    k, v = coded_tokens(sum(chunks))
    n = 0
    for size in chunks:
        cache.append(k[n:n + size], v[n:n + size])
        n += size
        got_k, got_v = all_kv(cache.state)
        idx = held_tokens(n, EXACT)
        chex.assert_shape([got_k, got_v], (len(idx), KVH, D))
        np.testing.assert_array_equal(got_k, k[idx], err_msg=f"after {n} tokens")
        np.testing.assert_array_equal(got_v, v[idx])
        if n <= capacity_of(EXACT):
            assert len(idx) == n  # nothing lost before the capacity
        else:  # evicted by whole blocks, the fewest that fit
            evicted = n - len(idx)
            assert evicted % BS == 0 and n - evicted <= capacity_of(EXACT) < n - evicted + BS
        assert cache.stats().evicted_tokens == n - len(idx)


@pytest.mark.parametrize("c", [EXACT, config(P.FP32, P.FP32, max_tokens=MAX - 3), config(P.FP32, P.FP32, sinks=0)],
                         ids=["aligned", "max_tokens-not-whole-blocks", "no-sinks"])
def test_eviction_by_one_token_steps_over_many_lengths(c):
    cache = tt.TwoTierKvCache(c)
    k, v = coded_tokens(45)
    for n in range(1, 46):
        cache.append(k[n - 1:n], v[n - 1:n])
        got_k, got_v = all_kv(cache.state)
        idx = held_tokens(n, c)
        if n <= capacity_of(c):
            assert len(idx) == n
        np.testing.assert_array_equal(got_k, k[idx], err_msg=f"after {n} tokens")
        np.testing.assert_array_equal(got_v, v[idx])
    got_k, got_v = cache.get_all_kv()  # the facade's: the same rows
    np.testing.assert_array_equal(np.asarray(got_k), k[held_tokens(45, c)])


def test_no_eviction_raises_past_capacity_and_leaves_the_state():
    c = config(P.FP32, P.FP32, eviction=False)
    cache = tt.TwoTierKvCache(c)
    k, v = coded_tokens(30)
    append_chunks(cache, k[:24], v[:24])
    before = snapshot(cache.state)
    with pytest.raises(KvCacheError, match=r"appending 4 tokens to a cache holding 24 of its 26"):
        cache.append(k[24:28], v[24:28])  # would cross the capacity: nothing of it is appended
    assert_same_state(before, cache.state)
    assert int(cache.state.length) == 24
    cache.append(k[24:26], v[24:26])  # exactly to capacity is fine
    np.testing.assert_array_equal(np.asarray(cache.get_all_kv()[0]), k[:26])
    before = snapshot(cache.state)
    with pytest.raises(KvCacheError, match="eviction"):
        cache.append(k[26:27], v[26:27])
    assert_same_state(before, cache.state)
    assert cache.stats().total_tokens == 26 and cache.stats().evicted_tokens == 0


# --------------------------------------------------------------------------------------------------
# 5. Attention: exact for float tiers, within the quantization bound otherwise; the tiers merge exactly.


def quantization_bound(q, k, v, c, scale):
    """A rigorous bound on |attend - exact attention| per head from the KIVI step sizes (computed
    here from the true tokens): key errors move each logit by at most Delta = scale * sum_j |q_j|
    s_kj / 2, so every softmax weight by a factor in [e^-2Delta, e^2Delta] and the output by at most
    (e^2Delta - 1) max|v|; value errors add at most max s_v / 2. Sinks and the FP32 tail are exact."""
    n, lay = k.shape[0], layout(k.shape[0], c)
    idx = held_tokens(n, c)
    ek = np.zeros((n, KVH, D))
    ev = np.zeros((n, KVH, D))
    bits = BITS[c.store_precision]
    for j in range(lay["oldest"], lay["migrated_blocks"]):
        rows = slice(lay["sinks"] + j * BS, lay["sinks"] + (j + 1) * BS)
        _, sk, _ = kivi_np(k[rows].transpose(1, 0, 2), bits, -2)  # [KVH, D]
        _, sv, _ = kivi_np(v[rows].transpose(1, 0, 2), bits, -1)  # [KVH, BS]
        ek[rows] = np.asarray(sk, np.float64)[None] / 2
        ev[rows] = np.asarray(sv, np.float64).T[:, :, None] / 2
    h = q.shape[0]
    g = np.arange(h) // (h // KVH)
    delta = scale * np.max(np.einsum("hd,thd->th", np.abs(q), ek[idx][:, g, :]), axis=0)
    vmax = np.abs(v[idx]).max()
    return (np.exp(2 * delta) - 1) * vmax + ev[idx].max()


# Typical-case tolerances, as a fraction of max |v|, for Gaussian K, V, q (D 8, scale 1/sqrt(D)):
# Q8's step is amax / 127 ~ 2.5 / 127 ~ 0.02, so a value is off by <= 0.01 and a logit by about as
# much; softmax averages the value errors and turns logit errors into ~1% weight changes, so the
# output moves by ~1e-3 of max |v| (observed <= 1.9e-3 over 48 seeds and head counts): 2e-2 leaves
# 10x. Q4's step is range / 15 ~ 2 amax / 15, 17x Q8's; observed <= 2.2e-2: 0.2 leaves 9x. The
# rigorous `quantization_bound` is checked too (observed errors are ~5% of it).
TYPICAL_REL = {P.Q8: 2e-2, P.Q4: 0.2}


@pytest.mark.parametrize("store,heads", [(P.FP32, 4 * KVH), (P.Q8, 4 * KVH), (P.Q4, 2 * KVH), (P.Q4, 4 * KVH)])
def test_attend_against_float64_attention(store, heads):
    c = config(store, P.FP32)
    for n in (16, 31):  # before and after evictions (capacity 26)
        cache = tt.TwoTierKvCache(c)
        k, v = tokens(n, seed=n)
        append_chunks(cache, k, v)
        q = np.random.default_rng(n).standard_normal((heads, D)).astype(np.float32)
        out = np.asarray(cache.attend(q, SCALE), np.float64)
        chex.assert_shape(out, (heads, D))
        idx = held_tokens(n, c)
        exact = attention_np(q, k[idx], v[idx], SCALE)
        # The tiers merge exactly: attention over the very tokens the tiers hold (dequantized), float64.
        gk, gv = cache.get_all_kv()
        chex.assert_shape([gk, gv], (len(idx), KVH, D))
        np.testing.assert_allclose(out, attention_np(q, np.asarray(gk), np.asarray(gv), SCALE), atol=1e-5, rtol=1e-5)
        if store is P.FP32:
            np.testing.assert_allclose(out, exact, atol=1e-5, rtol=1e-5)
            continue
        err = np.abs(out - exact).max(-1)  # per head
        bound = quantization_bound(q, k, v, c, SCALE)
        assert np.all(err <= bound + 1e-5), (err, bound)
        assert err.max() <= TYPICAL_REL[store] * np.abs(v[idx]).max(), err.max()
        # ... and the held tokens are the NumPy KIVI of the appended ones.
        assert_held_kv(gk, gv, expected_kv(k, v, c), f"n={n}")


def test_attend_merges_fp16_tail_and_q8_store_exactly():  # GQA 2 * KVH for Q8 here
    c = config(P.Q8, P.FP16)
    cache = tt.TwoTierKvCache(c)
    k, v = tokens(29, seed=2)
    append_chunks(cache, k, v)
    q = np.random.default_rng(1).standard_normal((2 * KVH, D)).astype(np.float32)
    gk, gv = cache.get_all_kv()
    out = np.asarray(cache.attend(q, SCALE))
    np.testing.assert_allclose(out, attention_np(q, np.asarray(gk), np.asarray(gv), SCALE), atol=1e-5, rtol=1e-5)
    assert_held_kv(gk, gv, expected_kv(k, v, c))  # the tail rounded to float16, the store quantized from it


# --------------------------------------------------------------------------------------------------
# 6. One compilation per shape.


def test_append_compiles_once_per_shape_and_bucket():
    c = config(P.Q8, P.FP32)
    k, v = tokens(60, seed=4)
    before = tt.append._cache_size()
    state = tt.init(c)
    for i in range(12):  # n = 3: a shape no other test appends
        state = tt.append(state, jnp.asarray(k[3 * i:3 * i + 3]), jnp.asarray(v[3 * i:3 * i + 3]))
    assert tt.append._cache_size() - before == 1
    before = tt.append._cache_size()
    cache = tt.TwoTierKvCache(c)
    for n in (9, 12, 16, 13, 10, 16):  # one pow2 bucket (16, used by no other test): one compilation
        cache.append(k[:n], v[:n])
    tt.TwoTierKvCache(c).append(k[:11], v[:11])  # another facade of the same config: none
    assert tt.append._cache_size() - before == 1
    before = tt.attend._cache_size()
    for seed in range(5):  # H = 3 * KVH: no other test attends with 6 heads
        cache.attend(np.random.default_rng(seed).standard_normal((3 * KVH, D)), SCALE)
    assert tt.attend._cache_size() - before == 1


# --------------------------------------------------------------------------------------------------
# 7. Prefill (`write_prompt`, the `fill` path) equals token-by-token appends.


@functools.lru_cache(maxsize=None)
def token_step(spec: tt.TwoTierSpec):
    return jax.jit(lambda tiers, length, k, v: tt.append_token(tiers, length, k, v, spec))


@functools.lru_cache(maxsize=None)
def prompt_step():
    return jax.jit(lambda cache, k, v, lengths: cache.write_prompt(0, k, v, lengths))


@functools.lru_cache(maxsize=None)
def decode_step():
    return jax.jit(lambda cache, k, v, pos: cache.write(0, k, v, pos))


def held_content(tiers: tt.Tiers, n: int, b: int, spec: tt.TwoTierSpec) -> list[np.ndarray]:
    """Sequence b's held rows and blocks, located by the layout model (one store segment, ids from 0):
    sink rows, store block j at ring slot j % slots (all its arrays), tail block j at j % tail_blocks."""
    c = spec.config
    lay = layout(n, c)
    slots, tail_blocks = store_blocks_of(c) + 1, c.tail_length // BS
    tiers = jax.device_get(tiers)
    out = [tiers.sink_k[b, :, :lay["sinks"]], tiers.sink_v[b, :, :lay["sinks"]]]
    (seg,) = tiers.stores
    for j in range(lay["oldest"], lay["migrated_blocks"]):
        out += [x[:, b * slots + j % slots] for x in seg.arrays()]
    for i in range(lay["tail"]):
        j, r = lay["migrated_blocks"] + i // BS, i % BS
        out += [x[:, b * tail_blocks + j % tail_blocks, r] for x in (tiers.tail_k, tiers.tail_v)]
    return [np.asarray(x) for x in out]


def assert_bit_identical(a: list, b: list, msg: str):
    assert len(a) == len(b), msg
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes(), f"{msg}: array {i} differs"


S = 36  # padded prompt length (n up to 33 evicts: capacity 26)


def prompt(n_real: int, seed: int):
    """k, v [S, KVH, D] with garbage (not zeros) past n_real: padding must not leak in."""
    rng = np.random.default_rng(seed)
    k = rng.standard_normal((S, KVH, D)).astype(np.float32)
    v = rng.standard_normal((S, KVH, D)).astype(np.float32)
    k[n_real:] = 1e3
    v[n_real:] = -1e3
    return k, v


def token_by_token(spec, k, v, n, start=None):
    tiers, t0 = (tt.Tiers.empty(spec, 1), 0) if start is None else start
    step = token_step(spec)
    for t in range(t0, n):
        tiers = step(tiers, jnp.asarray([t], jnp.int32), jnp.asarray(k[None, t]), jnp.asarray(v[None, t]))
    return tiers


def write_prompt(spec, k, v, lengths):
    cache = tt.TwoTierKVCache.init(spec, num_layers=1, batch=k.shape[0])
    return prompt_step()(cache, jnp.asarray(k), jnp.asarray(v), jnp.asarray(lengths, jnp.int32))


@pytest.mark.parametrize("store", [P.Q8, P.Q4, P.FP16])
def test_prefill_equals_token_by_token(store):
    spec = tt.TwoTierSpec.from_config(config(store, P.FP16))
    for n in (1, 2, 5, 10, 13, 22, 27, 33):  # < sinks, = sinks, < tail, tail full, migrated, evicted
        k, v = prompt(n, seed=n)
        cache = write_prompt(spec, k[None], v[None], [n])
        ref = token_by_token(spec, k, v, n)
        assert_bit_identical(held_content(cache.layers[0], n, 0, spec), held_content(ref, n, 0, spec), f"n={n}")
        # decoding on from the prompt equals decoding on from the token-by-token tiers (the staged
        # block in the spare slot included): 7 more tokens, past a migration.
        more_k, more_v = tokens(7, seed=100 + n)
        kk, vv = np.concatenate([k[:n], more_k]), np.concatenate([v[:n], more_v])
        a = token_by_token(spec, kk, vv, n + 7, start=(cache.layers[0], n))
        b = token_by_token(spec, kk, vv, n + 7, start=(ref, n))
        assert_bit_identical(held_content(a, n + 7, 0, spec), held_content(b, n + 7, 0, spec), f"n={n} + 7")


def test_prefill_batch_of_two_equals_two_batch_one_runs():
    spec = tt.TwoTierSpec.from_config(config(P.Q4, P.FP16))
    for lengths in ((5, 30), (33, 1), (13, 13)):
        pk = [prompt(n, seed=10 * i + n) for i, n in enumerate(lengths)]
        k = np.stack([p[0] for p in pk])
        v = np.stack([p[1] for p in pk])
        cache = write_prompt(spec, k, v, lengths)
        np.testing.assert_array_equal(np.asarray(cache.length), lengths)
        refs = [token_by_token(spec, k[b], v[b], n) for b, n in enumerate(lengths)]
        for b, n in enumerate(lengths):
            assert_bit_identical(held_content(cache.layers[0], n, b, spec), held_content(refs[b], n, 0, spec),
                                 f"lengths {lengths}, sequence {b}")
        # decode 6 tokens per sequence at their own positions (the batch > 1 scatter path)
        more = [tokens(6, seed=200 + b) for b in range(2)]
        for i in range(6):
            pos = jnp.asarray([n + i for n in lengths], jnp.int32)
            cache = decode_step()(cache, jnp.asarray(np.stack([m[0][i] for m in more])),
                                  jnp.asarray(np.stack([m[1][i] for m in more])), pos)
        for b, n in enumerate(lengths):
            kk, vv = np.concatenate([k[b, :n], more[b][0]]), np.concatenate([v[b, :n], more[b][1]])
            ref = token_by_token(spec, kk, vv, n + 6, start=(refs[b], n))
            assert_bit_identical(held_content(cache.layers[0], n + 6, b, spec), held_content(ref, n + 6, 0, spec),
                                 f"lengths {lengths}, sequence {b}, after decoding")


# --------------------------------------------------------------------------------------------------
# 8. update_policy: later migrations in the new precision, stored blocks kept and still read.


def check_contents(cache, k, v, n, block_precision, q):
    """get_all_kv against the NumPy expectation (block j stored in block_precision(j)), attend
    against float64 attention over those tokens, and the store's bytes per precision."""
    c = cache.config
    gk, gv = cache.get_all_kv()
    out = np.asarray(cache.attend(q, SCALE))
    np.testing.assert_allclose(out, attention_np(q, np.asarray(gk), np.asarray(gv), SCALE), atol=1e-5, rtol=1e-5)
    assert_held_kv(gk, gv, expected_kv(k[:n], v[:n], c, block_precision), f"after {n}")
    lay = layout(n, c)
    blocks = range(lay["oldest"], lay["migrated_blocks"])
    assert cache.stats().store_bytes == sum(store_block_bytes(block_precision(j)) for j in blocks)


def test_update_policy_keeps_old_blocks_and_migrates_to_the_new_segment():
    c = config(P.Q4, P.FP32)
    cache = tt.TwoTierKvCache(c)
    k, v = tokens(48, seed=9)
    q = np.random.default_rng(3).standard_normal((2 * KVH, D)).astype(np.float32)
    append_chunks(cache, k[:13], v[:13])  # mid-block: 13 - 2 sinks = 11 tokens after the sinks
    old = held_store_blocks(cache.state)
    assert sorted(old) == [0]
    cache.update_policy(P.Q8)
    assert cache.store_precision is P.Q8
    append_chunks(cache, k[13:21], v[13:21])
    stores = cache.state.tiers.stores
    assert [s.precision for s in stores] == [P.Q4, P.Q8]
    chex.assert_type([stores[0].k, stores[1].k], [jnp.uint8, jnp.int8])
    chex.assert_shape(stores[0].k, (KVH, store_blocks_of(c) + 1, BS, D // 2))
    now = held_store_blocks(cache.state)
    assert sorted(now) == [0, 1, 2]
    assert all(a.tobytes() == b.tobytes() for a, b in zip(old[0], now[0], strict=True)), "Q4 block 0 changed"
    check_contents(cache, k, v, 21, lambda j: P.Q4 if j < 1 else P.Q8, q)

    cache.update_policy(tt.CacheQuantization.QuantizedStore(P.FP32))  # at 21: mid-block again
    assert cache.store_precision is P.FP32
    rest = lambda j: P.Q4 if j < 1 else (P.Q8 if j < 3 else P.FP32)  # noqa: E731
    for m in range(22, 39):  # one token at a time until every Q4 and Q8 block is evicted
        cache.append(k[m - 1:m], v[m - 1:m])
        lay = layout(m, c)
        live = {rest(j) for j in range(lay["oldest"], lay["migrated_blocks"])} | {P.FP32}
        assert [s.precision for s in cache.state.tiers.stores] == [p for p in (P.Q4, P.Q8, P.FP32) if p in live], m
    check_contents(cache, k, v, 38, rest, q)
    assert len(cache.state.tiers.stores) == 1 and cache.state.tiers.stores[0].precision is P.FP32


@pytest.mark.parametrize("switch_at", [14, 10])
def test_update_policy_when_the_next_token_migrates_a_block(switch_at):
    """At 14 (and 10) the tail is full: the very next token migrates the tail's oldest block, which
    must land, intact, in the new segment (at 10 the closing segment holds no block at all)."""
    c = config(P.Q4, P.FP32)
    cache = tt.TwoTierKvCache(c)
    k, v = tokens(24, seed=12)
    q = np.random.default_rng(4).standard_normal((2 * KVH, D)).astype(np.float32)
    append_chunks(cache, k[:switch_at], v[:switch_at])
    q4_blocks = layout(switch_at, c)["migrated_blocks"]
    cache.update_policy(P.Q8)
    cache.append(k[switch_at:switch_at + 4], v[switch_at:switch_at + 4])
    n = switch_at + 4
    assert layout(n, c)["migrated_blocks"] == q4_blocks + 1
    check_contents(cache, k, v, n, lambda j: P.Q4 if j < q4_blocks else P.Q8, q)


# --------------------------------------------------------------------------------------------------
# 9. Bad inputs: KvCacheError naming the values, the cache unchanged.


def test_bad_appends_raise_and_leave_the_cache():
    cache = tt.TwoTierKvCache(config(P.Q4, P.FP32))
    k, v = tokens(13, seed=6)
    cache.append(k, v)
    before = snapshot(cache.state)
    good = np.ones((3, KVH, D), np.float32)
    nan, inf = good.copy(), good.copy()
    nan[1, 0, 2] = np.nan
    inf[2, 1, 0] = -np.inf
    cases = [
        (np.ones((3, KVH + 1, D)), good, r"keys of shape \(3, 3, 8\).*num_kv_heads=2"),
        (np.ones((3, KVH, D - 2)), good, r"keys of shape \(3, 2, 6\).*head_dim=8"),
        (good, np.ones((3, KVH, D + 2)), r"values of shape \(3, 2, 10\)"),
        (good, np.ones((4, KVH, D)), r"keys \(3, 2, 8\) and values \(4, 2, 8\)"),
        (np.ones((0, KVH, D)), np.ones((0, KVH, D)), r"keys of shape \(0, 2, 8\).*n >= 1"),
        (np.ones(5), np.ones(5), r"keys of shape \(5,\)"),
        (np.ones((KVH, D)), np.ones((KVH, D)), r"keys of shape \(2, 8\)"),
        (np.full((3, KVH, D), "x"), good, r"keys must hold real numbers, got dtype <U1"),
        (good.astype(np.complex64), good, r"keys must hold real numbers, got dtype complex64"),
        (good.astype(bool), good, r"keys must hold real numbers, got dtype bool"),
        (np.array([object()] * 3), good, r"keys must hold real numbers, got dtype object"),
        (nan, good, r"keys holds NaN or infinite"),
        (good, inf, r"values holds NaN or infinite"),
        ("keys", good, r"keys must hold real numbers"),
    ]
    for bad_k, bad_v, pattern in cases:
        with pytest.raises(KvCacheError, match=pattern):
            cache.append(bad_k, bad_v)
        assert_same_state(before, cache.state)
    # RuvLLM's flat n * KVH * D floats are accepted
    cache.append(good.reshape(-1), good.reshape(-1))
    assert len(cache) == 16


def test_bad_queries_and_scales_raise():
    cache = tt.TwoTierKvCache(config(P.Q4, P.FP32))
    k, v = tokens(13, seed=6)
    cache.append(k, v)
    before = snapshot(cache.state)
    q = np.ones((2 * KVH, D), np.float32)
    for bad_q, pattern in (
        (np.ones((3, D)), r"query of shape \(3, 8\).*multiple of num_kv_heads=2"),
        (np.ones((KVH, D - 2)), r"query of shape \(2, 6\).*head_dim=8"),
        (np.ones((0, D)), r"query of shape \(0, 8\)"),
        (np.ones(D + 1), r"query of shape \(9,\)"),
        (np.ones((1, KVH, D)), r"query of shape \(1, 2, 8\)"),
    ):
        with pytest.raises(KvCacheError, match=pattern):
            cache.attend(bad_q, SCALE)
    for bad_scale in (float("nan"), float("inf"), "0.3", True, None, np.array([0.3, 0.3])):
        with pytest.raises(KvCacheError, match=r"scale must be a finite number"):
            cache.attend(q, bad_scale)
    assert_same_state(before, cache.state)
    # a flat H * D query is accepted
    np.testing.assert_allclose(np.asarray(cache.attend(q.reshape(-1), SCALE)), np.asarray(cache.attend(q, SCALE)))
    # a query of no numbers is rejected as the facade promises: with KvCacheError, naming the query
    for bad_q in (np.full((KVH, D), "x"), [["x"] * D] * KVH, object()):
        with pytest.raises(KvCacheError, match="query"):
            cache.attend(bad_q, SCALE)
    assert_same_state(before, cache.state)


def test_bad_configs_raise_naming_the_values():
    with pytest.raises(KvCacheError, match=r"tail_length=6 must be a multiple of migration_batch=4"):
        KvCacheConfig(tail_length=6, migration_batch=4, max_tokens=64, num_kv_heads=KVH, head_dim=D)
    with pytest.raises(KvCacheError, match=r"max_tokens=13 .* = 14"):
        config(max_tokens=13)
    with pytest.raises(KvCacheError, match=r"store_precision.*Q4K"):
        config(P.Q4K)
    with pytest.raises(KvCacheError, match=r"tail_precision.*Q8"):
        config(P.Q4, P.Q8)
    with pytest.raises(KvCacheError, match=r"head_dim=7 must be even"):
        KvCacheConfig(tail_length=8, migration_batch=4, max_tokens=64, num_kv_heads=KVH, head_dim=7)
    base = dict(tail_length=8, migration_batch=4, max_tokens=64, num_kv_heads=KVH, head_dim=D)
    for name, value in (("migration_batch", 0), ("num_kv_heads", -1), ("tail_length", 2.5), ("max_tokens", True)):
        with pytest.raises(KvCacheError, match=re.escape(f"KvCacheConfig.{name} must be an int > 0, got {value!r}")):
            KvCacheConfig(**{**base, name: value})
    with pytest.raises(KvCacheError, match=r"num_sink_tokens must be an int >= 0, got -1"):
        config(sinks=-1)
    with pytest.raises(KvCacheError, match=r"eviction must be a bool, got 0"):
        config(eviction=0)
    with pytest.raises(KvCacheError, match="expected a KvCacheConfig"):
        tt.TwoTierKvCache({"tail_length": 8})


def test_values_beyond_the_float16_range_are_rejected():
    """float16 scales, zeros and tail entries reach 65504: a key past it would read back as inf or
    NaN (a Q4 zero point below -65504, a Q8 scale amax / 127 past it), so the facade refuses it and
    keeps its state; an FP32 tail with an FP32 store has no such limit."""
    for store, tail, big in ((P.Q4, P.FP32, -1e5), (P.Q8, P.FP32, 1e7), (P.FP16, P.FP16, 7e4)):
        cache = tt.TwoTierKvCache(config(store, tail))
        k, v = tokens(16, seed=8)
        cache.append(k[:3], v[:3])
        before = jax.tree_util.tree_map(np.asarray, cache.state)
        k[:, 0, 0] = big  # an outlier channel, finite in float32
        with pytest.raises(KvCacheError, match="beyond float16's 65504"):
            cache.append(k, v)
        after = jax.tree_util.tree_map(np.asarray, cache.state)
        assert all(np.array_equal(x, y) for x, y in zip(jax.tree_util.tree_leaves(before),
                                                        jax.tree_util.tree_leaves(after), strict=True))
    cache = tt.TwoTierKvCache(config(P.FP32, P.FP32))
    k, v = tokens(16, seed=8)
    k[:, 0, 0] = 1e7
    cache.append(k, v)
    np.testing.assert_array_equal(np.asarray(cache.get_all_kv()[0]), k)


# --------------------------------------------------------------------------------------------------
# 10. clear()


def test_clear_empties_and_keeps_the_store_precision():
    c = config(P.Q4, P.FP32)
    empty = tt.TwoTierKvCache(c)
    np.testing.assert_array_equal(np.asarray(empty.attend(np.ones((2 * KVH, D)), SCALE)), 0.0)  # empty: zeros
    cache = tt.TwoTierKvCache(c)
    k, v = tokens(30, seed=11)
    append_chunks(cache, k[:13], v[:13])
    cache.update_policy(P.Q8)
    assert len(cache.state.tiers.stores) == 2
    allocated = cache.stats().allocated_bytes
    cache.clear()
    s = cache.stats()
    assert (s.total_tokens, s.sink_tokens, s.tail_tokens, s.store_tokens, s.evicted_tokens) == (0, 0, 0, 0, 0)
    assert (s.tail_bytes, s.store_bytes, s.sink_bytes) == (0, 0, 0)
    assert len(cache) == 0 and int(cache.state.length) == 0
    assert cache.store_precision is P.Q8
    assert [seg.precision for seg in cache.state.tiers.stores] == [P.Q8]
    assert cache.state.tiers.stores[0].k.dtype == jnp.int8
    assert s.allocated_bytes < allocated  # one segment left
    # and it fills again from empty, in Q8
    append_chunks(cache, k[:20], v[:20])
    assert_held_kv(*cache.get_all_kv(), expected_kv(k[:20], v[:20], c.replace(store_precision=P.Q8)))
