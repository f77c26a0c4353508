"""Quantized paged attention equals float64 softmax over the values its codes stand for (KIVI layout).

The oracle is independent of the library: the test quantizes random K/V with NumPy into the store
layout (keys per channel over a block, values per token; 4-bit codes packed low nibble = channel j,
high nibble = channel j + D/2), keeps the integer codes it packed, dequantizes *those* in float64 and
runs a per-sequence softmax in float64. Tolerance: the paths compute in float32, so outputs must be
within 1e-5 of the output scale (max |out|, at least 1), softmax maxima within 1e-5 (absolute, at
least 1 of scale) and sums within 1e-5 relative; observed errors are ~1e-6.
"""

from __future__ import annotations

import functools
import re
from typing import NamedTuple, Optional

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_oracles import in_f64

from ruvllm_jax.errors import ConfigError, PagedAttentionError
from ruvllm_jax.kernels import (
    KernelOptions,
    PagedBlockSizes,
    decode_attention,
    merge_attention,
    quantized_attention_reference,
    quantized_paged_attention,
)
from ruvllm_jax.kernels.quantized import quantized_attention_pallas

TOL = 1e-5
SMALL_BLOCKS = PagedBlockSizes(pages_per_compute_block=2, max_splits=2)  # groups, padding and splits at tiny sizes


class Store(NamedTuple):
    """One test case: the arrays the kernel sees, and the float64 K/V the codes stand for."""

    q: jax.Array
    k_codes: jax.Array
    v_codes: jax.Array
    k_scale: jax.Array
    v_scale: jax.Array
    k_zero: Optional[jax.Array]
    v_zero: Optional[jax.Array]
    tables: jax.Array
    lengths: jax.Array
    bits: int
    k_true: np.ndarray  # [KVH, NB, BS, D] float64
    v_true: np.ndarray


def quantize_np(x, bits, axis):
    """x float32 [KVH, NB, BS, D] -> (store codes, f16 scale, f16 zero or None, float64 dequantized),
    one scale (and zero) per slice reduced over `axis` (2: per channel over a block; 3: per token)."""
    if bits == 8:
        scale = (np.abs(x).max(axis) / 127).astype(np.float16)
        ints = np.clip(np.round(x / np.expand_dims(scale.astype(np.float32), axis)), -127, 127)
        deq = ints * np.expand_dims(scale.astype(np.float64), axis)
        return ints.astype(np.int8), scale, None, deq
    zero = x.min(axis).astype(np.float16)
    scale = ((x.max(axis) - zero.astype(np.float32)) / 15).astype(np.float16)
    shifted = x - np.expand_dims(zero.astype(np.float32), axis)
    ints = np.clip(np.round(shifted / np.expand_dims(scale.astype(np.float32), axis)), 0, 15).astype(np.uint8)
    half = x.shape[-1] // 2
    packed = ints[..., :half] | (ints[..., half:] << 4)
    deq = ints * np.expand_dims(scale.astype(np.float64), axis) + np.expand_dims(zero.astype(np.float64), axis)
    return packed, scale, zero, deq


def make_store(seed, *, batch=3, heads=(4, 2), head_dim=16, bits=8, block_size=8, max_blocks=3, lengths=None,
               spare_blocks=2) -> Store:
    """A shuffled (non-identity) block table over a pool with junk blocks no sequence uses."""
    rng = np.random.default_rng(seed)
    h, kvh = heads
    nb = batch * max_blocks + spare_blocks
    shape = (kvh, nb, block_size, head_dim)
    gains = rng.uniform(0.3, 4.0, head_dim).astype(np.float32)  # outlier channels, as KIVI keys have
    k = rng.standard_normal(shape, dtype=np.float32) * gains
    v = rng.standard_normal(shape, dtype=np.float32)
    kc, ks, kz, k_true = quantize_np(k, bits, axis=2)
    vc, vs, vz, v_true = quantize_np(v, bits, axis=3)
    tables = rng.permutation(nb)[: batch * max_blocks].reshape(batch, max_blocks)
    if lengths is None:
        lengths = rng.integers(0, block_size * max_blocks + 1, batch)
    as_jnp = lambda x: None if x is None else jnp.asarray(x)  # noqa: E731
    return Store(jnp.asarray(rng.standard_normal((batch, h, head_dim), dtype=np.float32)), *map(as_jnp, (
        kc, vc, ks, vs, kz, vz)), jnp.asarray(tables, jnp.int32), jnp.asarray(lengths, jnp.int32), bits, k_true,
        v_true)


def store_tokens(store: Store, i: int):
    """Sequence i's valid tokens, in table order, as float64 K, V [KVH, n, D]."""
    kvh, _, _, d = store.k_true.shape
    table, n = np.asarray(store.tables[i]), int(store.lengths[i])
    return (store.k_true[:, table].reshape(kvh, -1, d)[:, :n], store.v_true[:, table].reshape(kvh, -1, d)[:, :n])


def softmax_oracle(q, keys, values, scale=None):
    """float64 attention of q [B, H, D] over per-sequence keys/values [KVH, n_b, D] -> out, max, sum."""
    q = np.asarray(q, np.float64)
    b, h, d = q.shape
    scale = d ** -0.5 if scale is None else scale
    out, mx, sm = np.zeros((b, h, d)), np.full((b, h), -np.inf), np.zeros((b, h))
    for i, (k, v) in enumerate(zip(keys, values, strict=True)):
        if k.shape[1] == 0:
            continue
        kvh = k.shape[0]
        s = np.einsum("kgd,ktd->kgt", q[i].reshape(kvh, h // kvh, d), k) * scale
        m = s.max(-1, keepdims=True)
        p = np.exp(s - m)
        out[i] = (np.einsum("kgt,ktd->kgd", p, v) / p.sum(-1, keepdims=True)).reshape(h, d)
        mx[i], sm[i] = m.reshape(h), p.sum(-1).reshape(h)
    return out, mx, sm


def store_oracle(store: Store):
    keys, values = zip(*(store_tokens(store, i) for i in range(store.q.shape[0])), strict=True)
    return softmax_oracle(store.q, keys, values)


def assert_matches(actual, expected, name=""):
    (out, (m, l)), (ref_out, ref_m, ref_l) = actual, expected
    chex.assert_shape(out, ref_out.shape)
    chex.assert_shape([m, l], ref_m.shape)
    out, m, l = (np.asarray(x, np.float64) for x in (out, m, l))
    np.testing.assert_allclose(out, ref_out, rtol=0, atol=TOL * max(1.0, np.abs(ref_out).max()), err_msg=name)
    np.testing.assert_array_equal(np.isneginf(m), np.isneginf(ref_m), err_msg=f"{name} (-inf pattern)")
    finite = np.isfinite(ref_m)
    np.testing.assert_allclose(m[finite], ref_m[finite], rtol=TOL, atol=TOL, err_msg=name)
    np.testing.assert_allclose(l, ref_l, rtol=TOL, atol=0, err_msg=name)


def run(store: Store, path: str, blocks: PagedBlockSizes = SMALL_BLOCKS):
    kw = dict(impl="jnp") if path == "jnp" else dict(impl="pallas", interpret=True)
    return quantized_paged_attention(store.q, store.k_codes, store.v_codes, store.k_scale, store.v_scale,
                                     store.tables, store.lengths, k_zero=store.k_zero, v_zero=store.v_zero,
                                     bits=store.bits, return_residuals=True, block_sizes=blocks, **kw)


# --------------------------------------------------------------------------------------------------
# Agreement with the float64 oracle.


@pytest.mark.parametrize("path", ["jnp", "pallas"])
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("heads", [(2, 2), (4, 2), (4, 1)], ids=["mha", "gqa2", "mqa4"])
@pytest.mark.parametrize("head_dim", [16, 64])
def test_paths_match_float64_oracle(path, bits, heads, head_dim):
    # Lengths: a full table, one ending mid-page, and an empty store.
    store = make_store(bits * head_dim + heads[0], heads=heads, head_dim=head_dim, bits=bits, lengths=[24, 13, 0])
    assert_matches(run(store, path), store_oracle(store), name=f"{path} bits={bits} {heads} D={head_dim}")


store_cases = st.fixed_dictionaries(dict(
    batch=st.integers(1, 3),
    heads=st.sampled_from([(2, 2), (4, 2), (8, 2), (4, 1)]),
    head_dim=st.sampled_from([16, 32]),
    bits=st.sampled_from([8, 4]),
    block_size=st.sampled_from([4, 8, 16]),
    max_blocks=st.sampled_from([1, 2, 5]),
    pages=st.integers(1, 4),
    splits=st.integers(1, 3),
    seed=st.integers(0, 2**16),
))


def check_store_case(path, case):
    store = make_store(case["seed"], batch=case["batch"], heads=case["heads"], head_dim=case["head_dim"],
                       bits=case["bits"], block_size=case["block_size"], max_blocks=case["max_blocks"])
    blocks = PagedBlockSizes(pages_per_compute_block=case["pages"], max_splits=case["splits"])
    assert_matches(run(store, path, blocks), store_oracle(store), name=f"{path} {case}")


@settings(max_examples=5, deadline=None, derandomize=True)
@given(case=store_cases)
def test_jnp_path_matches_oracle_over_shapes_lengths_and_steps(case):
    check_store_case("jnp", case)


@settings(max_examples=2, deadline=None, derandomize=True)
@given(case=store_cases)
def test_pallas_kernel_interpreted_matches_oracle_over_shapes_lengths_and_steps(case):
    check_store_case("pallas", case)


@pytest.mark.parametrize("bits", [8, 4])
def test_reference_matches_numpy_oracle_in_float64(bits):
    store = make_store(3, bits=bits, head_dim=16, lengths=[24, 5, 0])
    out, (m, l) = in_f64(quantized_attention_reference, store.q, store.k_codes, store.v_codes, store.k_scale,
                         store.k_zero, store.v_scale, store.v_zero, store.tables, store.lengths, bits=bits)
    ref_out, ref_m, ref_l = store_oracle(store)
    np.testing.assert_allclose(out, ref_out, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(m, ref_m, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(l, ref_l, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("path", ["jnp", "pallas"])
@pytest.mark.parametrize("bits", [8, 4])
def test_store_residuals_merge_exactly_with_a_float_tail(path, bits):
    # Store lengths [20, 0, 7] against tail lengths [5, 3, 0]: both tiers, tail only (the empty store
    # merges as the identity), store only.
    store = make_store(11 + bits, bits=bits, head_dim=16, lengths=[20, 0, 7])
    rng = np.random.default_rng(5)
    b, kvh, t = 3, 2, 6
    tail_k = rng.standard_normal((b, kvh, t, 16), dtype=np.float32)
    tail_v = rng.standard_normal((b, kvh, t, 16), dtype=np.float32)
    tail_len = np.array([5, 3, 0])
    tail = decode_attention(store.q, jnp.asarray(tail_k), jnp.asarray(tail_v), jnp.asarray(tail_len), impl="jnp",
                            return_residuals=True)
    store_out, store_res = run(store, path)
    out, res = merge_attention([store_out, tail[0]], [store_res, tail[1]])
    union = [tuple(np.concatenate([s, x[i, :, :n].astype(np.float64)], axis=1)
                   for s, x in zip(store_tokens(store, i), (tail_k, tail_v), strict=True))
             for i, n in enumerate(tail_len)]
    keys, values = zip(*union, strict=True)
    assert_matches((out, res), softmax_oracle(store.q, keys, values), name=f"merged {path} bits={bits}")


# --------------------------------------------------------------------------------------------------
# The jnp path never holds the store dequantized.

_FLOAT_TENSOR = re.compile(r"tensor<((?:\d+x)+)(?:f16|bf16|f32|f64)>")


def float_tensor_shapes(hlo_text: str):
    return {tuple(int(n) for n in dims.rstrip("x").split("x")) for dims in _FLOAT_TENSOR.findall(hlo_text)}


@pytest.mark.parametrize("bits", [8, 4])
def test_jnp_path_never_materializes_the_dequantized_store(bits):
    store = make_store(7, batch=2, heads=(4, 2), head_dim=16, bits=bits, block_size=8, max_blocks=3, spare_blocks=1)
    kvh, nb, bs, dc = store.k_codes.shape
    b, mb = store.tables.shape
    whole = {(kvh, nb, bs, 16), (kvh, nb, bs, dc), (b, kvh, mb * bs, 16), (kvh, b, mb, bs, dc)}
    limit = kvh * b * mb * bs * dc  # every used page's codes at once, as floats
    args = (store.q, store.k_codes, store.v_codes, store.k_scale, store.v_scale, store.tables, store.lengths)
    jnp_path = functools.partial(quantized_paged_attention, k_zero=store.k_zero, v_zero=store.v_zero, bits=bits,
                                 impl="jnp", block_sizes=PagedBlockSizes(pages_per_compute_block=1))
    shapes = float_tensor_shapes(jax.jit(jnp_path).lower(*args).as_text())
    assert shapes, "no float tensors found: the HLO pattern is stale"
    assert not shapes & whole, f"dequantized store shapes in the jnp path: {shapes & whole}"
    assert max(np.prod(s) for s in shapes) < limit, sorted(shapes, key=np.prod)[-3:]
    # Positive control: the reference does dequantize the whole store, and the same check sees it.
    ref_text = quantized_attention_reference.lower(store.q, store.k_codes, store.v_codes, store.k_scale,
                                                   store.k_zero, store.v_scale, store.v_zero, store.tables,
                                                   store.lengths, bits=bits).as_text()
    ref_shapes = float_tensor_shapes(ref_text)
    assert (kvh, nb, bs, 16) in ref_shapes and (b, kvh, mb * bs, 16) in ref_shapes
    assert max(np.prod(s) for s in ref_shapes) >= limit


# --------------------------------------------------------------------------------------------------
# Bad inputs and dispatch.


def _with(store: Store, **changes):
    return store._replace(**changes)


def _bad_inputs():
    s8, s4 = make_store(1, bits=8, head_dim=16, block_size=4), make_store(1, bits=4, head_dim=16, block_size=4)
    kvh, nb, bs, _ = s8.k_codes.shape
    return [
        (_with(s8, bits=3), r"bits must be 8 or 4, got 3"),
        (_with(s4, bits=8, k_zero=None, v_zero=None), r"8-bit codes must be int8, got k_codes uint8"),
        (_with(s8, bits=4, k_zero=s4.k_zero, v_zero=s4.v_zero), r"4-bit codes must be uint8, got k_codes int8"),
        (_with(s4, k_codes=s4.k_codes.astype(jnp.int8)), r"4-bit codes must be uint8, got k_codes int8"),
        (_with(s4, k_codes=jnp.zeros((kvh, nb, bs, 16), jnp.uint8), v_codes=jnp.zeros((kvh, nb, bs, 16), jnp.uint8)),
         r"4-bit codes of head_dim 16 have Dc = 8"),
        (_with(s4, v_zero=None), r"4-bit codes need zero points, got v_zero None"),
        (_with(s8, k_zero=s4.k_zero), r"8-bit codes take no zero points, got k_zero \(2, 11, 16\)"),
        (_with(s8, k_scale=s8.v_scale),
         r"k_scale must be a float array of shape \(2, 11, 16\), got float16\[2, 11, 4\]"),
        (_with(s8, v_scale=s8.k_scale), r"v_scale must be a float array of shape \(2, 11, 4\)"),
        (_with(s4, k_zero=s4.k_zero[:, :-1]), r"k_zero must be a float array of shape \(2, 11, 16\)"),
        (_with(s8, tables=s8.tables.at[0, 1].set(nb), lengths=s8.lengths.at[0].set(12)),
         rf"block_tables\[0, 1\] = {nb} is outside the pool of {nb} blocks"),
        (_with(s8, lengths=s8.lengths.at[1].set(13)), r"lengths\[1\] = 13 is outside \[0, 12\]"),
        (_with(s8, tables=s8.tables.astype(jnp.float32)), r"block_tables and lengths must be integer arrays"),
        (_with(s8, lengths=s8.lengths[:2]), r"expected block_tables \[B=3, max_blocks\] and lengths \[3\]"),
    ]


@pytest.mark.parametrize("index", range(len(_bad_inputs())))
def test_bad_inputs_raise_paged_attention_error_naming_them(index):
    store, needle = _bad_inputs()[index]
    with pytest.raises(PagedAttentionError, match=needle) as info:
        run(store, "jnp")
    assert str(info.value).startswith("Paged attention error:")


def test_no_mosaic_kernel_and_auto_runs_jnp_on_cpu():
    store = make_store(2, bits=4)
    with pytest.raises(ConfigError, match="no Mosaic"):
        quantized_paged_attention(store.q, store.k_codes, store.v_codes, store.k_scale, store.v_scale, store.tables,
                                  store.lengths, k_zero=store.k_zero, v_zero=store.v_zero, bits=4, impl="pallas",
                                  interpret=True, pallas_backend="mosaic")
    if jax.default_backend() == "cpu":
        out = quantized_paged_attention(store.q, store.k_codes, store.v_codes, store.k_scale, store.v_scale,
                                        store.tables, store.lengths, k_zero=store.k_zero, v_zero=store.v_zero, bits=4)
        np.testing.assert_array_equal(out, run(store, "jnp", PagedBlockSizes())[0])


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("block_size,head_dim", [(16, 64), (8, 16)], ids=["dot", "small-tiles"])
def test_triton_kernel_lowers_for_gpu(bits, block_size, head_dim):
    q = jnp.zeros((2, 14, head_dim), jnp.bfloat16)
    dc = head_dim if bits == 8 else head_dim // 2
    codes = jnp.zeros((2, 64, block_size, dc), jnp.int8 if bits == 8 else jnp.uint8)
    channel, token = jnp.ones((2, 64, head_dim), jnp.float16), jnp.ones((2, 64, block_size), jnp.float16)
    zeros = (channel, token) if bits == 4 else (None, None)
    kernel = KernelOptions(impl="pallas", pallas_backend="triton")
    jax.jit(lambda q, c, t, n: quantized_attention_pallas(
        q, c, c, channel, zeros[0], token, zeros[1], t, n, bits=bits, scale=0.125, kernel=kernel)).trace(
        q, codes, jnp.zeros((2, 16), jnp.int32), jnp.array([5, 200])).lower(lowering_platforms=("cuda",))
