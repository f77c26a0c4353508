"""Our Llama/Qwen2/Mistral forward, prefill, decode and greedy generation against transformers.

transformers' PyTorch models are the oracle: float32 logits must agree to 1e-4 for the whole-sequence
forward, for a cached prefill and for every single-token decode step (Mistral's prompts are longer
than its sliding window), and greedy generation (with and without a repetition penalty) must be
token-identical to `model.generate`.
"""

from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import GenerationConfig

from ruvllm_jax.backend.jax_backend import JaxBackend
from ruvllm_jax.cache import ContiguousKVCache
from ruvllm_jax.models import llama, loader
from ruvllm_jax.testing import build_hf_model, rng_tokens, save_hf_model
from ruvllm_jax.types import GenerateParams, ModelConfig, Precision

ATOL = 1e-4
SEQ = 24  # > 3x Mistral's sliding window of 8
PREFIX = 6  # tokens prefilled before decoding the rest one at a time

# Jitted once per family (cfg is static): eager op-by-op dispatch would compile every primitive.
_forward = jax.jit(lambda params, tokens, cfg: llama.forward(params, cfg, tokens), static_argnames="cfg")
_decode = jax.jit(lambda params, tok, pos, cache, cfg: llama.decode(params, cfg, tok, pos, cache),
                  static_argnames="cfg")


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.float().numpy()


def hf_greedy(model, ids: list[int], n: int, repetition_penalty: float = 1.0) -> list[int]:
    """HF greedy continuation, cut before its first EOS (ours excludes EOS)."""
    gen_cfg = GenerationConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, do_sample=False,
                               max_new_tokens=n, repetition_penalty=repetition_penalty)
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), generation_config=gen_cfg)[0, len(ids):].tolist()
    return out[: out.index(1)] if 1 in out else out


@pytest.fixture(scope="module")
def loaded(hf_model_dir):
    kind, model, folder = hf_model_dir
    cfg = loader.load_config(folder)
    return kind, model, folder, cfg, loader.load_params(folder, cfg)


@pytest.fixture(scope="module")
def backend(hf_model_dir):
    kind, model, folder = hf_model_dir
    b = JaxBackend.new()
    b.load_model(folder)
    return b


def test_config_reads_the_family_specifics(loaded):
    kind, model, _, cfg, params = loaded
    assert cfg.model_type == kind
    assert cfg.head_dim == (24 if kind == "mistral" else 16)
    assert cfg.sliding_windows == ((8, 8) if kind == "mistral" else (None, None))
    assert cfg.attention_bias == (kind == "qwen2")
    assert cfg.tie_word_embeddings == (kind == "qwen2")
    assert ("lm_head" in params) == (kind != "qwen2")
    assert cfg.rope_type == ("llama3" if kind == "llama" else "default")


def test_forward_logits_match_transformers(loaded):
    _, model, _, cfg, params = loaded
    tokens = rng_tokens(SEQ, seed=1)
    ours = np.asarray(_forward(params, jnp.asarray(tokens), cfg=cfg))
    np.testing.assert_allclose(ours, hf_logits(model, tokens), atol=ATOL, rtol=0)


def test_prefill_then_each_decode_step_matches_transformers(loaded):
    _, model, _, cfg, params = loaded
    tokens = rng_tokens(SEQ, seed=2)
    ref = hf_logits(model, tokens)[0]
    cache = ContiguousKVCache.init(num_layers=cfg.num_layers, batch=1, num_kv_heads=cfg.num_kv_heads,
                                   head_dim=cfg.head_dim, max_len=32)
    logits, cache = llama.prefill(params, cfg, jnp.asarray(tokens[:, :PREFIX]), cache)
    np.testing.assert_allclose(np.asarray(logits[0]), ref[:PREFIX], atol=ATOL, rtol=0)
    for pos in range(PREFIX, SEQ):
        step, cache = _decode(params, jnp.asarray(tokens[:, pos]), jnp.asarray([pos]), cache, cfg=cfg)
        np.testing.assert_allclose(np.asarray(step[0]), ref[pos], atol=ATOL, rtol=0, err_msg=f"decode at {pos}")


def test_prefill_logit_positions_pick_the_last_real_token(loaded):
    _, model, _, cfg, params = loaded
    tokens = rng_tokens(16, seed=3)
    ref = hf_logits(model, tokens[:, :11])[0, -1]
    padded = tokens.copy()
    padded[:, 11:] = 0  # padding after the real tokens must not leak into causal logits
    logits, _ = llama.prefill(params, cfg, jnp.asarray(padded), None, logit_positions=jnp.asarray([10]))
    assert logits.shape == (1, cfg.vocab_size)
    np.testing.assert_allclose(np.asarray(logits[0]), ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_greedy_generation_is_token_identical(hf_model_dir, backend, penalty):
    _, model, _ = hf_model_dir
    ids = [0] + rng_tokens(9, seed=4)[0].tolist()
    ours = backend.generate_tokens(ids, GenerateParams(max_tokens=32, temperature=0.0, repetition_penalty=penalty))
    expected = hf_greedy(model, ids, 32, penalty)
    assert ours == expected
    assert len(ours) >= 8  # a too-early EOS would make this comparison weak


def _long_greedy_matches(model, folder: str, chunk: int) -> None:
    b = JaxBackend.new()
    b.load_model(folder)
    b.decode_chunk_size = chunk
    b.eos_token_ids = ()  # compare all 120 tokens: transformers is told of no EOS either
    ids = [0] + rng_tokens(9, seed=8)[0].tolist()
    ours = b.generate_tokens(ids, GenerateParams(max_tokens=120, temperature=0.0, repetition_penalty=1.0))
    gen_cfg = GenerationConfig(bos_token_id=0, pad_token_id=1, do_sample=False, max_new_tokens=120)
    model_eos = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = None  # generate() would fill an unset EOS in from here
    try:
        with torch.no_grad():
            expected = model.generate(torch.tensor([ids]), generation_config=gen_cfg)[0, len(ids):].tolist()
    finally:
        model.generation_config.eos_token_id = model_eos
    assert len(expected) == 120
    assert ours == expected


def test_long_greedy_generation_across_decode_chunks_is_token_identical(hf_model_dir):
    """120 new tokens: three full 32-token decode chunks and a partial one (segments opened and
    closed; for Mistral, the sliding window crossed many times)."""
    _, model, folder = hf_model_dir
    _long_greedy_matches(model, folder, chunk=32)


def test_long_greedy_generation_with_an_odd_decode_chunk_size(llama_dir):
    """A chunk of 7 puts segment boundaries at other positions (the bookkeeping is family-independent)."""
    model, folder = llama_dir
    _long_greedy_matches(model, folder, chunk=7)


# Relative to the largest |logit|: transformers computing every op in the half dtype vs ours, which
# stores the weights in it and computes in float32 (bf16 keeps 8 mantissa bits, fp16 11).
BF16_NATIVE_TOL, FP16_NATIVE_TOL = 0.05, 0.01


def _half_precision_matches(model, folder: str, precision, torch_dtype, jax_dtype, native_tol: float) -> None:
    b = JaxBackend.new()
    b.load_model(folder, ModelConfig(quantization=precision))
    assert {x.dtype for x in jax.tree_util.tree_leaves(b.params)} == {jnp.dtype(jax_dtype)}
    tokens = rng_tokens(SEQ, seed=9)
    ours = np.asarray(_forward(b.params, jnp.asarray(tokens), cfg=b.config))
    # The same rounded weights computed in float32 by transformers: what we compute.
    rounded = copy.deepcopy(model).to(torch_dtype).float()
    np.testing.assert_allclose(ours, hf_logits(rounded, tokens), atol=ATOL, rtol=0)
    # The rounding is real (not a float32 load in disguise) ...
    assert np.abs(ours - hf_logits(model, tokens)).max() > ATOL
    # ... and transformers computing natively in that dtype agrees within its own rounding.
    native = hf_logits(copy.deepcopy(model).to(torch_dtype), tokens)
    assert np.abs(ours - native).max() < native_tol * np.abs(native).max()
    ids = [0] + rng_tokens(9, seed=4)[0].tolist()
    greedy = GenerateParams(max_tokens=24, temperature=0.0, repetition_penalty=1.0)
    assert b.generate_tokens(ids, greedy) == hf_greedy(rounded, ids, 24)


def test_bf16_storage_matches_transformers(hf_model_dir):
    """bf16, what the embedded model ships in, on every family."""
    _, model, folder = hf_model_dir
    _half_precision_matches(model, folder, Precision.BF16, torch.bfloat16, jnp.bfloat16, BF16_NATIVE_TOL)


def test_fp16_storage_matches_transformers(llama_dir):
    """fp16 on Llama: the storage cast does not depend on the family."""
    model, folder = llama_dir
    _half_precision_matches(model, folder, Precision.FP16, torch.float16, jnp.float16, FP16_NATIVE_TOL)


def test_linear_rope_scaling_matches_transformers(tmp_path):
    model = build_hf_model("llama", seed=5, rope_scaling={"rope_type": "linear", "factor": 2.0})
    folder = save_hf_model(model, str(tmp_path))
    cfg = loader.load_config(folder)
    assert cfg.rope_type == "linear"
    params = loader.load_params(folder, cfg)
    tokens = rng_tokens(SEQ, seed=6)
    ours = np.asarray(_forward(params, jnp.asarray(tokens), cfg=cfg))
    np.testing.assert_allclose(ours, hf_logits(model, tokens), atol=ATOL, rtol=0)
    # The scaling must matter at all: unscaled RoPE gives other logits.
    plain = build_hf_model("llama", seed=5, rope_scaling=None)
    assert np.abs(hf_logits(plain, tokens) - ours).max() > 10 * ATOL


def test_default_rope_matches_transformers(tmp_path):
    model = build_hf_model("llama", seed=7, rope_scaling=None)
    folder = save_hf_model(model, str(tmp_path))
    cfg = loader.load_config(folder)
    assert cfg.rope_type == "default"
    tokens = rng_tokens(SEQ, seed=8)
    ours = np.asarray(_forward(loader.load_params(folder, cfg), jnp.asarray(tokens), cfg=cfg))
    np.testing.assert_allclose(ours, hf_logits(model, tokens), atol=ATOL, rtol=0)


@pytest.mark.parametrize("kind, overrides", [
    ("qwen2", dict(use_sliding_window=True, sliding_window=8, max_window_layers=1)),  # mixed layers
    ("llama", dict(attention_bias=True, mlp_bias=True, rope_scaling=None)),  # o_proj and MLP biases
    ("llama", dict(head_dim=32, num_key_value_heads=1, tie_word_embeddings=True, rope_scaling=None)),
], ids=["qwen2-window-layers", "llama-biases", "llama-mqa-tied-wide-head"])
def test_config_variants_match_transformers(tmp_path, kind, overrides):
    model = build_hf_model(kind, seed=9, **overrides)
    folder = save_hf_model(model, str(tmp_path))
    cfg = loader.load_config(folder)
    tokens = rng_tokens(SEQ, seed=10)
    ours = np.asarray(_forward(loader.load_params(folder, cfg), jnp.asarray(tokens), cfg=cfg))
    np.testing.assert_allclose(ours, hf_logits(model, tokens), atol=ATOL, rtol=0)
