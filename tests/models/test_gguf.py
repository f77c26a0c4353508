"""GGUF files: our writer checked by transformers' GGUF loader, our loader by gguf's reader.

References we did not write: transformers' own models (the original logits), transformers'
`from_pretrained(gguf_file=...)` and `AutoTokenizer` GGUF paths (which reverse llama.cpp's q/k
permutation themselves), `gguf.GGUFReader` + `gguf.quants.dequantize`, and the original
tokenizer.json. Hand-written files (mixed types, missing tensors, ...) are made with `gguf.GGUFWriter`.
"""

from __future__ import annotations

import dataclasses
import os
import warnings

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as tf
from tokenizers import (
    AddedToken,
    Regex,
    SentencePieceBPETokenizer,
    Tokenizer,
    decoders,
    models,
    pre_tokenizers,
    processors,
    trainers,
)
from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

from ruvllm_jax.errors import ConfigError, ModelError
from ruvllm_jax.models import gguf_io, llama, loader
from ruvllm_jax.quant import formats
from ruvllm_jax.quant.tensor import QuantizedTensor
from ruvllm_jax.testing import TEXT, build_hf_model, rng_tokens, save_hf_model
from ruvllm_jax.types import Precision

TEXTS = [
    "Hello world", "To be, or not to be, that is the question", "  leading spaces,   runs\n\n\ttabs \r\n end  ",
    "Grüße, naïve café — 日本語のテキスト 🙂🚀", "<s>special</s> inside <s> text", "", " ", "don't you'll I'M 12345",
]
Q = gguf.GGMLQuantizationType


def reverse_permute(w: np.ndarray, heads: int, kv_heads: int) -> np.ndarray:
    """transformers' un-permutation of llama.cpp's attn_q / attn_k rows (an implementation we did not write)."""
    return LlamaTensorProcessor()._reverse_permute_weights(w, heads, kv_heads)


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.float().numpy()


def gguf_model(folder: str, file: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tf.AutoModelForCausalLM.from_pretrained(folder, gguf_file=file).eval()


def dequantized(w):
    """A params weight as float32: QuantizedTensors dequantized, tuples concatenated."""
    if isinstance(w, tuple):
        return np.concatenate([dequantized(p) for p in w])
    if isinstance(w, QuantizedTensor):
        return formats.dequantize(QuantizedTensor(np.asarray(w.data), w.qtype, w.shape))
    return np.asarray(w, np.float32)


def float_params(params):
    weight = lambda x: isinstance(x, QuantizedTensor) or (isinstance(x, tuple) and not isinstance(x[0], dict))  # noqa: E731
    return jax.tree.map(dequantized, params, is_leaf=weight)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """kind -> (transformers model, folder with config/safetensors/tokenizer and an F32 `model.gguf`)."""
    out = {}
    for kind, kwargs in (("llama", dict(rope_scaling=None)), ("qwen2", {})):
        model = build_hf_model(kind, **kwargs)
        folder = save_hf_model(model, str(tmp_path_factory.mktemp(f"gguf_{kind}")))
        cfg = loader.load_config(folder)
        gguf_io.save_gguf(loader.load_params(folder, cfg), cfg, os.path.join(folder, "model.gguf"),
                          tokenizer=os.path.join(folder, "tokenizer.json"))
        out[kind] = model, folder
    return out


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """A llama whose every row length is a multiple of 256 (so Q4_K applies everywhere), with Q8_0 and Q4_K files."""
    model = build_hf_model("llama", hidden_size=256, intermediate_size=512, rope_scaling=None, seed=1)
    folder = save_hf_model(model, str(tmp_path_factory.mktemp("gguf_wide")))
    cfg = loader.load_config(folder)
    params = loader.load_params(folder, cfg)
    for qtype in ("Q8_0", "Q4_K"):
        gguf_io.save_gguf(params, cfg, os.path.join(folder, f"{qtype}.gguf"), qtype=qtype,
                          tokenizer=os.path.join(folder, "tokenizer.json"))
    return model, folder


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_f32_export_loads_in_transformers_and_back_exactly(exported, kind):
    model, folder = exported[kind]
    path = os.path.join(folder, "model.gguf")
    tokens = rng_tokens(11, seed=3)
    ref = hf_logits(model, tokens)
    theirs = hf_logits(gguf_model(folder, "model.gguf"), tokens)
    np.testing.assert_allclose(theirs, ref, atol=1e-5, rtol=0)  # our writer, permutation included

    cfg_ref = loader.load_config(folder)
    cfg, params, tok, eos = gguf_io.load_gguf(path)
    if os.path.exists("/proc/self/maps"):  # the reader's memory map of the file is gone: one copy of the weights
        assert os.path.realpath(path) not in open("/proc/self/maps").read()
    assert cfg == cfg_ref
    assert eos == (1,) and tok.eos_token_ids == (1,) and tok.bos_token_id == 0
    ref_params = loader.load_params(folder, cfg_ref)
    assert jax.tree.structure(params) == jax.tree.structure(ref_params)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params), strict=True):
        assert a.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    ours = np.asarray(llama.forward(params, cfg, jnp.asarray(tokens)))
    np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_K"])
def test_quantized_export_matches_gguf_reader_and_transformers(wide, qtype):
    model, folder = wide
    path = os.path.join(folder, f"{qtype}.gguf")
    cfg, params, _, _ = gguf_io.load_gguf(path)
    assert isinstance(params["embed"], QuantizedTensor) and params["embed"].qtype == qtype
    assert isinstance(params["layers"][0]["wqkv"], QuantizedTensor)  # one format throughout: fused
    assert params["layers"][0]["wqkv"].qtype == qtype and params["layers"][0]["attn_norm"].dtype == jnp.float32

    reader = gguf.GGUFReader(path)
    stored = {t.name: (t.tensor_type, gguf.quants.dequantize(t.data, t.tensor_type)) for t in reader.tensors}
    del reader
    assert {t for t, _ in stored.values() if t not in (Q.F32,)} == {getattr(Q, qtype)}
    h, kvh = cfg.num_heads, cfg.num_kv_heads
    for i, lp in enumerate(params["layers"]):
        get = lambda name: stored[f"blk.{i}.{name}.weight"][1]  # noqa: E731, B023
        q, k = reverse_permute(get("attn_q"), h, h), reverse_permute(get("attn_k"), h, kvh)
        np.testing.assert_array_equal(dequantized(lp["wqkv"]), np.concatenate([q, k, get("attn_v")]))
        np.testing.assert_array_equal(dequantized(lp["w_gate_up"]), np.concatenate([get("ffn_gate"), get("ffn_up")]))
        np.testing.assert_array_equal(dequantized(lp["w_down"]), get("ffn_down"))
        np.testing.assert_array_equal(dequantized(lp["wo"]), get("attn_output"))
        np.testing.assert_array_equal(np.asarray(lp["attn_norm"]), get("attn_norm"))
    np.testing.assert_array_equal(dequantized(params["embed"]), stored["token_embd.weight"][1])
    np.testing.assert_array_equal(dequantized(params["lm_head"]), stored["output.weight"][1])

    tokens = rng_tokens(9, seed=4)
    ref = hf_logits(model, tokens)
    theirs = hf_logits(gguf_model(folder, f"{qtype}.gguf"), tokens)
    rel = np.linalg.norm(theirs - ref) / np.linalg.norm(ref)
    assert rel < {"Q8_0": 0.03, "Q4_K": 0.35}[qtype], rel  # quantization error; a layout bug gives ~1.4
    ours = np.asarray(llama.forward(float_params(params), cfg, jnp.asarray(tokens)))
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)  # the same quantized weights, exactly
    # The blocks themselves; the native CPU kernel rounds activations to int8 blocks, as ggml does.
    ours_q = np.asarray(llama.forward(params, cfg, jnp.asarray(tokens)))
    assert np.linalg.norm(ours_q - theirs) / np.linalg.norm(theirs) < 0.05


def test_quantization_converts_every_weight_after_un_permuting(exported):
    """`quantization=` quantizes the (un-permuted) rows: the same blocks as quantizing load_params' weights."""
    _, folder = exported["llama"]
    cfg, params, _, _ = gguf_io.load_gguf(os.path.join(folder, "model.gguf"), quantization=Precision.Q8)
    ref = loader.load_params(folder, cfg)
    for key in ("wqkv", "wo", "w_gate_up", "w_down"):
        w = params["layers"][1][key]
        assert isinstance(w, QuantizedTensor) and w.qtype == "Q8_0"
        expected = formats.quantize(np.asarray(ref["layers"][1][key]), "Q8_0").data
        np.testing.assert_array_equal(np.asarray(w.data), expected)
    assert params["layers"][1]["attn_norm"].dtype == jnp.float32
    _, half, _, _ = gguf_io.load_gguf(os.path.join(folder, "model.gguf"), quantization=Precision.FP16)
    assert half["layers"][0]["wqkv"].dtype == jnp.float16 and half["embed"].dtype == jnp.float16
    np.testing.assert_array_equal(np.asarray(half["lm_head"]), np.asarray(ref["lm_head"]).astype(np.float16))


def test_q4_k_falls_back_to_q5_0_for_short_rows(exported, tmp_path):
    _, folder = exported["qwen2"]
    cfg = loader.load_config(folder)
    gguf_io.save_gguf(loader.load_params(folder, cfg), cfg, tmp_path / "q.gguf", qtype="Q4_K")
    f = gguf_io.read_gguf(tmp_path / "q.gguf")
    assert {t.type_name for t in f.tensors.values() if len(t.shape) == 2} == {"Q5_0"}  # rows of 64 and 128
    assert {t.type_name for t in f.tensors.values() if len(t.shape) == 1} == {"F32"}  # norms and biases
    assert f.metadata["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q4_K_M
    _, params, _, _ = gguf_io.load_gguf(tmp_path / "q.gguf")
    assert params["layers"][0]["wqkv"].qtype == "Q5_0"
    assert params["layers"][0]["bqkv"].shape == (cfg.q_size + 2 * cfg.kv_size,)


def test_bf16_export_loads_as_bfloat16(exported, tmp_path):
    _, folder = exported["qwen2"]
    cfg = loader.load_config(folder)
    ref = loader.load_params(folder, cfg)
    gguf_io.save_gguf(ref, cfg, tmp_path / "b.gguf", qtype="BF16")
    _, params, _, _ = gguf_io.load_gguf(tmp_path / "b.gguf")
    w = params["layers"][1]["w_gate_up"]
    assert w.dtype == jnp.bfloat16 and params["layers"][1]["bqkv"].dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(w), np.asarray(ref["layers"][1]["w_gate_up"]).astype(jnp.bfloat16))


def test_quantized_tensors_are_written_as_they_are(wide, tmp_path):
    """A Q8_0 load re-saved as Q8_0 keeps its bytes; saved as F32 it is the dequantized values."""
    _, folder = wide
    cfg, params, _, _ = gguf_io.load_gguf(os.path.join(folder, "Q8_0.gguf"))
    gguf_io.save_gguf(params, cfg, tmp_path / "again.gguf", qtype="Q8_0")
    gguf_io.save_gguf(params, cfg, tmp_path / "f32.gguf", qtype="F32")
    _, again, _, _ = gguf_io.load_gguf(tmp_path / "again.gguf")
    _, f32, _, _ = gguf_io.load_gguf(tmp_path / "f32.gguf")
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(again), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for a, c in zip(jax.tree.leaves(float_params(params)), jax.tree.leaves(float_params(f32)), strict=True):
        np.testing.assert_array_equal(a, c)


def test_llama3_rope_scaling_round_trips_through_rope_freqs(tmp_path):
    model = build_hf_model("llama")  # llama3 RoPE scaling: written as llama.cpp's rope_freqs tensor
    folder = save_hf_model(model, str(tmp_path / "m"))
    cfg_ref = loader.load_config(folder)
    gguf_io.save_gguf(loader.load_params(folder, cfg_ref), cfg_ref, tmp_path / "m.gguf", qtype="F16")
    assert "rope_freqs.weight" in gguf_io.read_gguf(tmp_path / "m.gguf").tensors
    cfg, params, tok, _ = gguf_io.load_gguf(tmp_path / "m.gguf")
    assert cfg.rope_type == "llama3" and tok is None
    np.testing.assert_allclose(cfg.inv_freq(), cfg_ref.inv_freq(), rtol=1e-6)
    assert params["layers"][0]["wqkv"].dtype == jnp.float16
    tokens = rng_tokens(10, seed=5)
    ours = np.asarray(llama.forward(params, cfg, jnp.asarray(tokens)))
    np.testing.assert_allclose(ours, hf_logits(model, tokens), atol=2e-3, rtol=0)  # F16 weights


@pytest.mark.parametrize("rope", [
    dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192),
    dict(factor=16.0, low_freq_factor=2.0, high_freq_factor=8.0, original_max_position_embeddings=64),
    dict(factor=4.0, low_freq_factor=1.0, high_freq_factor=1.5, original_max_position_embeddings=100),
])
def test_llama3_parameters_are_recovered_from_the_divisors(rope):
    """Only the divisors are stored; any llama3 parameters giving the same frequencies are a right answer."""
    md = {"general.architecture": "llama", "llama.embedding_length": 512, "llama.block_count": 1,
          "llama.feed_forward_length": 64, "llama.attention.head_count": 4, "llama.vocab_size": 10,
          "llama.attention.layer_norm_rms_epsilon": 1e-5, "llama.rope.freq_base": 500000.0}
    scaling = tuple(sorted({"rope_type": "llama3", **rope}.items()))
    cfg = dataclasses.replace(gguf_io.gguf_config(md), rope_scaling=scaling)
    factors = (dataclasses.replace(cfg, rope_scaling=()).inv_freq() / cfg.inv_freq()).astype(np.float32)
    got = gguf_io.gguf_config(md, rope_freqs=factors)
    assert got.rope_type == "llama3"
    np.testing.assert_allclose(got.inv_freq(), cfg.inv_freq(), rtol=1e-4)
    with pytest.raises(ModelError, match="rope_freqs"):
        gguf_io.gguf_config(md, rope_freqs=factors[::-1].copy())


def _check_tokenizer(folder: str, file: str, texts) -> None:
    orig = Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
    _, _, tok, _ = gguf_io.load_gguf(os.path.join(folder, file))
    built = gguf_io.tokenizer_from_gguf(gguf_io.read_gguf(os.path.join(folder, file)).metadata)
    theirs = tf.AutoTokenizer.from_pretrained(folder, gguf_file=file)
    for text in texts:
        for special in (True, False):
            ids = orig.encode(text, add_special_tokens=special).ids
            assert tok.encode(text, add_special_tokens=special) == ids, (text, special)
            assert built.encode(text, add_special_tokens=special).ids == ids, (text, special)
            assert theirs(text, add_special_tokens=special)["input_ids"] == ids, (text, special)
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids, skip_special_tokens=False) == orig.decode(ids, skip_special_tokens=False) == text


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_tokenizer_from_metadata_encodes_as_the_original(exported, kind):
    _check_tokenizer(exported[kind][1], "model.gguf", TEXTS)


def test_qwen2_style_tokenizer_with_added_tokens(exported, tmp_path):
    """Qwen2's split regex, control tokens and a non-special added token survive the round trip."""
    model, folder = exported["qwen2"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(gguf_io.PRE_TOKENIZER_SPLITS["qwen2"]), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=360, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([TEXT], trainer)
    tok.add_tokens([AddedToken("<think>", special=False, normalized=False)])
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    new = str(tmp_path / "qwen")
    save_hf_model(model, new)
    tok.save(os.path.join(new, "tokenizer.json"))
    cfg = loader.load_config(new)
    gguf_io.save_gguf(loader.load_params(new, cfg), cfg, os.path.join(new, "m.gguf"), tokenizer=tok,
                      eos_token_ids=[2, 0])
    md = gguf_io.read_gguf(os.path.join(new, "m.gguf")).metadata
    assert md["tokenizer.ggml.pre"] == "qwen2" and len(md["tokenizer.ggml.tokens"]) == cfg.vocab_size
    assert md["tokenizer.ggml.tokens"][-1] == f"[PAD{cfg.vocab_size - 1}]"
    assert md["tokenizer.ggml.token_type"][:3] == [3, 3, 3] and md["tokenizer.ggml.token_type"][360] == 4
    assert gguf_io.load_gguf(os.path.join(new, "m.gguf"))[3] == (2, 0)
    _check_tokenizer(new, "m.gguf", TEXTS + ["<|im_start|>user\nhi<|im_end|><think>ok</think><|endoftext|>"])


# -- hand-written files ----------------------------------------------------------------------------------


E, HEADS, KV, D, INTER, V = 256, 4, 2, 64, 512, 40


def _meta(w: gguf.GGUFWriter, arch: str = "llama", skip: str = "") -> None:
    w.add_context_length(128)
    w.add_embedding_length(E)
    if skip != "block_count":
        w.add_block_count(1)
    w.add_feed_forward_length(INTER)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV)
    w.add_layer_norm_rms_eps(1e-5)


def _tensors(rng, vocab: int = V) -> dict[str, np.ndarray]:
    """Float32 values (our [rows, cols] order) of a 1-layer tied model."""
    shapes = {"token_embd": (vocab, E), "output_norm": (E,), "blk.0.attn_norm": (E,), "blk.0.ffn_norm": (E,),
              "blk.0.attn_q": (HEADS * D, E), "blk.0.attn_k": (KV * D, E), "blk.0.attn_v": (KV * D, E),
              "blk.0.attn_output": (E, E), "blk.0.ffn_gate": (INTER, E), "blk.0.ffn_up": (INTER, E),
              "blk.0.ffn_down": (E, INTER)}
    return {k + ".weight": (rng.standard_normal(s) * 0.1).astype(np.float32) for k, s in shapes.items()}


def _blocks(x: np.ndarray, qtype: str) -> np.ndarray:
    if qtype in ("Q4_0", "Q5_1"):
        return gguf.quants.quantize(x, getattr(Q, qtype))
    return np.asarray(formats.quantize(x, qtype).data)


def write_file(path, types: dict[str, str] | None = None, *, arch="llama", drop=(), reshape=None, meta=_meta,
               seed=0, vocab=V) -> dict[str, np.ndarray]:
    """A GGUF with each tensor in types[name] (default F32); returns the stored (permuted) float values."""
    values = _tensors(np.random.default_rng(seed), vocab)
    w = gguf.GGUFWriter(str(path), arch)
    meta(w, arch)
    for name, x in values.items():
        if name in drop:
            continue
        if reshape and name in reshape:
            x = np.resize(x, reshape[name])
        t = (types or {}).get(name, "F32")
        if t == "F32":
            w.add_tensor(name, x)
        elif t == "F16":
            w.add_tensor(name, x.astype(np.float16))
        elif t == "I8":
            w.add_tensor(name, (x * 10).astype(np.int8))
        else:
            w.add_tensor(name, _blocks(x, t), raw_dtype=getattr(Q, t))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return values


def test_mixed_qkv_types_load_as_a_tuple_and_others_are_dequantized(tmp_path):
    types = {"blk.0.attn_q.weight": "Q4_K", "blk.0.attn_k.weight": "Q5_0", "blk.0.attn_v.weight": "Q6_K",
             "blk.0.ffn_gate.weight": "F16", "blk.0.ffn_up.weight": "F32", "blk.0.attn_output.weight": "Q4_0",
             "blk.0.ffn_down.weight": "Q5_1", "token_embd.weight": "Q8_0"}
    write_file(tmp_path / "mixed.gguf", types)
    with pytest.warns(UserWarning, match=r"Q4_0: blk\.0\.attn_output\.weight.*Q5_1: blk\.0\.ffn_down\.weight") as rec:
        cfg, params, tok, eos = gguf_io.load_gguf(tmp_path / "mixed.gguf")
    assert sum("dequantized" in str(r.message) for r in rec) == 1
    assert tok is None and eos == () and cfg.tie_word_embeddings and "lm_head" not in params
    lp = params["layers"][0]
    assert isinstance(lp["wqkv"], tuple) and [p.qtype for p in lp["wqkv"]] == ["Q4_K", "Q5_0", "Q6_K"]
    assert lp["w_gate_up"].dtype == jnp.float32  # F16 + F32: fused as float32
    assert lp["wo"].dtype == jnp.float32 and lp["w_down"].dtype == jnp.float32
    reader = gguf.GGUFReader(tmp_path / "mixed.gguf")
    stored = {t.name: gguf.quants.dequantize(t.data, t.tensor_type) for t in reader.tensors}
    del reader
    q = reverse_permute(stored["blk.0.attn_q.weight"], HEADS, HEADS)
    k = reverse_permute(stored["blk.0.attn_k.weight"], HEADS, KV)
    for part, ref in zip(lp["wqkv"], (q, k, stored["blk.0.attn_v.weight"]), strict=True):
        np.testing.assert_array_equal(dequantized(part), ref)
    np.testing.assert_array_equal(np.asarray(lp["wo"]), stored["blk.0.attn_output.weight"])
    np.testing.assert_array_equal(np.asarray(lp["w_down"]), stored["blk.0.ffn_down.weight"])
    np.testing.assert_array_equal(
        np.asarray(lp["w_gate_up"]), np.concatenate([stored["blk.0.ffn_gate.weight"], stored["blk.0.ffn_up.weight"]]))
    np.testing.assert_array_equal(dequantized(params["embed"]), stored["token_embd.weight"])
    assert np.isfinite(np.asarray(llama.forward(params, cfg, jnp.asarray([[1, 2, 3]])))).all()


def test_a_valid_hand_written_file_loads_with_its_config(tmp_path):
    write_file(tmp_path / "ok.gguf")
    cfg, _, _, _ = gguf_io.load_gguf(tmp_path / "ok.gguf")
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (V, E, HEADS, KV, D)
    assert cfg.rms_norm_eps == 1e-5 and cfg.max_position_embeddings == 128 and cfg.model_type == "llama"


@pytest.mark.parametrize("case, match", [
    (dict(drop=["blk.0.ffn_down.weight"]), r"tensor 'blk\.0\.ffn_down\.weight' is missing"),
    (dict(drop=["token_embd.weight"]), r"tensor 'token_embd\.weight' is missing"),
    (dict(reshape={"blk.0.attn_k.weight": (KV * D, E // 2)}), r"'blk\.0\.attn_k\.weight' has shape \[128, 128\], "
                                                              r"expected \[128, 256\]"),
    (dict(arch="gpt2"), r"architecture 'gpt2'.*not supported"),
    (dict(meta=lambda w, arch: (w.add_block_count(2**31 - 1), _meta(w, skip="block_count"))),
     r"block_count' is 2147483647, but the file has tensors for 1 layers"),
    (dict(types={"blk.0.attn_q.weight": "I8"}), r"'blk\.0\.attn_q\.weight' has ggml type I8, which cannot be loaded"),
    (dict(meta=lambda w, arch: w.add_embedding_length(E)), r"lacks required key 'llama\.attention\.head_count'"),
    (dict(meta=lambda w, arch: (_meta(w), w.add_string("llama.rope.scaling.type", "yarn"))), r"'yarn'"),
    (dict(meta=lambda w, arch: (_meta(w), w.add_uint32("llama.expert_count", 8))), r"mixture-of-experts"),
])
def test_bad_files_raise_model_error_naming_the_problem(tmp_path, case, match):
    path = tmp_path / "bad.gguf"
    write_file(path, **case)
    with pytest.raises(ModelError, match=match) as e:
        gguf_io.load_gguf(path)
    assert str(path) in str(e.value)


def test_bad_metadata_values_name_the_key():
    md = {"general.architecture": "qwen2", "qwen2.embedding_length": 64, "qwen2.block_count": 1,
          "qwen2.feed_forward_length": 128, "qwen2.attention.head_count": 4,
          "qwen2.attention.layer_norm_rms_epsilon": 1e-6, "qwen2.vocab_size": 100}
    cfg = gguf_io.gguf_config(md)
    assert cfg.model_type == "qwen2" and cfg.attention_bias and cfg.vocab_size == 100
    for key, value, match in [("qwen2.embedding_length", "64", "a positive int"), ("qwen2.block_count", 0, "positive"),
                              ("qwen2.attention.layer_norm_rms_epsilon", float("nan"), "positive finite"),
                              ("qwen2.attention.head_count_kv", 3, "multiple of num_key_value_heads=3"),
                              ("qwen2.attention.value_length", 8, "value_length"),
                              ("qwen2.block_count", 2**31 - 1, "block_count' is 2147483647, but at most")]:
        with pytest.raises(ModelError, match=match) as e:
            gguf_io.gguf_config({**md, key: value})
        assert key.split(".")[-1] in str(e.value) or "num_key_value_heads" in str(e.value)


def test_sentencepiece_vocabulary_encodes_as_llama_cpp(tmp_path):
    """tokenizer.ggml.model "llama": scores ranked merges and byte fallback, checked against transformers'
    GGUF tokenizer where llama.cpp and it agree (no leading space, no special token inside the text)."""
    spm = SentencePieceBPETokenizer(add_prefix_space=True)
    spm.train_from_iterator([TEXT], vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    pieces = [t for t, _ in sorted(spm.get_vocab().items(), key=lambda kv: kv[1]) if t not in ("<unk>", "<s>", "</s>")]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces

    def meta(w, arch):
        _meta(w)
        w.add_tokenizer_model("llama")
        w.add_token_list(tokens)
        w.add_token_scores([0.0] * 259 + [-float(k) for k in range(len(pieces))])
        w.add_token_types([2, 3, 3] + [6] * 256 + [1] * len(pieces))
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_unk_token_id(0)

    write_file(tmp_path / "spm.gguf", meta=meta, vocab=len(tokens))
    _, _, tok, eos = gguf_io.load_gguf(tmp_path / "spm.gguf")
    theirs = tf.AutoTokenizer.from_pretrained(tmp_path, gguf_file="spm.gguf")
    plain = ["Hello world", "To be, or not to be", "Grüße naïve café — 日本語 🙂 Ωẞ", "don't 12345", "a  b\n\tc "]
    for text in plain:
        for special in (True, False):
            assert tok.encode(text, add_special_tokens=special) == theirs(text, add_special_tokens=special)[
                "input_ids"], (text, special)
    for text in plain + ["  leading spaces", " ", "\n"]:
        assert tok.decode(tok.encode(text)) == text
    assert eos == (2,) and tok.encode("x")[0] == 1  # BOS by default, as llama.cpp adds it
    sp = tok.token_to_id("\u2581")
    assert tok.encode("  a", add_special_tokens=False)[:2] == [sp, sp]  # llama.cpp: " " + text, every space a ▁
    after = tok.encode("</s>hi", add_special_tokens=False)  # and the prefix space again after a special token
    assert after[0] == 2 and tok.id_to_token(after[1]).startswith("\u2581")
    assert tok.encode("hi", add_special_tokens=False) == after[1:]


def test_unsupported_tokenizer_loads_without_one(tmp_path):
    def meta(w, arch):
        _meta(w)
        w.add_tokenizer_model("bert")
        w.add_token_list([f"t{i}" for i in range(V)])

    write_file(tmp_path / "bert.gguf", meta=meta)
    with pytest.warns(UserWarning, match="tokenizer model 'bert' is not supported"):
        _, _, tok, _ = gguf_io.load_gguf(tmp_path / "bert.gguf")
    assert tok is None
    with pytest.raises(ModelError, match="'bert'"):
        gguf_io.tokenizer_from_gguf(gguf_io.read_gguf(tmp_path / "bert.gguf").metadata)


def test_save_is_atomic_and_checks_shapes(exported, tmp_path):
    _, folder = exported["llama"]
    cfg = loader.load_config(folder)
    params = loader.load_params(folder, cfg)
    path = tmp_path / "m.gguf"
    gguf_io.save_gguf(params, cfg, path)
    before = path.read_bytes()
    bad = dataclasses.replace(cfg, intermediate_size=cfg.intermediate_size * 2)
    with pytest.raises(ModelError, match=r"layer 0 'w_gate_up' \(ffn_gate, ffn_up\) has 256 rows, expected 256 \+ 256"):
        gguf_io.save_gguf(params, bad, path)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["m.gguf"]
    params["layers"][0]["w_down"] = params["layers"][0]["w_down"].at[0, 0].set(jnp.nan)  # fails mid-write
    with pytest.raises(ConfigError, match="finite"):
        gguf_io.save_gguf(params, cfg, path, qtype="Q8_0")
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["m.gguf"]


def test_a_fused_weight_mixed_in_one_layer_is_kept_as_parts_in_every_layer(tmp_path):
    """A Q4_K_M-like file: layer 0 stores attn_v in another format than q/k, layer 1 all alike. Every
    layer gets the same parts (one structure: the model scans them together), with the file's bytes."""
    def meta(w, arch):
        _meta(w, arch, skip="block_count")
        w.add_block_count(2)

    rng = np.random.default_rng(3)
    one = _tensors(rng)
    values = dict(one)
    values.update({k.replace("blk.0.", "blk.1."): (v[::-1] * 0.7).copy() for k, v in one.items() if "blk.0." in k})
    types = {"blk.0.attn_v.weight": "Q4_K"}
    w = gguf.GGUFWriter(str(tmp_path / "two.gguf"), "llama")
    meta(w, "llama")
    for name, x in values.items():
        t = types.get(name, "Q8_0" if x.ndim == 2 else "F32")
        w.add_tensor(name, x) if t == "F32" else w.add_tensor(name, _blocks(x, t), raw_dtype=getattr(Q, t))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    cfg, params, _, _ = gguf_io.load_gguf(tmp_path / "two.gguf")
    reader = gguf.GGUFReader(tmp_path / "two.gguf")
    stored = {t.name: gguf.quants.dequantize(t.data, t.tensor_type) for t in reader.tensors}
    del reader
    for i, v_type in ((0, "Q4_K"), (1, "Q8_0")):
        lp = params["layers"][i]
        assert isinstance(lp["wqkv"], tuple) and [p.qtype for p in lp["wqkv"]] == ["Q8_0", "Q8_0", v_type]
        q = reverse_permute(stored[f"blk.{i}.attn_q.weight"], HEADS, HEADS)
        k = reverse_permute(stored[f"blk.{i}.attn_k.weight"], HEADS, KV)
        for part, ref in zip(lp["wqkv"], (q, k, stored[f"blk.{i}.attn_v.weight"]), strict=True):
            np.testing.assert_array_equal(dequantized(part), ref)
        assert isinstance(lp["w_gate_up"], QuantizedTensor)  # alike in every layer: still fused
    # the same model fused and dequantized (FP32) gives the same logits, within the native kernel's
    # activation rounding
    _, floats, _, _ = gguf_io.load_gguf(tmp_path / "two.gguf", quantization=Precision.FP32)
    assert not isinstance(floats["layers"][1]["wqkv"], tuple)
    tokens = jnp.asarray([[1, 5, 9, 2]])
    got, want = (np.asarray(llama.forward(p, cfg, tokens)) for p in (params, floats))
    np.testing.assert_allclose(got, want, atol=0.05 * np.abs(want).max())
