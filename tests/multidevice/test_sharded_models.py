"""Sharded models on meshes of 8 virtual CPU devices against the same model on one device.

The one-device model is itself tested against transformers (tests/models, tests/backend); here every
mesh must give its logits (rtol = atol = 1e-5: the mesh sums partial products in another order) and
exactly its greedy tokens, for the embedded model (4 heads, 2 KV heads) and a random Qwen2 with 8
heads and 2 KV heads, whose KV heads are replicated once the model axis exceeds 2.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ruvllm_jax import ConfigError, GenerateParams, JaxBackend, ModelConfig, Precision
from ruvllm_jax.backend import engine as engine_mod
from ruvllm_jax.kernels import KernelOptions
from ruvllm_jax.models import llama, loader
from ruvllm_jax.models.config import LlamaConfig
from ruvllm_jax.quant import formats
from ruvllm_jax.quant.matmul import quantized_matmul, quantized_matmul_sharded
from ruvllm_jax.sharding import ModelSharding, make_mesh, per_device_bytes

EMBEDDED_MESHES = [(2, 4), (8, 1), (4, 2)]  # (1, 8): 4 heads cannot split over 8 (tested below)
QWEN_MESHES = [(1, 8), (2, 4), (8, 1)]
GREEDY = GenerateParams(max_tokens=20, temperature=0.0, repetition_penalty=1.0)


def _tokens(vocab: int, batch: int = 2, length: int = 12) -> jax.Array:
    return jnp.asarray(np.random.default_rng(0).integers(2, vocab, size=(batch, length)), jnp.int32)


def _forward(params, cfg, tokens, mesh=None, kernel=None):
    kernel = dataclasses.replace(kernel or KernelOptions(), mesh=mesh)
    return np.asarray(jax.jit(lambda p, t: llama.forward(p, cfg, t, kernel=kernel))(params, tokens))


def _model(kind, qwen2_dir):
    return None if kind == "embedded" else qwen2_dir[1]


CASES = [("embedded", m) for m in EMBEDDED_MESHES] + [("qwen2", m) for m in QWEN_MESHES]


@pytest.mark.parametrize("kind,mesh_shape", CASES)
def test_mesh_logits_and_greedy_tokens_equal_one_device(kind, mesh_shape, qwen2_dir, backends):
    path = _model(kind, qwen2_dir)
    one, sharded = backends(path, None), backends(path, mesh_shape)
    cfg = one.config
    tokens = _tokens(cfg.vocab_size)
    ref = _forward(one.params, cfg, tokens)
    got = _forward(sharded.params, cfg, tokens, sharded.mesh)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    prompt = [int(t) for t in np.asarray(tokens[0])]
    assert sharded.generate_tokens(prompt, GREEDY) == one.generate_tokens(prompt, GREEDY)
    if kind == "qwen2":  # and against the model we did not write
        with torch.no_grad():
            hf = qwen2_dir[0](torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits.numpy()
        np.testing.assert_allclose(got, hf, rtol=1e-4, atol=1e-4)


def test_heads_that_do_not_divide_the_model_axis_are_a_config_error(qwen2_dir):
    with pytest.raises(ConfigError, match=r"num_heads=4 .* model axis of 8"):
        JaxBackend().load_model(None, ModelConfig(mesh_shape=(1, 8)))
    cfg = LlamaConfig.from_hf_dict({**loader.hf_config_dict(loader.load_config(qwen2_dir[1])),
                                    "num_attention_heads": 6, "num_key_value_heads": 3, "head_dim": 16})
    with pytest.raises(ConfigError, match=r"num_kv_heads=3 and the mesh's model axis of 2"):
        ModelSharding.create(cfg, make_mesh((4, 2)))
    with pytest.raises(ConfigError, match=r"mesh_shape=\(4, 4\) needs 16 devices, only 8"):
        make_mesh((4, 4))
    with pytest.raises(ConfigError, match="mesh_shape must be"):
        ModelConfig(mesh_shape=(2, 0))


def _spec(x) -> tuple:
    """x's partition spec without trailing Nones (P() and P(None) are the same layout)."""
    spec = tuple(x.sharding.spec)
    while spec and spec[-1] is None:
        spec = spec[:-1]
    return spec


def _shard_rows(x) -> set:
    return {s.data.shape for s in x.addressable_shards}


def test_params_are_really_sharded_and_kv_heads_replicate_past_their_count(qwen2_dir, backends):
    path = qwen2_dir[1]
    cfg = backends(path, None).config
    b = backends(path, (1, 8))
    lp = b.params["layers"][0]
    wq, wk, wv = lp["wqkv"]
    assert wq.sharding.spec == P("model", None) and _shard_rows(wq) == {(cfg.q_size // 8, cfg.hidden_size)}
    # 2 KV heads cannot split over 8 devices: k and v (and the KV cache below) are on every device whole
    assert wk.sharding.spec == P() and _shard_rows(wk) == {(cfg.kv_size, cfg.hidden_size)}
    assert lp["wo"].sharding.spec == P(None, "model") and _shard_rows(lp["wo"]) == {(cfg.hidden_size, cfg.q_size // 8)}
    gate, up = lp["w_gate_up"]
    assert gate.sharding.spec == P("model", None) and lp["w_down"].sharding.spec == P(None, "model")
    assert b.params["embed"].sharding.spec == P("model", None)  # vocabulary over `model`
    per_device = b.params_bytes_per_device()
    assert len(per_device) == 8 and max(per_device.values()) < b.memory_stats().params_bytes / 3
    assert "mesh data=1 x model=8" in b.memory_stats().device
    # Params already in memory (one device, fused) move onto the mesh by the same rules.
    placed = ModelSharding.create(cfg, b.mesh).place_params(backends(path, None).params)
    assert _spec(placed["layers"][0]["wqkv"][0]) == ("model",) and _spec(placed["layers"][0]["wo"]) == (None, "model")
    tokens = _tokens(cfg.vocab_size)
    np.testing.assert_array_equal(_forward(placed, cfg, tokens, b.mesh), _forward(b.params, cfg, tokens, b.mesh))
    # On (4, 2) the 2 KV heads split over the model axis of 2.
    wk2 = backends(path, (4, 2)).params["layers"][0]["wqkv"][1]
    assert wk2.sharding.spec == P("model", None) and _shard_rows(wk2) == {(cfg.kv_size // 2, cfg.hidden_size)}


@pytest.mark.parametrize("mesh_shape,kv_split", [((1, 8), 1), ((4, 2), 2)])
def test_kv_cache_layout_heads_over_model_batch_over_data(mesh_shape, kv_split, qwen2_dir, backends):
    b = backends(qwen2_dir[1], mesh_shape)
    cfg, mesh = b.config, b.mesh
    layout = ModelSharding.create(cfg, mesh)
    cache = engine_mod.new_cache(cfg, batch=4, max_len=32)
    cache = jax.device_put(cache, layout.cache_shardings(cache))
    k0 = cache.k[0]  # [B, KVH, T, D]
    data = mesh_shape[0]
    assert k0.sharding.spec == P("data" if data > 1 else None, "model" if kv_split > 1 else None)
    stacked = engine_mod.new_cache(cfg, batch=4, max_len=32, stacked=True)  # [L, B, KVH, T, D]
    stacked = jax.device_put(stacked, layout.cache_shardings(stacked))
    assert stacked.k.sharding.spec == P(None, "data" if data > 1 else None, "model" if kv_split > 1 else None)
    per_device = per_device_bytes(cache)
    assert set(per_device.values()) == {cache.nbytes() // (data * kv_split)}
    # The paged pool (shared by all slots) splits only its heads.
    eng = engine_mod.Engine(cfg, engine_mod.EngineConfig(max_slots=4, max_len=64, kernel=KernelOptions(mesh=mesh)))
    state = eng.init_decode_state()
    assert _spec(state.cache.k[0]) == (("model",) if kv_split > 1 else ())
    assert _spec(state.token) == (("data",) if data > 1 else ())


def test_loading_places_every_weight_on_its_shards_never_whole_on_one_device(monkeypatch, qwen2_dir):
    """A mesh load gives each device only its slice: no whole weight goes to one device on the way."""
    placed_whole = []
    real = jax.device_put

    def spy(x, device=None, *a, **kw):
        if isinstance(x, np.ndarray) and x.ndim == 2 and not isinstance(device, NamedSharding):
            placed_whole.append(x.shape)
        return real(x, device, *a, **kw)

    monkeypatch.setattr(jax, "device_put", spy)
    slices = []
    real_cb = jax.make_array_from_callback

    def cb_spy(shape, sharding, callback, *a, **kw):
        def recorded(index):
            out = callback(index)
            slices.append((shape, sharding.spec, out.shape))
            return out

        return real_cb(shape, sharding, recorded, *a, **kw)

    monkeypatch.setattr(jax, "make_array_from_callback", cb_spy)
    b = JaxBackend()
    b.load_model(qwen2_dir[1], ModelConfig(mesh_shape=(1, 8)))
    assert placed_whole == []
    split = [(shape, got) for shape, spec, got in slices if "model" in tuple(spec)]
    assert len(split) >= 5 * b.config.num_layers * 8  # q, o, gate, up, down of every layer, on 8 devices
    for shape, got in split:  # a split weight reaches each device as its eighth, never whole
        assert np.prod(got) * 8 == np.prod(shape), (shape, got)
    whole = {shape for shape, spec, got in slices if "model" not in tuple(spec)}
    assert whole <= {(b.config.kv_size, b.config.hidden_size), (b.config.hidden_size,), (b.config.q_size,),
                     (b.config.kv_size,), (b.config.q_size + 2 * b.config.kv_size,)}  # k, v, norms, biases


def test_quantized_model_on_a_mesh_runs_the_native_kernel_per_shard(backends):
    one = backends(None, None, quantization=Precision.Q8)
    sharded = backends(None, (2, 4), quantization=Precision.Q8)
    wq = sharded.params["layers"][0]["wqkv"][0]
    assert wq.data.sharding.spec == P("model", None) and _shard_rows(wq.data) == {(64, wq.data.shape[1])}
    tokens, cfg, mesh = _tokens(one.config.vocab_size), one.config, sharded.mesh
    exact = KernelOptions(quantized_matmul="jnp")  # f32 products: the mesh changes only the summation order
    np.testing.assert_allclose(_forward(sharded.params, cfg, tokens, mesh, exact), _forward(one.params, cfg, tokens,
                               None, exact), rtol=1e-5, atol=1e-5)
    # The native kernel rounds each activation row to 8 bits, so the ~1e-6 the mesh's all-reduces move
    # a residual can flip a code: its logits stay within that rounding's reach of one device's.
    ref = _forward(one.params, cfg, tokens)
    np.testing.assert_allclose(_forward(sharded.params, cfg, tokens, mesh), ref, atol=0.01 * np.ptp(ref))
    prompt = [int(t) for t in np.asarray(tokens[0])]
    assert sharded.generate_tokens(prompt, GREEDY) == one.generate_tokens(prompt, GREEDY)
    # The product itself: equal to the one-device kernel, with no all-gather of the weight's bytes.
    w = formats.quantize(np.random.default_rng(1).standard_normal((64, 96)).astype(np.float32), "Q8_0")
    w_mesh = jax.device_put(w, NamedSharding(mesh, P("model", None)))
    x = jnp.asarray(np.random.default_rng(2).standard_normal((4, 96)), jnp.float32)
    f = jax.jit(lambda x, w: quantized_matmul_sharded(x, w, mesh, "auto"))
    np.testing.assert_allclose(np.asarray(f(x, w_mesh)), np.asarray(quantized_matmul(x, w)), rtol=1e-6, atol=1e-6)
    hlo = f.lower(x, w_mesh).compile().as_text()
    assert not re.search(r"u8\[[^\]]*\][^\n]*all-gather", hlo)
    # The control: the bare native call on sharded bytes makes XLA gather them onto every device.
    bare = jax.jit(lambda x, w: quantized_matmul(x, w, impl="native")).lower(x, w_mesh).compile().as_text()
    assert re.search(r"u8\[[^\]]*\][^\n]*all-gather", bare)


@pytest.mark.parametrize("kind,mesh_shape", [("embedded", (2, 4)), ("qwen2", (2, 4))])
def test_batched_engine_runs_sharded_and_compiles_once(kind, mesh_shape, qwen2_dir, backends):
    path = _model(kind, qwen2_dir)
    one, sharded = backends(path, None), backends(path, mesh_shape)
    prompts = [[int(t) for t in row] for row in np.asarray(_tokens(one.config.vocab_size, batch=6, length=9))]
    prompts = [p[: 4 + i] for i, p in enumerate(prompts)]  # different lengths

    def run(backend):
        server = backend.serving_engine()
        rids = [server.add_request(p, GREEDY) for p in prompts]
        out = server.run()
        return [out[r] for r in rids], server

    want, _ = run(one)
    got, server = run(sharded)
    assert got == want
    state = server._state  # noqa: SLF001 - the layout of the state the engine kept
    assert _spec(state.token) == ("data",)
    compiles.clear()
    assert run(sharded)[0] == want
    assert compiles == []  # the second engine reuses every executable: the layout held across steps


compiles: list = []  # XLA compilations since cleared (jax.monitoring has no way to unregister)
jax.monitoring.register_event_duration_secs_listener(
    lambda event, secs, **kw: compiles.append(event) if event == "/jax/core/compile/backend_compile_duration" else None)


def test_sona_deep_step_and_micro_lora_run_sharded(backends):
    from ruvllm_jax.lora import AdaptFeedback, MicroLoRA
    from ruvllm_jax.sona import SonaLlm, SonaLlmConfig, TrainingSample
    from ruvllm_jax.sona.config import TrainingConfig

    def deep(backend):
        sona = SonaLlm(SonaLlmConfig(fisher_samples=0, training=TrainingConfig(batch_size=4, epochs=1, kl_lambda=0.0)),
                       backend=backend)
        sona.estimate_fisher(["I say the night is come.", "Good morrow, my lord!"])
        sona.instant_adapt("ROMEO:\nWhat say you?\n", "I say the night is come.", 1.0)
        res = sona.deep_optimize([TrainingSample("ROMEO:\nWhat say you?\n", "Good night, my lord.", 0.9)] * 4)
        assert res.applied
        text = backend.generate("ROMEO:", GREEDY)
        backend.detach_adapters()
        return sona, text

    one, sharded = backends(None, None), backends(None, (2, 4))
    ref, ref_text = deep(one)
    got, text = deep(sharded)
    assert text == ref_text
    assert [h["loss"] for h in got.last_training_history] == pytest.approx(
        [h["loss"] for h in ref.last_training_history], rel=1e-5)
    for a, b in zip(jax.tree.leaves(got.state.members), jax.tree.leaves(ref.state.members), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    b_q = got.state.members[0]["layers"][0]["q"]["B"]  # B [r, out] of q: its out columns over `model`
    assert b_q.sharding.spec == P(None, "model")
    # MicroLoRA: trained on the sharded params, attached, generating what it does on one device.
    texts = []
    for backend in (one, sharded):
        lora = MicroLoRA.for_model(backend.config, rank=2)
        ids = backend.tokenizer().encode("ROMEO: good night")
        lora.adapt_sequence(backend.params, ids[:3], ids[3:], AdaptFeedback(quality=1.0))
        lora.apply_updates(0.05)
        backend.attach_adapters(lora)
        texts.append(backend.generate("ROMEO:", GREEDY))
        backend.detach_adapters()
    assert texts[0] == texts[1]


def test_a_gguf_loads_onto_the_mesh_and_two_tier_cache_generates_sharded(tmp_path, backends):
    """A Q8_0 GGUF keeps its blocks split over `model`; the two-tier quantized cache decodes on a mesh."""
    from ruvllm_jax.models import gguf_io
    from ruvllm_jax.types import KvCacheConfig

    one = backends(None, None)
    path = str(tmp_path / "m.gguf")
    gguf_io.save_gguf(one.params, one.config, path, qtype="Q8_0", tokenizer=one.tokenizer(),
                      eos_token_ids=one.eos_token_ids)
    ref, mesh = JaxBackend(), JaxBackend()
    ref.load_model(path)
    mesh.load_model(path, ModelConfig(mesh_shape=(2, 2)))
    wq = mesh.params["layers"][0]["wqkv"][0]
    assert wq.qtype == "Q8_0" and _spec(wq.data) == ("model",) and _shard_rows(wq.data) == {(128, wq.data.shape[1])}
    assert mesh.generate("ROMEO:", GREEDY) == ref.generate("ROMEO:", GREEDY)
    kv = KvCacheConfig(tail_length=32, migration_batch=16, max_tokens=128)
    long = GREEDY.replace(max_tokens=60)  # past the tail: tokens migrate into the quantized store
    two_tier = backends(None, (2, 2), kv_cache_config=kv)
    assert two_tier.generate("ROMEO:", long) == backends(None, None, kv_cache_config=kv).generate("ROMEO:", long)


def test_sessions_and_sampled_requests_on_a_mesh_equal_one_device(backends):
    """A two-turn session (the second turn prefills only its new tokens, through the paged blocks),
    and seeded sampled requests beside a greedy one (the whole sampler's program, which greedy-only
    steps never compile), give one device's tokens on a 2x2 mesh."""
    one, sharded = backends(None, None), backends(None, (2, 2))
    tok = one.tokenizer()
    first, second = tok.encode("ROMEO:"), tok.encode("\nJULIET:", add_special_tokens=False)
    sampled = GenerateParams(max_tokens=12, temperature=0.8, top_k=40, top_p=0.9, repetition_penalty=1.1, seed=11)

    def run(backend):
        with backend.session() as s:
            reply1 = s.generate_tokens(first, GREEDY)
            before = s.prefilled_tokens
            reply2 = s.generate_tokens(second, GREEDY)
            fed = s.prefilled_tokens - before
        server = backend.serving_engine()
        rids = [server.add_request(first, p) for p in (sampled, GREEDY, sampled.replace(seed=12))]
        out = server.run()
        return reply1, reply2, fed, [out[r] for r in rids]

    want, got = run(one), run(sharded)
    assert got == want
    assert want[2] == len(second) + (len(want[0]) == GREEDY.max_tokens)  # only the new turn was prefilled
    assert want[3][0] != want[3][2]  # two seeds, two draws: the sampler really sampled
