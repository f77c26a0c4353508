"""SegmentedKVCache: decoding through a short append segment equals decoding into the full cache.

The oracle is transformers' full-sequence logits (the model under test is a tiny random Llama),
and the compiled decode loop is checked for whole-cache copies, the regression this cache exists
to prevent.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import struct

from ruvllm_jax.backend import engine
from ruvllm_jax.backend.sampling import SamplingParams
from ruvllm_jax.cache import ContiguousKVCache, KVPart
from ruvllm_jax.cache.segmented import SegmentedKVCache
from ruvllm_jax.errors import KvCacheError
from ruvllm_jax.kernels import KernelOptions
from ruvllm_jax.models import attention, llama, loader
from ruvllm_jax.testing import build_hf_model, rng_tokens, save_hf_model


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    hf = build_hf_model("llama", seed=5)
    folder = save_hf_model(hf, str(tmp_path_factory.mktemp("seg")))
    cfg = loader.load_config(folder)
    return hf, loader.load_params(folder, cfg), cfg


def test_decoding_across_several_segments_matches_transformers(model):
    hf, params, cfg = model
    tokens = rng_tokens(21, seed=11)
    with torch.no_grad():
        ref = hf(torch.tensor(tokens)).logits.numpy()
    cache = ContiguousKVCache.init(num_layers=cfg.num_layers, batch=1, num_kv_heads=cfg.num_kv_heads,
                                   head_dim=cfg.head_dim, max_len=32)
    _, cache = llama.prefill(params, cfg, jnp.asarray(tokens[:, :6]), cache)
    step = jax.jit(lambda p, c, t, pos: llama.decode(p, cfg, t, pos, c))
    pos = 6
    for seg_len in (4, 1, 5, 4):  # segments of several sizes, each closed back into the base
        seg = SegmentedKVCache.open(cache, jnp.asarray([pos]), seg_len)
        for _ in range(seg_len):
            logits, seg = step(params, seg, jnp.asarray(tokens[:, pos]), jnp.asarray([pos]))
            np.testing.assert_allclose(np.asarray(logits)[0], ref[0, pos], atol=1e-4)
            pos += 1
        cache = seg.close()
    assert pos == 20
    # The closed base holds every token: a plain contiguous decode step continues correctly.
    logits, _ = step(params, cache, jnp.asarray(tokens[:, 20]), jnp.asarray([20]))
    np.testing.assert_allclose(np.asarray(logits)[0], ref[0, 20], atol=1e-4)


@pytest.mark.parametrize("batch", [1, 3])
def test_close_writes_at_each_sequences_length_and_drops_what_does_not_fit(batch):
    rng = np.random.default_rng(0)
    base_k = rng.normal(size=(batch, 2, 32, 4)).astype(np.float32)
    base = ContiguousKVCache(k=(jnp.asarray(base_k),), v=(jnp.asarray(base_k),))
    seg = np.full((batch, 2, 4, 4), 7.0, np.float32)
    lengths = np.array([30, 5, 28][:batch])
    closed = SegmentedKVCache(base=base, base_len=jnp.asarray(lengths),
                              segment=ContiguousKVCache(k=(jnp.asarray(seg),), v=(jnp.asarray(seg),))).close()
    for b, n in enumerate(lengths):
        expected = base_k[b].copy()
        end = min(n + 4, 32)
        expected[:, n:end] = 7.0  # positions past 31 are dropped, not clamped onto earlier ones
        np.testing.assert_array_equal(np.asarray(closed.k[0][b]), expected)


def test_sliding_window_layers_are_refused():
    """The base's end moves against the query every step: its part cannot take a window."""
    base = ContiguousKVCache.init(num_layers=1, batch=1, num_kv_heads=2, head_dim=16, max_len=8)
    seg = SegmentedKVCache.open(base, jnp.asarray([0]), 4)
    q = jnp.zeros((1, 4, 16))
    k = jnp.zeros((1, 2, 16))
    _, parts = seg.append(0, k, k, jnp.asarray([0]))
    assert parts[0].query_offset is None and parts[1].query_offset == -1
    with pytest.raises(KvCacheError, match="cannot take a sliding window of 4"):
        attention.attend_parts(q, parts, scale=0.25, sliding_window=4, kernel=KernelOptions(impl="jnp"))
    with pytest.raises(KvCacheError, match="segment of 16 tokens does not fit a cache of 8"):
        SegmentedKVCache.open(base, jnp.asarray([0]), 16)
    assert SegmentedKVCache.supports((None, None)) and not SegmentedKVCache.supports((None, 4))


def _cache_copies(hlo: str, cfg, length: int) -> list[str]:
    """Lines of compiled HLO that copy a whole [1, KVH, length, D] cache buffer."""
    cache_shape = "f32[1,%d,%d,%d]" % (cfg.num_kv_heads, length, cfg.head_dim)
    assert hlo.count(cache_shape) > 0, "the cache buffers are not in this program"
    copy_of_cache = re.compile(r"= " + re.escape(cache_shape) + r"\{[^}]*\} copy\(")
    return [line for line in hlo.splitlines() if copy_of_cache.search(line)]


def test_compiled_decode_loop_never_copies_the_cache(model):
    _, params, cfg = model
    sampling = SamplingParams.create(0.0, 0, 1.0, 1.0)
    cache = engine.new_cache(cfg, 1, 128)
    state = engine.prefill_and_sample(params, jnp.zeros((1, 16), jnp.int32), jnp.asarray([16]), cache, sampling,
                                      engine.make_rng(0), jnp.asarray([-1]), cfg=cfg)
    hlo = engine.decode_chunk.lower(params, state, sampling, jnp.asarray([-1]), jnp.int32(8), cfg=cfg,
                                    chunk=8).compile().as_text()
    assert _cache_copies(hlo, cfg, 128) == []


@struct.dataclass
class _AttendAfterWrite(ContiguousKVCache):
    """The pattern the segment exists to avoid: attention reads the buffer the step just wrote."""

    def append(self, layer, k, v, positions):
        cache, _ = super().append(layer, k, v, positions)
        return cache, (KVPart(cache.k[layer], cache.v[layer], positions + 1, query_offset=-1),)


def test_copy_check_catches_a_loop_that_copies_the_cache(model):
    """Positive control for the check above: a decode loop attending over the just-written cache."""
    _, params, cfg = model
    cache = engine.new_cache(cfg, 1, 128)
    cache = _AttendAfterWrite(k=cache.k, v=cache.v)

    @jax.jit
    def loop(params, cache):
        def body(i, carry):
            cache, token = carry
            logits, cache = llama.decode(params, cfg, token, jnp.reshape(16 + i, (1,)), cache)
            return cache, jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return jax.lax.fori_loop(0, 8, body, (cache, jnp.zeros((1,), jnp.int32)))

    assert len(_cache_copies(loop.lower(params, cache).compile().as_text(), cfg, 128)) > 0
