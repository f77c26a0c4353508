"""The layer scan: a cached prefill or decode over native-quantized layers runs consecutive alike layers
as one `lax.scan`, and gives the same bits as the unrolled loop.

The oracle is the unrolled loop over the default (tuple) cache, itself checked against transformers
in tests/models and tests/backend (whose GGUF tests now run the engine's scan). Here every layer has
its own formats (the scan's kernel call picks each layer's blocks and format by the traced index)
and one layer a different structure (a fused weight split into parts, as Q4_K_M files give), which
must break the scan into runs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ruvllm_jax.backend import engine
from ruvllm_jax.cache import ContiguousKVCache
from ruvllm_jax.cache.segmented import SegmentedKVCache
from ruvllm_jax.errors import ConfigError
from ruvllm_jax.kernels import KernelOptions
from ruvllm_jax.models import llama
from ruvllm_jax.models.config import LlamaConfig
from ruvllm_jax.quant.formats import quantize
from ruvllm_jax.quant.matmul import native_available

# Only the stacked cache's own test runs without the native kernel (CI builds it, so all of these run there).
needs_native = pytest.mark.skipif(not native_available(), reason="the layer scan runs only with the native kernel")

CFG = LlamaConfig(vocab_size=96, hidden_size=256, intermediate_size=512, num_layers=6, num_heads=4, num_kv_heads=2,
                  head_dim=64, max_position_embeddings=128, attention_bias=True, bos_token_id=0, eos_token_ids=(1,))
# per layer: the format of wqkv / w_gate_up / w_down; layer 3 stores wqkv as (q+k, v) parts
FORMATS = ["Q8_0", "Q4_K", "Q6_K", "Q8_0", "Q5_0", "Q4_1"]
SCAN = KernelOptions(layer_scan=True)  # over a stacked cache (the tuple layout never scans)
UNROLLED = KernelOptions(layer_scan=False)


@pytest.fixture(scope="module")
def params():
    p = llama.init_params(CFG, jax.random.PRNGKey(3), std=0.05)
    layers = []
    for i, lp in enumerate(p["layers"]):
        lp = dict(lp, bqkv=jax.random.normal(jax.random.PRNGKey(10 + i), lp["bqkv"].shape) * 0.1)
        for name in ("wqkv", "w_gate_up", "w_down", "wo"):
            w = np.asarray(lp[name])
            if name == "wqkv" and i == 3:
                split = CFG.q_size + CFG.kv_size
                lp[name] = (quantize(w[:split], "Q8_0"), quantize(w[split:], "Q6_K"))
            else:
                lp[name] = quantize(w, "Q8_0" if name == "wo" else FORMATS[i])
        layers.append(lp)
    return dict(p, layers=tuple(layers))


@needs_native
def test_runs_split_at_a_layer_of_another_structure(params):
    cache = engine.new_cache(CFG, 1, 32, stacked=True)
    assert llama.layers_scan(params, CFG)
    assert llama._layer_runs(params, CFG, 0, 6, engine.new_cache(CFG, 1, 32), None, SCAN) == [(0, 6, False)]
    assert llama._layer_runs(params, CFG, 0, 6, cache, None, SCAN) == [(0, 3, True), (3, 4, False), (4, 6, True)]
    assert llama._layer_runs(params, CFG, 0, 6, cache, None, UNROLLED) == [(0, 6, False)]
    # no scan without a cache (training differentiates that pass), with adapters, or on the jnp path
    assert llama._layer_runs(params, CFG, 0, 6, None, None, SCAN) == [(0, 6, False)]
    adapters = {"layers": tuple({} for _ in range(6))}
    assert llama._layer_runs(params, CFG, 0, 6, cache, adapters, SCAN) == [(0, 6, False)]
    assert llama._layer_runs(params, CFG, 0, 6, cache, None, KernelOptions(quantized_matmul="jnp")) == [(0, 6, False)]
    # float matrices would have to be stacked (a second copy): never scanned
    floats = llama.init_params(CFG, jax.random.PRNGKey(0))
    assert llama._layer_runs(floats, CFG, 0, 6, cache, None, SCAN) == [(0, 6, False)]
    assert not llama.layers_scan(floats, CFG)
    with pytest.raises(ConfigError, match="layer_scan stacks a contiguous"):
        engine.EngineConfig(layer_scan=True)  # the paged layout


def _prefill(params, tokens, cache, kernel, lengths=None):
    return jax.jit(lambda p, t, c: llama.prefill(p, CFG, t, c, kernel=kernel, lengths=lengths))(params, tokens, cache)


def _decode(params, tokens, positions, cache, kernel):
    return jax.jit(lambda p, t, pos, c: llama.decode(p, CFG, t, pos, c, kernel=kernel))(params, tokens, positions,
                                                                                       cache)


@needs_native
@pytest.mark.parametrize("batch", [1, 2])
def test_scan_gives_the_unrolled_loops_bits_through_prefill_segments_and_contiguous_decode(params, batch):
    tokens = jnp.asarray(np.random.default_rng(batch).integers(2, CFG.vocab_size, (batch, 8)), jnp.int32)
    outs = {}
    for name, kernel, stacked in (("scan", SCAN, True), ("stacked", UNROLLED, True), ("tuple", SCAN, False)):
        cache = engine.new_cache(CFG, batch, 32, stacked=stacked)
        logits, cache = _prefill(params, tokens, cache, kernel)
        seen = [logits, cache.k, cache.v]
        seg = SegmentedKVCache.open(cache, jnp.full((batch,), 8), 4)
        for j in range(3):
            logits, seg = _decode(params, jnp.full((batch,), 5 + j), jnp.full((batch,), 8 + j), seg, kernel)
            seen.append(logits)
        cache = seg.close()
        logits, cache = _decode(params, jnp.full((batch,), 9), jnp.full((batch,), 11), cache, kernel)
        seen += [logits, cache.k, cache.v]
        outs[name] = [np.asarray(x) for x in seen[:1]] + [np.stack(x) if isinstance(x, tuple) else np.asarray(x)
                                                          for x in seen[1:]]
    assert np.abs(outs["tuple"][0]).max() > 0
    for other in ("scan", "stacked"):
        for got, want in zip(outs[other], outs["tuple"], strict=True):
            np.testing.assert_array_equal(got, want)


@needs_native
def test_scanned_programs_hold_one_body_per_run(params):
    """The point of the scan: the compiled decode step has one copy of each run's layer body."""
    cache = engine.new_cache(CFG, 1, 32, stacked=True)

    def program(kernel):
        step = jax.jit(lambda p, t, pos, c: llama.decode(p, CFG, t, pos, c, kernel=kernel))
        return step.lower(params, jnp.zeros((1,), jnp.int32), jnp.zeros((1,), jnp.int32), cache).compile().as_text()

    scanned, unrolled = program(SCAN), program(UNROLLED)
    calls = lambda text: text.count("custom-call(")  # noqa: E731 (one native product per linear)
    # unrolled: 4 linears x 6 layers (layer 3's wqkv in two parts); scanned: one body per run
    assert calls(unrolled) == 4 * 6 + 1
    assert calls(scanned) == 4 + (4 + 1) + 4
    assert " while(" in scanned and " while(" not in unrolled


def test_a_stacked_cache_takes_a_traced_layer():
    cache = ContiguousKVCache.init(num_layers=3, batch=2, num_kv_heads=2, head_dim=8, max_len=16, stacked=True)
    assert cache.k.shape == (3, 2, 2, 16, 8) and cache.num_layers == 3 and cache.max_len == 16 and cache.stacked
    assert not ContiguousKVCache.init(num_layers=3, batch=2, num_kv_heads=2, head_dim=8, max_len=16).stacked
    assert cache.nbytes() == 2 * 3 * 2 * 2 * 16 * 8 * 4
    k = jnp.ones((2, 5, 2, 8))
    written = cache.write_prompt(jnp.int32(1), k, 2 * k)  # a traced layer index, as inside the scan
    assert float(written.k[1, :, :, :5].min()) == 1.0 and float(written.v[1, :, :, :5].min()) == 2.0
    assert float(jnp.abs(written.k[0]).max()) == 0.0 and float(jnp.abs(written.k[2]).max()) == 0.0
    assert float(jnp.abs(written.k[1, :, :, 5:]).max()) == 0.0


@needs_native
def test_the_backend_scans_a_quantized_model_and_keeps_its_greedy_tokens(tmp_path, monkeypatch):
    """JaxBackend turns the scan on for native-quantized layers (and only then); the tokens are those
    of the unrolled engine (itself checked against transformers in tests/backend)."""
    from ruvllm_jax.backend import JaxBackend
    from ruvllm_jax.testing import build_hf_model, rng_tokens, save_hf_model
    from ruvllm_jax.types import GenerateParams, ModelConfig, Precision

    folder = save_hf_model(build_hf_model("qwen2", seed=2, num_hidden_layers=4), str(tmp_path))
    prompt = rng_tokens(9, seed=4)[0].tolist()
    greedy = GenerateParams(max_tokens=12, temperature=0.0, repetition_penalty=1.0)
    configs = []
    original = engine.EngineConfig.__post_init__

    def record(self):
        original(self)
        configs.append(self)

    monkeypatch.setattr(engine.EngineConfig, "__post_init__", record)
    backend = JaxBackend.new()
    backend.load_model(folder, ModelConfig(quantization=Precision.Q8))
    backend.eos_token_ids = ()
    scanned = backend.generate_tokens(prompt, greedy)
    assert configs[-1].layer_scan
    layers_scan = llama.layers_scan
    monkeypatch.setattr(llama, "layers_scan", lambda *a, **k: False)
    assert backend.generate_tokens(prompt, greedy) == scanned and not configs[-1].layer_scan
    monkeypatch.setattr(llama, "layers_scan", layers_scan)
    # A cache longer than LAYER_SCAN_MAX_LEN unrolls (the scan would copy each layer's keys per step).
    monkeypatch.setattr(engine, "LAYER_SCAN_MAX_LEN", configs[-1].max_len - 1)
    assert backend.generate_tokens(prompt, greedy) == scanned and not configs[-1].layer_scan
    monkeypatch.setattr(engine, "LAYER_SCAN_MAX_LEN", configs[-1].max_len)
    assert backend.generate_tokens(prompt, greedy) == scanned and configs[-1].layer_scan
    assert len(scanned) == 12
    floats = JaxBackend.new()
    floats.load_model(folder)
    floats.generate_tokens(prompt, greedy)
    assert not configs[-1].layer_scan  # f32 layers: the tuple cache, no scan
