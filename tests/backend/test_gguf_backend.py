"""`JaxBackend.load_model("model.gguf")`: generation from GGUF files against transformers' own GGUF loader.

transformers dequantizes every tensor of a GGUF to float; our FP32 load does the same, so greedy
tokens must be identical. Kept as stored (quantization None), the quantized file generates through
the quantized kernels, and the text and memory figures are those of the blocks.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import torch
import transformers as tf

from ruvllm_jax import JaxBackend, ModelConfig, Precision
from ruvllm_jax.errors import KvCacheError, ModelError
from ruvllm_jax.models import gguf_io, loader, weights_io
from ruvllm_jax.quant.tensor import QuantizedTensor
from ruvllm_jax.testing import build_hf_model, rng_tokens, save_hf_model
from ruvllm_jax.types import GenerateParams

GREEDY = GenerateParams(max_tokens=24, temperature=0.0, repetition_penalty=1.0)


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def gguf_files(request, tmp_path_factory):
    """(folder, {qtype: path}) for a random model whose rows are multiples of 256 (Q4_K applies)."""
    kw = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, head_dim=64)
    if request.param == "llama":
        kw["rope_scaling"] = None
    model = build_hf_model(request.param, seed=5, **kw)
    folder = save_hf_model(model, str(tmp_path_factory.mktemp(f"gguf_backend_{request.param}")))
    cfg = loader.load_config(folder)
    params = loader.load_params(folder, cfg)
    files = {}
    for qtype in ("F32", "Q8_0", "Q4_K"):
        files[qtype] = os.path.join(folder, f"model-{qtype}.gguf")
        gguf_io.save_gguf(params, cfg, files[qtype], qtype=qtype, tokenizer=os.path.join(folder, "tokenizer.json"))
    return folder, files


def transformers_greedy(folder: str, file: str, prompt: np.ndarray, n: int) -> list[int]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = tf.AutoModelForCausalLM.from_pretrained(folder, gguf_file=os.path.basename(file)).eval()
    with torch.no_grad():
        out = model.generate(torch.as_tensor(prompt), do_sample=False, max_new_tokens=n, min_new_tokens=n,
                             pad_token_id=0)
    return out[0, prompt.shape[1]:].tolist()


@pytest.mark.parametrize("qtype", ["F32", "Q8_0", "Q4_K"])
def test_fp32_load_of_a_gguf_generates_what_transformers_gguf_loader_generates(gguf_files, qtype):
    folder, files = gguf_files
    prompt = rng_tokens(9, seed=2)
    b = JaxBackend()
    b.load_model(files[qtype], ModelConfig(quantization=Precision.FP32))
    b.eos_token_ids = ()
    ours = b.generate_tokens(prompt[0].tolist(), GREEDY)
    assert ours == transformers_greedy(folder, files[qtype], prompt, GREEDY.max_tokens)
    assert b.model_info().dtype == "float32"


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_K"])
def test_a_quantized_gguf_is_kept_quantized_and_generates(gguf_files, qtype):
    folder, files = gguf_files
    b = JaxBackend()
    b.load_model(files[qtype])  # quantization None: keep the file's blocks
    assert isinstance(b.params["layers"][0]["wqkv"], QuantizedTensor)
    assert b.params["layers"][0]["wqkv"].qtype == qtype
    info = b.model_info()
    precision = {"Q8_0": Precision.Q8, "Q4_K": Precision.Q4K}[qtype]
    assert info.dtype.split("+")[0] == qtype and info.quantization is precision
    f32 = JaxBackend()
    f32.load_model(files["F32"])
    assert b.memory_stats().params_bytes < 0.4 * f32.memory_stats().params_bytes
    # The text: the tokenizer was rebuilt from the file's metadata and round-trips the prompt.
    text = "To be, or not to be"
    assert b.tokenizer().decode(b.tokenizer().encode(text)) == text
    out = b.generate(text, GenerateParams(max_tokens=8, temperature=0.0))
    assert isinstance(out, str)
    # Same blocks through Q8 / Q4K quantization of the F32 file: the same tokens (our quantizer wrote both).
    again = JaxBackend()
    again.load_model(files["F32"], ModelConfig(quantization=precision))
    np.testing.assert_array_equal(np.asarray(again.params["layers"][1]["w_down"].data),
                                  np.asarray(b.params["layers"][1]["w_down"].data))


def test_a_failed_gguf_load_keeps_the_model_that_was_there(gguf_files, tmp_path):
    _, files = gguf_files
    b = JaxBackend()
    b.load_model(files["Q8_0"])
    before = b.params
    bad = tmp_path / "truncated.gguf"
    with open(files["Q8_0"], "rb") as f:
        bad.write_bytes(f.read(5000))
    with pytest.raises(ModelError):
        b.load_model(str(bad))
    assert b.params is before


def test_the_callers_config_check_runs_before_any_weight_is_read(gguf_files, monkeypatch):
    _, files = gguf_files

    def refuse(cfg):
        raise KvCacheError(f"refused {cfg.model_type}")

    monkeypatch.setattr(weights_io, "materialize", lambda *a, **k: pytest.fail("a weight was read"))
    with pytest.raises(KvCacheError, match="refused"):
        gguf_io.load_gguf(files["Q8_0"], check_config=refuse)
