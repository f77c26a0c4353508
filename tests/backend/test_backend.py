"""`JaxBackend` as users see it: loading state, text generation, streaming, seeds, stops, EOS, stats.

One tiny random Llama (from the shared fixture) serves every test; prompts stay within one prompt
bucket and one cache bucket so the whole module compiles the engine only once.
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import pytest

from ruvllm_jax.backend import engine
from ruvllm_jax.backend.base import LlmBackend
from ruvllm_jax.backend.jax_backend import JaxBackend
from ruvllm_jax.errors import (
    ConfigError,
    GenerationError,
    InvalidOperationError,
    ModelError,
    NotFoundError,
    TokenizationError,
)
from ruvllm_jax.types import DeviceType, GenerateParams, ModelConfig, ModelSize, Precision

PROMPT = "To be, or not to be"
SAMPLED = GenerateParams(max_tokens=40, temperature=1.0, top_p=1.0, repetition_penalty=1.0, seed=1234)
GREEDY = GenerateParams(max_tokens=32, temperature=0.0, repetition_penalty=1.0)


def stream_pieces(backend, prompt, params, stop_after=None):
    pieces = []

    def callback(piece):
        pieces.append(piece)
        return None if stop_after is None or len(pieces) < stop_after else False

    backend.generate_stream(prompt, params, callback)
    return pieces


def test_unloaded_backend_refuses_to_generate():
    b = JaxBackend.new()
    assert not b.is_loaded() and b.model_info() is None and b.tokenizer() is None
    assert b.memory_stats().params_bytes == 0
    for call in (lambda: b.generate("hi"), lambda: b.generate_tokens([0, 5]),
                 lambda: b.generate_stream("hi", None, print), lambda: b.params):
        with pytest.raises(InvalidOperationError, match="load_model"):
            call()


def test_unload_forgets_the_model_and_a_reload_generates_the_same(backend, llama_dir):
    _, folder = llama_dir
    b = JaxBackend.new()
    b.load_model(folder)
    ids = b.tokenizer().encode(PROMPT)
    first = b.generate_tokens(ids, GREEDY)
    b.unload()
    assert not b.is_loaded() and b.model_info() is None and b.tokenizer() is None
    assert b.memory_stats().params_bytes == 0
    with pytest.raises(InvalidOperationError, match="load_model"):
        b.generate_tokens(ids, GREEDY)
    b.load_model(folder)
    assert b.generate_tokens(ids, GREEDY) == first == backend.generate_tokens(ids, GREEDY)


def test_a_folder_without_tokenizer_generates_token_ids(backend, llama_dir, tmp_path):
    _, folder = llama_dir
    bare = tmp_path / "bare"
    shutil.copytree(folder, bare)
    os.remove(bare / "tokenizer.json")
    b = JaxBackend.new()
    b.load_model(str(bare))
    assert b.tokenizer() is None
    ids = backend.tokenizer().encode(PROMPT)
    assert b.generate_tokens(ids, GREEDY) == backend.generate_tokens(ids, GREEDY)
    with pytest.raises(TokenizationError, match="no tokenizer.json; pass token ids to generate_tokens"):
        b.generate(PROMPT, GREEDY)


def test_adapters_setter_attaches_and_detaches(llama_dir):
    from ruvllm_jax.lora import MicroLoRA

    _, folder = llama_dir
    b = JaxBackend.new()
    b.load_model(folder)
    ids = b.tokenizer().encode(PROMPT)
    plain = b.generate_tokens(ids, GREEDY)
    lora = MicroLoRA.for_model(b.config, rank=2, seed=0)
    keys = iter(jax.random.split(jax.random.PRNGKey(1), 64))
    lora.state = lora.state.replace(
        params=jax.tree.map(lambda p: p + 0.5 * jax.random.normal(next(keys), p.shape), lora.state.params))
    b.adapters = lora
    assert b.adapters is not None and set(b.adapters) == set(lora.adapters)
    adapted = b.generate_tokens(ids, GREEDY)
    assert adapted != plain  # large random adapters change the greedy text
    b.adapters = lora.adapters  # a plain pytree works the same
    assert b.generate_tokens(ids, GREEDY) == adapted
    b.adapters = None
    assert b.adapters is None and b.generate_tokens(ids, GREEDY) == plain


def test_backend_satisfies_the_protocol_and_devices(backend):
    assert isinstance(backend, LlmBackend)
    assert backend.is_loaded()
    assert backend.device() == DeviceType.best() == DeviceType.Cpu
    cpu = JaxBackend.with_device(DeviceType.Cpu)
    assert cpu.device() == DeviceType.Cpu and not cpu.is_loaded()
    with pytest.raises(ConfigError, match="cuda:0"):
        JaxBackend.with_device(DeviceType.Cuda(0))


def test_model_info_describes_the_hf_model(backend, llama_dir):
    model, folder = llama_dir
    info = backend.model_info()
    hf = model.config
    assert info.num_parameters == sum(p.numel() for p in model.parameters())
    assert info.size is ModelSize.Tiny and info.architecture == "llama"
    assert (info.hidden_size, info.num_layers, info.num_heads, info.num_kv_heads, info.head_dim, info.vocab_size) == (
        hf.hidden_size, hf.num_hidden_layers, hf.num_attention_heads, hf.num_key_value_heads, 16, hf.vocab_size)
    # ModelConfig's default 4096 is capped by the positions the model knows (max_position_embeddings).
    assert info.max_context == hf.max_position_embeddings == 256
    assert info.dtype == "float32" and info.quantization is Precision.FP32
    assert info.path == os.path.abspath(folder) and info.name == os.path.basename(folder)


def test_memory_stats_count_real_bytes(backend, llama_dir):
    model, _ = llama_dir
    backend.generate(PROMPT, GREEDY.replace(max_tokens=4))
    stats = backend.memory_stats()
    assert stats.params_bytes == 4 * sum(p.numel() for p in model.parameters())
    cfg = model.config
    # prompt + 4 tokens -> the smallest cache bucket (64 positions), K and V, every layer, f32.
    assert stats.cache_bytes == 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * 64 * 16 * 4
    assert stats.total_bytes == stats.params_bytes + stats.cache_bytes and stats.device == str(backend.device())


@pytest.mark.parametrize("hf_model_dir", ["qwen2"], indirect=True)
def test_tied_embeddings_count_once(hf_model_dir):
    kind, model, folder = hf_model_dir
    assert kind == "qwen2" and model.config.tie_word_embeddings
    b = JaxBackend.new()
    b.load_model(folder)
    n = sum(p.numel() for p in model.parameters())  # torch deduplicates the tied weight
    assert b.model_info().num_parameters == n and b.memory_stats().params_bytes == 4 * n


def test_streaming_pieces_concatenate_to_generate(backend):
    pieces = stream_pieces(backend, PROMPT, SAMPLED)
    text = backend.generate(PROMPT, SAMPLED)
    assert len(pieces) > 10 and all(pieces)
    assert "".join(pieces) == text


def test_a_seed_reproduces_the_text(backend):
    assert backend.generate(PROMPT, SAMPLED) == backend.generate(PROMPT, SAMPLED)
    assert backend.generate(PROMPT, SAMPLED) != backend.generate(PROMPT, SAMPLED.replace(seed=99))


def test_without_a_seed_draws_differ(backend):
    texts = {backend.generate(PROMPT, SAMPLED.replace(seed=None, max_tokens=16)) for _ in range(5)}
    assert len(texts) > 1


def test_stop_sequence_ends_output_before_it(backend):
    full = backend.generate(PROMPT, SAMPLED)
    stop = full[12:15]
    assert len(stop) == 3
    expected = full[: full.find(stop)]
    params = SAMPLED.replace(stop_sequences=(stop,))
    assert backend.generate(PROMPT, params) == expected
    pieces = stream_pieces(backend, PROMPT, params)
    assert "".join(pieces) == expected
    assert not any(stop in p for p in pieces)
    # Of several stops, the earliest in the text wins; a stop that never occurs changes nothing.
    other = full[20:22]
    both = SAMPLED.replace(stop_sequences=(other, stop))
    assert backend.generate(PROMPT, both) == full[: min(full.find(stop), full.find(other))]
    assert backend.generate(PROMPT, SAMPLED.replace(stop_sequences=("\x00never\x00",))) == full


def test_callback_returning_false_stops_the_stream(backend):
    all_pieces = stream_pieces(backend, PROMPT, SAMPLED)
    stopped = stream_pieces(backend, PROMPT, SAMPLED, stop_after=3)
    assert len(all_pieces) > 3 and stopped == all_pieces[:3]


def test_zero_max_tokens_gives_empty_text(backend):
    assert backend.generate(PROMPT, GREEDY.replace(max_tokens=0)) == ""
    assert backend.generate_tokens([0, 5, 6], GREEDY.replace(max_tokens=0)) == []


def test_model_eos_ends_generation(backend, llama_dir, tmp_path):
    _, folder = llama_dir
    ids = backend.tokenizer().encode(PROMPT)
    greedy = backend.generate_tokens(ids, GREEDY)
    k = next(i for i in range(4, len(greedy)) if greedy[i] not in greedy[:i])  # first new token from #5 on
    copy = str(tmp_path / "m")
    shutil.copytree(folder, copy)
    with open(os.path.join(copy, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": 0, "eos_token_id": greedy[k]}, f)  # one id: same shapes, no recompile
    b = JaxBackend.new()
    b.load_model(copy)
    assert b.generate_tokens(ids, GREEDY) == greedy[:k]
    assert b.generate(PROMPT, GREEDY) == b.tokenizer().decode(greedy[:k])
    assert "".join(stream_pieces(b, PROMPT, GREEDY)) == b.tokenizer().decode(greedy[:k])
    assert b.eos_token_ids == (greedy[k],)
    b.eos_token_ids = ()  # what the benchmarks do to decode every requested token
    assert b.generate_tokens(ids, GREEDY) == greedy
    with pytest.raises(ConfigError, match=r"eos_token_ids must be token ids in \[0, 384\), got \(-1,\)"):
        b.eos_token_ids = (-1,)
    assert b.eos_token_ids == ()


def test_prompt_plus_max_tokens_beyond_context_fails_before_any_work(llama_dir):
    _, folder = llama_dir
    b = JaxBackend.new()
    b.load_model(folder, ModelConfig(max_context=64))
    params_before, stats_before = b.params, b.memory_stats()
    compiled = engine.prefill_slots._cache_size()
    ids = [0] + list(range(5, 15))
    with pytest.raises(GenerationError, match=r"11 tokens \+ max_tokens=60 = 71 exceeds max_context=64"):
        b.generate_tokens(ids, GREEDY.replace(max_tokens=60))
    with pytest.raises(GenerationError, match="max_context=64"):
        b.generate(PROMPT, GREEDY.replace(max_tokens=60))
    calls = []
    with pytest.raises(GenerationError, match="max_context=64"):
        b.generate_stream(PROMPT, GREEDY.replace(max_tokens=60), calls.append)
    assert calls == []  # nothing was streamed
    assert engine.prefill_slots._cache_size() == compiled  # nothing was traced or compiled
    assert b.params is params_before and b.memory_stats() == stats_before


def test_quantized_load_replaces_the_model_and_a_float_reload_restores_it(backend):
    before = backend.model_info()
    b = JaxBackend()
    b.load_model(before.path, ModelConfig(quantization=Precision.Q4K))
    info = b.model_info()
    # 64-column rows are no whole Q4_K super-block: Q5_0, as llama.cpp falls back.
    assert info.quantization is Precision.Q4K and "Q5_0" in info.dtype.split("+")
    assert b.memory_stats().params_bytes < 0.5 * backend.memory_stats().params_bytes
    b.load_model(before.path)
    assert b.model_info() == before


def test_failed_load_on_another_device_keeps_the_device(backend, monkeypatch, tmp_path):
    # Pretend a CUDA device exists (it maps to the CPU) so a load can ask to move there and fail.
    cpu = jax.devices("cpu")[0]
    monkeypatch.setattr(DeviceType, "to_jax", lambda self: cpu)
    b = JaxBackend.with_device(DeviceType.Cpu)
    b.load_model(backend.model_info().path)
    before = b.model_info()
    with pytest.raises(NotFoundError):
        b.load_model(str(tmp_path / "missing" / "model"), ModelConfig(device=DeviceType.Cuda(0)))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + bytes(60))  # a file that fails after the path resolved
    with pytest.raises(ModelError):
        b.load_model(str(bad), ModelConfig(device=DeviceType.Cuda(0)))
    assert b.device() == DeviceType.Cpu and b.model_info() == before
    b.load_model(before.path, ModelConfig(device=DeviceType.Cuda(0)))
    assert b.device() == DeviceType.Cuda(0)  # a successful load does switch


def test_bad_prompts_are_tokenization_errors(backend):
    for bad in (123, b"bytes", None):
        with pytest.raises(TokenizationError, match=type(bad).__name__):
            backend.generate(bad, GREEDY)
    with pytest.raises(TokenizationError, match="384"):
        backend.generate_tokens([0, 384], GREEDY)
    with pytest.raises(TokenizationError, match="-1"):
        backend.generate_tokens([0, -1], GREEDY)
    with pytest.raises(GenerationError, match="no tokens"):
        backend.generate_tokens([], GREEDY)


def test_bf16_storage_keeps_params_in_bf16(llama_dir):
    _, folder = llama_dir
    b = JaxBackend.new()
    b.load_model(folder, ModelConfig(quantization=Precision.BF16))
    leaves = jax.tree_util.tree_leaves(b.params)
    assert all(x.dtype == jax.numpy.bfloat16 for x in leaves)
    assert b.memory_stats().params_bytes == 2 * b.model_info().num_parameters
    assert b.model_info().dtype == "bfloat16" and b.model_info().quantization is Precision.BF16


def test_max_context_is_capped_by_the_models_position_limit(llama_dir):
    _, folder = llama_dir
    b = JaxBackend.new()
    with pytest.raises(InvalidOperationError, match="no model is loaded"):
        b.max_context()
    b.load_model(folder, ModelConfig(max_context=100_000))
    assert b.max_context() == 256 == b.model_info().max_context
    with pytest.raises(GenerationError, match="exceeds max_context=256"):
        b.generate_tokens([0, 5, 6], GREEDY.replace(max_tokens=254))
    b.load_model(folder, ModelConfig(max_context=64))
    assert b.max_context() == 64


def test_use_flash_attention_false_selects_the_jnp_attention_path(llama_dir, monkeypatch):
    """ModelConfig.use_flash_attention picks the kernels' dispatch; False forces impl="jnp"."""
    _, folder = llama_dir
    seen = []
    real = engine.prefill_slots

    def spy(*args, **kwargs):
        seen.append(kwargs["config"].kernel.impl)
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "prefill_slots", spy)
    for flag in (True, False):
        b = JaxBackend.new()
        b.load_model(folder, ModelConfig(use_flash_attention=flag))
        b.generate_tokens([0, 5, 6], GREEDY.replace(max_tokens=2))
    assert seen == ["auto", "jnp"]


def test_load_model_checks_its_arguments_before_any_work(backend, llama_dir):
    import pathlib

    _, folder = llama_dir
    b = JaxBackend.new()
    b.load_model(pathlib.Path(folder))  # an os.PathLike is a path
    before = (b.model_info(), b.device(), b.params)
    for bad, match in ((123, "model_id_or_path must be a str, an os.PathLike or None, got int 123"),
                       (b"/tmp/model", "got bytes"), ("", "non-empty"), ([folder], "got list")):
        with pytest.raises(ConfigError, match=match):
            b.load_model(bad)
    for bad in ({"max_context": 64}, {}, "fp32", Precision.FP16):  # {} used to mean the defaults
        with pytest.raises(ConfigError, match=r"config must be a ModelConfig; pass ModelConfig\(\.\.\.\)"):
            b.load_model(folder, bad)
    assert (b.model_info(), b.device(), b.params) == before
    with pytest.raises(ConfigError, match="model_id must be a str"):
        b.download_model(None)
    with pytest.raises(ConfigError, match="quantization must be None or a Precision"):
        b.download_model("org/model", quantization="q4")


def test_backend_setters_and_constructors_check_types(backend):
    for bad in ("cpu", 0, jax.devices("cpu")[0]):
        with pytest.raises(ConfigError, match="device must be a DeviceType"):
            JaxBackend.with_device(bad)
    b = JaxBackend.new()
    for bad in (0, -1, 2.0, True, "32", None):
        with pytest.raises(ConfigError, match="decode_chunk_size must be an int >= 1"):
            b.decode_chunk_size = bad
    assert b.decode_chunk_size == engine.DEFAULT_CHUNK
    eos = backend.eos_token_ids
    for bad in (5, None, "ab", [1.0], [True], {1: 2}):
        with pytest.raises(ConfigError, match="eos_token_ids must be token ids"):
            backend.eos_token_ids = bad
    assert backend.eos_token_ids == eos
