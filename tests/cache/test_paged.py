"""The paged cache: decode through block tables equals the contiguous cache, token for token.

Oracles: the contiguous cache (itself pinned to transformers in tests/models) for the model's
decode; float64 NumPy attention over the tokens written for the facade; and the int8 pool within
its per-token rounding bound.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ruvllm_jax.cache import ContiguousKVCache
from ruvllm_jax.cache.paged import PagedKVCache, PagedKvCache, PagedSpec, quantize_tokens, table_array
from ruvllm_jax.errors import KvCacheError, OutOfMemoryError
from ruvllm_jax.models import llama, loader
from ruvllm_jax.models.config import LlamaConfig
from ruvllm_jax.testing import build_hf_model, rng_tokens, save_hf_model

_decode = jax.jit(lambda p, t, pos, c, cfg: llama.decode(p, cfg, t, pos, c), static_argnames="cfg")
_prefill = jax.jit(lambda p, t, c, lengths, cfg: llama.prefill(p, cfg, t, c, lengths=lengths),
                   static_argnames="cfg")


def _scrambled_tables(batch: int, per_seq: int, num_blocks: int, seed: int = 0) -> np.ndarray:
    """Each sequence gets `per_seq` distinct blocks in a random order, no block shared."""
    ids = np.random.default_rng(seed).permutation(num_blocks)[: batch * per_seq]
    return ids.reshape(batch, per_seq).astype(np.int32)


@pytest.fixture(scope="module", params=["llama", "mistral"])
def model(request, tmp_path_factory):
    kind = request.param
    folder = save_hf_model(build_hf_model(kind), str(tmp_path_factory.mktemp(f"paged_{kind}")))
    cfg = loader.load_config(folder)
    return kind, cfg, loader.load_params(folder, cfg)


@pytest.mark.parametrize("dtype, atol", [("float32", 1e-5), ("int8", 0.05)])
def test_paged_decode_equals_contiguous_decode(model, dtype, atol):
    """Two sequences of different prompt lengths, prefilled then decoded 20 tokens teacher-forced:
    every step's logits through scrambled block tables equal the contiguous cache's (Mistral's
    window of 8 is crossed many times); int8 KV stays within its rounding."""
    kind, cfg, params = model
    b, prompt, steps, bs = 2, 12, 20, 4
    lengths = np.asarray([12, 7], np.int32)
    tokens = rng_tokens(b * (prompt + steps), seed=3).reshape(b, prompt + steps)
    per_seq = -(-(prompt + steps) // bs)
    spec = PagedSpec(num_blocks=b * per_seq + 3, block_size=bs, num_kv_heads=cfg.num_kv_heads,
                     head_dim=cfg.head_dim, dtype=dtype)
    paged = PagedKVCache.init(spec, num_layers=cfg.num_layers).with_tables(_scrambled_tables(b, per_seq,
                                                                                              spec.num_blocks))
    contiguous = ContiguousKVCache.init(num_layers=cfg.num_layers, batch=b, num_kv_heads=cfg.num_kv_heads,
                                        head_dim=cfg.head_dim, max_len=prompt + steps)
    first = jnp.asarray(np.where(np.arange(prompt)[None] < lengths[:, None], tokens[:, :prompt], 0))
    _, paged = _prefill(params, first, paged, jnp.asarray(lengths), cfg)
    _, contiguous = _prefill(params, first, contiguous, jnp.asarray(lengths), cfg)
    pos = lengths.copy()
    for i in range(steps):
        tok = jnp.asarray(tokens[np.arange(b), prompt + i])
        lp, paged = _decode(params, tok, jnp.asarray(pos), paged, cfg)
        lc, contiguous = _decode(params, tok, jnp.asarray(pos), contiguous, cfg)
        chex.assert_shape(lp, (b, cfg.vocab_size))
        np.testing.assert_allclose(np.asarray(lp), np.asarray(lc), atol=atol, rtol=0, err_msg=f"{kind} step {i}")
        pos += 1


def test_prefill_after_cached_tokens_equals_one_prefill(model):
    """`prefill(start=)` on a paged cache (a session's next turn): a prompt run in two chunks gives
    the logits of running it at once, and the same cache contents."""
    kind, cfg, params = model
    n, cut, bs = 23, 14, 4
    tokens = jnp.asarray(rng_tokens(n, seed=5))
    spec = PagedSpec(num_blocks=12, block_size=bs, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim)
    tables = _scrambled_tables(1, 6, 12, seed=1)
    whole_logits, whole = llama.prefill(params, cfg, tokens, PagedKVCache.init(spec, num_layers=cfg.num_layers)
                                        .with_tables(tables))
    cache = PagedKVCache.init(spec, num_layers=cfg.num_layers).with_tables(tables)
    _, cache = llama.prefill(params, cfg, tokens[:, :cut], cache)
    # The second chunk padded to 16 tokens: padding must neither be stored nor change real logits.
    rest = jnp.zeros((1, 16), jnp.int32).at[:, : n - cut].set(tokens[:, cut:])
    logits, cache = llama.prefill(params, cfg, rest, cache, start=jnp.asarray([cut]), lengths=jnp.asarray([n - cut]))
    np.testing.assert_allclose(np.asarray(logits[0, : n - cut]), np.asarray(whole_logits[0, cut:]), atol=2e-5, rtol=0,
                               err_msg=kind)
    for layer in range(cfg.num_layers):
        for a, b in zip(whole.gather(layer, 0, n), cache.gather(layer, 0, n), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=0)


def test_writes_through_missing_table_entries_are_dropped():
    """A free slot's table row is all `num_blocks`: its writes must land nowhere."""
    spec = PagedSpec(num_blocks=3, block_size=2, num_kv_heads=1, head_dim=4)
    cache = PagedKVCache.init(spec, num_layers=1, batch=2, width=2)
    cache = cache.with_tables(np.asarray([[1, 3], [3, 3]], np.int32))
    k = jnp.ones((2, 1, 4))
    cache = cache.write(0, k, 2 * k, jnp.asarray([1, 0]))
    written = np.asarray(cache.k[0])
    assert written[0, 1, 1].tolist() == [1, 1, 1, 1]  # sequence 0, token 1 -> block 1 offset 1
    assert np.count_nonzero(written) == 4  # sequence 1 (no blocks) wrote nothing
    cache = cache.write(0, k, k, jnp.asarray([2, 0]))  # past sequence 0's blocks: dropped too
    assert np.count_nonzero(np.asarray(cache.k[0])) == 4


@settings(max_examples=20, deadline=None)
@given(st.lists(st.integers(1, 9), min_size=1, max_size=4), st.sampled_from(["float32", "int8"]), st.data())
def test_facade_appends_forks_and_attends_like_float64(chunks, dtype, data):
    """PagedKvCache: tokens appended in chunks read back as written (int8 within half a step per
    token); a fork shares the prefix, diverges copy-on-write, and neither sees the other's tokens;
    attention over a sequence equals float64 softmax attention over its tokens."""
    kvh, d, bs = 2, 8, 4
    spec = PagedSpec(num_blocks=16, block_size=bs, num_kv_heads=kvh, head_dim=d, dtype=dtype)
    pkv = PagedKvCache(spec, num_layers=2)
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16)))
    written = []
    pkv.add_sequence("a")
    for n in chunks:
        k = rng.normal(size=(2, n, kvh, d)).astype(np.float32)
        pkv.append("a", k, -k)
        written.append(k)
    k_all = np.concatenate(written, axis=1)
    tol = 0.0 if dtype == "float32" else np.abs(k_all).max(-1, keepdims=True) / 127 / 2 + 1e-6
    got_k, got_v = pkv.get_kv("a", layer=1)
    assert np.all(np.abs(np.asarray(got_k) - k_all[1]) <= tol[1] if dtype == "int8" else np.asarray(got_k) == k_all[1])
    np.testing.assert_allclose(np.asarray(got_v), -np.asarray(got_k), rtol=0, atol=0)
    # Fork, then both sides append: copy-on-write keeps them apart.
    pkv.fork("a", "b")
    extra_a = rng.normal(size=(2, 3, kvh, d)).astype(np.float32)
    extra_b = rng.normal(size=(2, 3, kvh, d)).astype(np.float32)
    pkv.append("a", extra_a, extra_a)
    pkv.append("b", extra_b, extra_b)
    for name, extra in (("a", extra_a), ("b", extra_b)):
        k, _ = pkv.get_kv(name, layer=0)
        expected = np.concatenate([k_all[0], extra[0]], axis=0)
        bound = 1e-6 if dtype == "float32" else np.abs(expected).max(-1, keepdims=True) / 254 + 1e-6
        assert np.all(np.abs(np.asarray(k) - expected) <= bound)
    # Attention over "b" against float64, on the values the pool holds.
    q = rng.normal(size=(4, d)).astype(np.float32)
    k, v = (np.asarray(x, np.float64) for x in pkv.get_kv("b", layer=0))
    kr = np.repeat(k, 2, axis=1)  # [T, H, D]
    vr = np.repeat(v, 2, axis=1)
    s = np.einsum("hd,thd->ht", q.astype(np.float64), kr) / np.sqrt(d)
    p = np.exp(s - s.max(-1, keepdims=True))
    ref = np.einsum("ht,thd->hd", p / p.sum(-1, keepdims=True), vr)
    np.testing.assert_allclose(np.asarray(pkv.attend("b", q, layer=0)), ref, atol=2e-5, rtol=0)
    pkv.free("a")
    pkv.free("b")
    assert pkv.stats()["free_blocks"] == 16


def test_facade_refuses_what_does_not_fit_and_changes_nothing():
    spec = PagedSpec(num_blocks=2, block_size=4, num_kv_heads=1, head_dim=2)
    pkv = PagedKvCache(spec)
    pkv.add_sequence(0)
    pkv.append(0, np.ones((1, 5, 1, 2)), np.ones((1, 5, 1, 2)))
    before = np.asarray(pkv.cache.k[0]).copy()
    with pytest.raises(OutOfMemoryError):
        pkv.append(0, np.ones((1, 4, 1, 2)), np.ones((1, 4, 1, 2)))
    with pytest.raises(KvCacheError, match="num_layers, T, KVH, D"):
        pkv.append(0, np.ones((5, 1, 2)), np.ones((5, 1, 2)))
    assert pkv.length(0) == 5
    np.testing.assert_array_equal(np.asarray(pkv.cache.k[0]), before)


@pytest.mark.parametrize("bad", [dict(num_blocks=0), dict(block_size=-1), dict(dtype="int4"), dict(head_dim=True)])
def test_paged_spec_refuses_bad_values(bad):
    with pytest.raises(KvCacheError, match=repr(next(iter(bad.values())))):
        PagedSpec(**{"num_blocks": 4, **bad})


def test_int8_tokens_round_within_half_a_step():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 5, 16)) * 10, jnp.float32)
    codes, scale = quantize_tokens(x)
    assert codes.dtype == jnp.int8 and scale.shape == (3, 5)
    err = np.abs(np.asarray(codes, np.float32) * np.asarray(scale)[..., None] - np.asarray(x))
    assert np.all(err <= np.asarray(scale)[..., None] / 2 + 1e-6)


def test_table_array_pads_with_the_pool_size_and_refuses_overlong_tables():
    np.testing.assert_array_equal(table_array([[3, 1], [2]], 3, 9), [[3, 1, 9], [2, 9, 9]])
    with pytest.raises(KvCacheError, match="3 blocks does not fit width 2"):
        table_array([[1, 2, 3]], 2, 9)


def test_bytes_per_token_matches_the_pools():
    cfg = LlamaConfig(vocab_size=16, hidden_size=16, intermediate_size=32, num_layers=3, num_heads=2,
                      num_kv_heads=2, head_dim=8)
    for dtype in ("float32", "bfloat16", "int8"):
        spec = PagedSpec(num_blocks=5, block_size=4, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, dtype=dtype)
        cache = PagedKVCache.init(spec, num_layers=cfg.num_layers)
        assert cache.nbytes() == spec.bytes_per_token(cfg.num_layers) * spec.capacity
