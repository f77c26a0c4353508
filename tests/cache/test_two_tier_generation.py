"""Generation on the two-tier cache: exact with a float store, close with Q8, bounded memory, no copies.

The oracle is the default contiguous cache (itself exact against transformers in
tests/models/test_llama_parity.py) and the model's own full-sequence forward; the decode loop's
compiled HLO is checked for per-step copies of the tail and store buffers.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import struct

from ruvllm_jax import GenerateParams, JaxBackend, KvCacheConfig, KvCacheError, ModelConfig, Precision
from ruvllm_jax.backend import engine
from ruvllm_jax.backend.sampling import SamplingParams
from ruvllm_jax.cache.two_tier import TwoTierKVCache
from ruvllm_jax.models import llama

GREEDY = GenerateParams(max_tokens=48, temperature=0.0)
TEXT_STARTS = (1000, 50000, 200000)


def _kv(tail=Precision.FP32, store=Precision.FP32, **kw):
    base = dict(tail_length=16, migration_batch=16, max_tokens=512, tail_precision=tail, store_precision=store)
    return KvCacheConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def plain():
    b = JaxBackend()
    b.load_model()
    b.eos_token_ids = ()
    return b


@pytest.fixture(scope="module")
def prompts(plain):
    from ruvllm_jax.training.data import read_text

    text = read_text(str(Path(__file__).parents[2] / "data" / "tinyshakespeare.txt"))
    tok = plain.tokenizer()
    return [tok.encode(text[s:s + 2000])[:160] for s in TEXT_STARTS]


def _backend(kv: KvCacheConfig) -> JaxBackend:
    b = JaxBackend()
    b.load_model(config=ModelConfig(kv_cache_config=kv))
    b.eos_token_ids = ()
    return b


def test_float_store_generates_the_plain_cache_tokens(plain, prompts):
    """160-token prompts with a 16-token tail: nine blocks in the store, several migrating while
    decoding; an FP32 tail and store lose nothing, so greedy tokens are identical."""
    two_tier = _backend(_kv())
    for ids in prompts:
        assert two_tier.generate_tokens(ids, GREEDY) == plain.generate_tokens(ids, GREEDY)


def test_q8_store_matches_or_diverges_only_at_a_near_tie(plain, prompts):
    """Q8 (FP16 tail) keeps greedy text, or departs from it only where the exact model's two best
    logits were within 0.25 of each other (a rounding-level tie, not a quality loss)."""
    q8 = _backend(_kv(tail=Precision.FP16, store=Precision.Q8))
    identical = 0
    for ids in prompts:
        ref, out = plain.generate_tokens(ids, GREEDY), q8.generate_tokens(ids, GREEDY)
        if out == ref:
            identical += 1
            continue
        i = next(i for i, (a, b) in enumerate(zip(out, ref, strict=True)) if a != b)
        logits = llama.forward(plain.params, plain.config, jnp.asarray([ids + ref[:i]]))[0, -1]
        margin = float(logits[ref[i]] - logits[out[i]])
        assert 0 <= margin < 0.25, (i, margin)
    assert identical >= 2  # measured: 2 of 3 prompts identical for 48 tokens


def test_long_generation_runs_in_the_bounded_cache(plain):
    """Past its capacity the cache evicts old blocks and keeps going, its memory fixed; with
    eviction off the same request is refused before any work."""
    kv = _kv(tail=Precision.FP16, store=Precision.Q4, max_tokens=96, num_sink_tokens=4)
    b = _backend(kv)
    ids = plain.tokenizer().encode("ROMEO:\nBut soft, what light through yonder window breaks?")
    out = b.generate_tokens(ids, GenerateParams(max_tokens=200, temperature=0.0))
    assert len(out) == 200
    spec = engine.two_tier_spec(b.config, kv)
    assert spec.capacity < len(ids) + 200
    cache_bytes = b.memory_stats().cache_bytes
    assert cache_bytes == TwoTierKVCache.init(spec, num_layers=b.config.num_layers, batch=1).nbytes()
    contiguous = 2 * b.config.num_layers * b.config.num_kv_heads * b.config.head_dim * 256 * 4
    assert cache_bytes < contiguous / 4  # what the plain cache would take for these 256-position buckets
    strict = _backend(kv.replace(eviction=False))
    with pytest.raises(KvCacheError, match="eviction off"):
        strict.generate_tokens(ids, GenerateParams(max_tokens=200, temperature=0.0))


def test_sliding_window_models_are_refused(tmp_path):
    from ruvllm_jax.testing import build_hf_model, save_hf_model

    folder = save_hf_model(build_hf_model("mistral"), str(tmp_path))
    b = JaxBackend()
    with pytest.raises(KvCacheError, match="sliding-window"):
        b.load_model(folder, ModelConfig(kv_cache_config=_kv()))
    assert not b.is_loaded()


def _copies(hlo: str, shapes: list[str]) -> list[str]:
    pattern = re.compile(r"= (" + "|".join(re.escape(s) for s in shapes) + r")\{[^}]*\} copy\(")
    return [line for line in hlo.splitlines() if pattern.search(line)]


def _decode_hlo(backend, kv, cache_cls=TwoTierKVCache):
    params, cfg = backend.params, backend.config
    cache = engine.new_cache(cfg, 1, 512, kv_cache_config=kv)
    cache = cache_cls(layers=cache.layers, length=cache.length, spec=cache.spec)
    sampling = SamplingParams.create(0.0, 0, 1.0, 1.0)
    state = engine.prefill_and_sample(params, jnp.zeros((1, 16), jnp.int32), jnp.asarray([16]), cache, sampling,
                                      engine.make_rng(0), jnp.asarray([-1]), cfg=cfg)
    return engine.decode_chunk.lower(params, state, sampling, jnp.asarray([-1]), jnp.int32(8), cfg=cfg,
                                     chunk=8).compile().as_text()


def _buffer_shapes(backend, kv) -> list[str]:
    cfg = backend.config
    spec = engine.two_tier_spec(cfg, kv)
    tail = f"f16[{cfg.num_kv_heads},{spec.tail_blocks},{spec.block},{cfg.head_dim}]"
    store = f"u8[{cfg.num_kv_heads},{spec.slots},{spec.block},{cfg.head_dim // 2}]"
    return [tail, store]


@struct.dataclass
class _UntiedTwoTier(TwoTierKVCache):
    """The pattern `write(after=...)` exists to avoid: the write not tied to attention's reads."""

    def write(self, layer, k, v, positions, after=None):
        return super().write(layer, k, v, positions, after=None)


def test_compiled_decode_loop_never_copies_tail_or_store(plain):
    kv = _kv(tail=Precision.FP16, store=Precision.Q4, tail_length=64, migration_batch=32)
    hlo = _decode_hlo(plain, kv)
    shapes = _buffer_shapes(plain, kv)
    for s in shapes:
        assert hlo.count(s) > 0, f"{s} is not in the program"
    assert _copies(hlo, shapes) == []


def test_copy_check_catches_an_untied_write(plain):
    """Positive control for the check above."""
    kv = _kv(tail=Precision.FP16, store=Precision.Q4, tail_length=64, migration_batch=32)
    assert _copies(_decode_hlo(plain, kv, _UntiedTwoTier), _buffer_shapes(plain, kv))


def test_teacher_forced_decode_through_the_float_cache_equals_forward(plain, prompts):
    """Every decode step of the two-tier cache (FP32) reproduces the full forward's logits."""
    params, cfg = plain.params, plain.config
    ids = prompts[0][:80]
    ref = np.asarray(llama.forward(params, cfg, jnp.asarray([ids]))[0])
    cache = engine.new_cache(cfg, 1, 512, kv_cache_config=_kv())
    logits, cache = llama.prefill(params, cfg, jnp.asarray([ids[:40] + [0] * 24]), cache,
                                  lengths=jnp.asarray([40]), logit_positions=jnp.asarray([39]))
    np.testing.assert_allclose(np.asarray(logits[0]), ref[39], atol=1e-4)
    step = jax.jit(llama.decode, static_argnums=1)
    for p in range(40, 80):
        logits, cache = step(params, cfg, jnp.asarray([ids[p]]), jnp.asarray([p]), cache)
        np.testing.assert_allclose(np.asarray(logits[0]), ref[p], atol=1e-4)


@pytest.mark.parametrize("store", [Precision.Q8, Precision.Q4])
def test_pallas_kernels_read_the_tiers_like_the_jnp_path(store):
    """Both tiers through the Pallas kernels (interpret mode: the paged kernel for the tail, the
    quantized one for the store) give what the jnp path gives."""
    from ruvllm_jax.cache.two_tier import TwoTierKvCache
    from ruvllm_jax.kernels import KernelOptions

    kv = KvCacheConfig(tail_length=16, migration_batch=16, max_tokens=80, num_kv_heads=2, head_dim=32,
                       num_sink_tokens=2, store_precision=store)
    rng = np.random.default_rng(3)
    keys, values = rng.normal(size=(2, 70, 2, 32)).astype(np.float32)
    q = rng.normal(size=(4, 32)).astype(np.float32)
    outs = []
    for kernel in (KernelOptions(impl="jnp"), KernelOptions(impl="pallas", interpret=True)):
        cache = TwoTierKvCache(kv, kernel=kernel)
        cache.append(keys, values)
        outs.append(np.asarray(cache.attend(q, 0.2)))
    np.testing.assert_allclose(outs[1], outs[0], atol=2e-5, rtol=2e-5)


def test_model_cache_stats_per_sequence_equal_the_one_layer_facade():
    """The model's cache reports, per sequence, what RuvLLM's one-layer cache holding the same
    tokens reports, bytes summed over layers; its size needs no allocation (eval_shape)."""
    import jax

    from ruvllm_jax.cache import two_tier as tt

    kv = KvCacheConfig(tail_length=8, migration_batch=4, max_tokens=40, num_kv_heads=2, head_dim=8,
                       num_sink_tokens=2, store_precision=Precision.Q4)
    spec = tt.TwoTierSpec.from_config(kv)
    keys = np.random.default_rng(0).normal(size=(2, 30, 2, 8)).astype(np.float32)
    cache = tt.TwoTierKVCache.init(spec, num_layers=3, batch=2)
    assert jax.eval_shape(lambda: tt.TwoTierKVCache.init(spec, num_layers=3, batch=2)).nbytes() == cache.nbytes()
    fill = jax.jit(lambda c, k, n: functools.reduce(lambda c, i: c.write_prompt(i, k, -k, n), range(3), c))
    cache = fill(cache, jnp.asarray(keys), jnp.asarray([30, 11]))
    for b, n in enumerate((30, 11)):
        one = tt.TwoTierKvCache(kv)
        one.append(keys[b, :n], -keys[b, :n])
        want = one.stats()
        got = cache.stats(b)
        assert got.total_tokens == want.total_tokens == n
        assert (got.tail_bytes, got.store_bytes, got.sink_bytes) == (3 * want.tail_bytes, 3 * want.store_bytes,
                                                                     3 * want.sink_bytes)
        np.testing.assert_array_equal(np.asarray(tt.get_all_kv(cache.sequence(1, b))[0]),
                                      np.asarray(tt.get_all_kv(one.state)[0]))
