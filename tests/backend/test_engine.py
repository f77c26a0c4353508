"""The generation engine: bucketing, compile-once behaviour, batched decode against transformers, and
the shape checks that guard the pure model functions.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import GenerationConfig

from ruvllm_jax.backend import engine
from ruvllm_jax.backend.jax_backend import JaxBackend
from ruvllm_jax.backend.sampling import SamplingParams
from ruvllm_jax.cache import ContiguousKVCache
from ruvllm_jax.errors import ConfigError, GenerationError, KvCacheError
from ruvllm_jax.models import llama, loader
from ruvllm_jax.types import GenerateParams, ModelConfig

SAMPLED = GenerateParams(max_tokens=40, temperature=1.0, top_p=1.0, repetition_penalty=1.0, seed=7)


@pytest.mark.parametrize("prompt, max_tokens, ctx, expected", [
    (1, 1, 4096, (16, 64)),
    (16, 48, 4096, (16, 64)),
    (17, 10, 4096, (32, 64)),
    (16, 49, 4096, (16, 128)),
    (100, 100, 4096, (128, 256)),
    (100, 100, 200, (128, 200)),  # the cache never exceeds max_context
    (30, 2, 40, (32, 40)),
    (33, 2, 40, (40, 40)),  # nor does the prompt bucket exceed the cache
])
def test_buckets(prompt, max_tokens, ctx, expected):
    assert engine.buckets(prompt, max_tokens, ctx) == expected


def test_buckets_reject_empty_and_overlong_requests():
    with pytest.raises(GenerationError, match="no tokens"):
        engine.buckets(0, 10, 4096)
    with pytest.raises(GenerationError, match="4000 tokens \\+ max_tokens=100 = 4100 exceeds max_context=4096"):
        engine.buckets(4000, 100, 4096)


def odd_backend(llama_dir, max_context: int) -> JaxBackend:
    """An odd max_context caps every cache at that many positions, a shape no other test compiles,
    so the compile counts below start from a known state whatever ran before."""
    _, folder = llama_dir
    b = JaxBackend.new()
    b.load_model(folder, ModelConfig(max_context=max_context))
    return b


def test_prompts_in_one_bucket_compile_once(llama_dir):
    backend = odd_backend(llama_dir, 60)
    greedy = GenerateParams(max_tokens=3, temperature=0.0)
    size = engine.prefill_slots._cache_size()
    backend.generate_tokens([0] + list(range(5, 10)), greedy)  # 6 tokens -> bucket 16
    assert engine.prefill_slots._cache_size() == size + 1
    backend.generate_tokens([0] + list(range(5, 17)), greedy)  # 13 tokens -> same bucket
    assert engine.prefill_slots._cache_size() == size + 1
    # The first sampled request compiles the whole sampler once (greedy steps compile only the
    # argmax); no sampling value compiles anything after it.
    backend.generate_tokens([0] + list(range(5, 17)), greedy.replace(temperature=0.8, top_k=5, seed=1))
    assert engine.prefill_slots._cache_size() == size + 2
    backend.generate_tokens([0] + list(range(5, 15)), greedy.replace(temperature=0.3, top_p=0.6, seed=2))
    assert engine.prefill_slots._cache_size() == size + 2
    backend.generate_tokens([0] + list(range(5, 25)), greedy)  # 21 tokens -> bucket 32: one compile
    assert engine.prefill_slots._cache_size() == size + 3


def test_streaming_decode_compiles_once(llama_dir):
    backend = odd_backend(llama_dir, 59)
    before = engine.generate_slots._cache_size()
    pieces = []
    backend.generate_stream("To be", SAMPLED, pieces.append)  # one decode_chunk call per token
    assert engine.generate_slots._cache_size() == before + 1
    assert len(pieces) >= 20
    backend.generate("To be", SAMPLED)  # chunked: same executable (the limit is traced)
    backend.generate("To be, or not", SAMPLED.replace(max_tokens=12, seed=3))
    assert engine.generate_slots._cache_size() == before + 1


def test_batched_engine_matches_transformers_greedy(llama_dir):
    """Two prompts of different lengths in one padded batch each continue exactly as HF greedy."""
    model, folder = llama_dir
    cfg = loader.load_config(folder)
    params = loader.load_params(folder, cfg)
    prompts = [[0, 5, 9, 33, 77, 120, 7], [0, 250, 13]]
    n = 12
    tokens = np.zeros((2, 16), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
    lengths = jnp.asarray([len(p) for p in prompts], jnp.int32)
    eos = jnp.asarray([1], jnp.int32)
    sampling = SamplingParams.create()
    state = engine.prefill_and_sample(params, jnp.asarray(tokens), lengths, engine.new_cache(cfg, 2, 64), sampling,
                                      engine.make_rng(0), eos, cfg=cfg)
    first = np.asarray(state.token)
    state, out, count = engine.decode_chunk(params, state, sampling, eos, jnp.int32(n - 1), cfg=cfg, chunk=16)
    assert int(count) == n - 1
    out = np.asarray(out)
    assert (out[:, n - 1:] == -1).all()  # the limit stopped the loop
    gen_cfg = GenerationConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, do_sample=False, max_new_tokens=n)
    for i, p in enumerate(prompts):
        with torch.no_grad():
            ref = model.generate(torch.tensor([p]), generation_config=gen_cfg)[0, len(p):].tolist()
        ours = [int(first[i])] + out[i, : n - 1].tolist()
        if 1 in ref:  # HF stops at EOS; our finished rows stay frozen and report -1
            ref = ref[: ref.index(1) + 1]
        assert ours[: len(ref)] == ref


def test_decode_shape_checks_fire(backend):
    cfg, params = backend.config, backend.params
    cache = engine.new_cache(cfg, 1, 64)
    with pytest.raises(AssertionError):  # chex: positions must be [B]
        llama.decode(params, cfg, jnp.asarray([5]), jnp.asarray([[3]]), cache)
    with pytest.raises(AssertionError):  # chex: positions must match the batch
        llama.decode(params, cfg, jnp.asarray([5]), jnp.asarray([3, 4]), cache)
    with pytest.raises(AssertionError):  # chex: prefill attention output [B, S, H, D]
        llama.prefill(params, cfg, jnp.zeros((1, 4), jnp.int32), engine.new_cache(cfg, 2, 64))


def test_cache_misuse_is_a_kv_cache_error(backend):
    cfg, params = backend.config, backend.params
    with pytest.raises(KvCacheError, match="max_len=0"):
        ContiguousKVCache.init(num_layers=2, batch=1, num_kv_heads=2, head_dim=16, max_len=0)
    small = engine.new_cache(cfg, 1, 8)
    with pytest.raises(KvCacheError, match="prompt of 12 tokens does not fit a cache of 8"):
        llama.prefill(params, cfg, jnp.zeros((1, 12), jnp.int32), small)


def test_seeds_make_distinct_keys():
    keys = {tuple(np.asarray(jax.random.key_data(engine.make_rng(s))).ravel()) for s in (0, 1, 2**32, 2**40 + 1)}
    assert len(keys) == 4
    assert np.array_equal(jax.random.key_data(engine.make_rng(5)), jax.random.key_data(engine.make_rng(5)))


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(0, 2**64 - 1), min_size=1, max_size=5))
def test_make_rngs_equals_make_rng_per_seed(seeds):
    """The batched, one-program keys of a prefill are jax's own `fold_in(key(low), high)` per seed."""
    keys = engine.make_rngs(seeds)
    chex.assert_shape(keys, (len(seeds),))
    want = np.stack([np.asarray(jax.random.key_data(jax.random.fold_in(jax.random.key(s & 0xFFFFFFFF), s >> 32)))
                     for s in seeds])
    np.testing.assert_array_equal(np.asarray(jax.random.key_data(keys)), want)
    np.testing.assert_array_equal(np.asarray(jax.random.key_data(keys)),
                                  np.stack([np.asarray(jax.random.key_data(engine.make_rng(s))) for s in seeds]))


def test_make_rngs_draws_fresh_entropy_for_none_and_refuses_bad_seeds():
    a, b = np.asarray(jax.random.key_data(engine.make_rngs([None, None])))
    assert not np.array_equal(a, b)
    for bad in (2**64, -1, True, 5.0, "5"):
        with pytest.raises(ConfigError, match=r"seed must be None or an int in \[0, 2\*\*64\)"):
            engine.make_rngs([1, bad])
