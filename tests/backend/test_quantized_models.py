"""Models quantized at load (ModelConfig.quantization Q8 / Q4 / Q4K) against transformers.

The reference is transformers' PyTorch model carrying the weights our blocks stand for, decoded by
the `gguf` package (`gguf.quants.dequantize`), not by our code: the jnp path must equal it to float32
rounding, and the native kernel (which also rounds activations to 8 bits, as llama.cpp does) to
within that rounding.
"""

from __future__ import annotations

import contextlib

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from ruvllm_jax import JaxBackend, ModelConfig, Precision
from ruvllm_jax.kernels import KernelOptions
from ruvllm_jax.models import llama, loader
from ruvllm_jax.quant import matmul as qmatmul
from ruvllm_jax.quant.tensor import QuantizedTensor, is_weight_leaf
from ruvllm_jax.testing import build_hf_model, rng_tokens, save_hf_model
from ruvllm_jax.types import GenerateParams

# Rows of 256 and 512 columns: every format applies, Q4_K included (256-weight super-blocks).
DIMS = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, head_dim=64)
FORMAT = {Precision.Q8: "Q8_0", Precision.Q4: "Q4_1", Precision.Q4K: "Q4_K"}


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def model_folder(request, tmp_path_factory):
    model = build_hf_model(request.param, seed=3, **DIMS)
    return model, save_hf_model(model, str(tmp_path_factory.mktemp(request.param)))


def gguf_dequantized(params):
    """The params with every block tensor decoded by the gguf package (tuples joined)."""
    def dec(x):
        if isinstance(x, QuantizedTensor):
            qt = gguf.GGMLQuantizationType[x.qtype]
            return jnp.asarray(gguf.quants.dequantize(np.asarray(x.data), qt).reshape(x.shape))
        return x

    return jax.tree_util.tree_map(dec, params, is_leaf=is_weight_leaf)


def hf_logits(model, params, cfg, tokens) -> np.ndarray:
    state = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in loader.to_hf_tensors(params, cfg).items()}
    model.load_state_dict(state, strict=False)
    if cfg.tie_word_embeddings:
        model.tie_weights()
    with torch.no_grad():
        return model(torch.as_tensor(tokens)).logits.float().numpy()


@pytest.mark.parametrize("precision", [Precision.Q8, Precision.Q4, Precision.Q4K])
def test_quantized_load_equals_transformers_on_the_weights_it_stands_for(model_folder, precision):
    model, folder = model_folder
    b = JaxBackend()
    b.load_model(folder, ModelConfig(quantization=precision))
    params, cfg = b.params, b.config
    leaves = jax.tree_util.tree_leaves(params, is_leaf=is_weight_leaf)
    kinds = {x.qtype for x in leaves if isinstance(x, QuantizedTensor)}
    assert kinds == {FORMAT[precision]}
    assert isinstance(params["layers"][0]["wqkv"], QuantizedTensor) and isinstance(params["embed"], QuantizedTensor)
    tokens = rng_tokens(12, seed=1)
    want = hf_logits(model, gguf_dequantized(params), cfg, tokens)
    got = np.asarray(llama.forward(params, cfg, jnp.asarray(tokens), kernel=KernelOptions(quantized_matmul="jnp")))
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-4)
    if qmatmul.native_available():
        native = KernelOptions(quantized_matmul="native")
        nat = np.asarray(llama.forward(params, cfg, jnp.asarray(tokens), kernel=native))
        # 8-bit activations: relative error ~ 1/127 per product, far below the logits' spread.
        err = np.abs(nat - want).max() / np.abs(want).max()
        assert err < 0.03, err
    # The quantization really changed the weights (the test would not notice a float model).
    full = hf_logits(model, loader.load_params(folder, cfg), cfg, tokens)
    assert np.abs(full - want).max() > 1e-3


@pytest.mark.parametrize("precision", [Precision.Q8, Precision.Q4, Precision.Q4K, Precision.FP16, Precision.FP32])
def test_memory_stats_are_the_real_bytes_and_agree_with_bytes_per_element(model_folder, precision):
    _, folder = model_folder
    b = JaxBackend()
    b.load_model(folder, ModelConfig(quantization=precision))
    leaves = jax.tree_util.tree_leaves(b.params, is_leaf=is_weight_leaf)
    matrices = [x for x in leaves if len(x.shape) == 2]
    vectors = [x for x in leaves if len(x.shape) == 1]
    vector_bytes = sum(x.size for x in vectors) * (2 if precision is Precision.FP16 else 4)
    expected = sum(x.size for x in matrices) * precision.bytes_per_element() + vector_bytes
    assert b.memory_stats().params_bytes == pytest.approx(expected, rel=0, abs=0.5)
    assert b.memory_stats().params_bytes == sum(int(np.asarray(x).nbytes) for x in jax.tree_util.tree_leaves(b.params))
    info = b.model_info()
    assert info.quantization is precision
    assert info.num_parameters == sum(x.size for x in leaves)


def test_quantized_generation_runs_the_engine_and_greedy_text_tracks_fp32():
    """The embedded model in Q8: its 48 greedy tokens on this prompt equal FP32's (Q4K and Q4 part
    after 13). Its 688-column down projections stay float32 (688 is not a multiple of 32), with a warning."""
    prompt = "ROMEO:\nBut soft, what light"
    params = GenerateParams(max_tokens=48, temperature=0.0)
    out = {}
    for precision in (Precision.FP32, Precision.Q8):
        b = JaxBackend()
        with pytest.warns(UserWarning, match="stay float32") if precision is Precision.Q8 else contextlib.nullcontext():
            b.load_model(None, ModelConfig(quantization=precision))
        b.eos_token_ids = ()
        ids = b.tokenizer().encode(prompt)
        out[precision] = b.generate_tokens(ids, params)
    pairs = enumerate(zip(out[Precision.FP32], out[Precision.Q8], strict=True))
    same = next((i for i, (a, c) in pairs if a != c), 48)
    assert same == 48, (same, out)



def test_adapters_train_over_a_quantized_model(model_folder):
    """MicroLoRA's gradient flows through the quantized linears (the native kernel's backward is jnp)."""
    from ruvllm_jax import AdaptFeedback, MicroLoRA

    _, folder = model_folder
    b = JaxBackend()
    b.load_model(folder, ModelConfig(quantization=Precision.Q8))
    lora = MicroLoRA.for_model(b.config, optimizer="adam")
    prompt, response = [5, 9, 12, 40], [77, 3, 101, 64, 8]
    before = lora.log_likelihood(b.params, prompt, response)
    for _ in range(5):
        lora.adapt_sequence(b.params, prompt, response, AdaptFeedback(quality=1.0, reward=1.0))
        lora.apply_updates(0.05)
    assert lora.log_likelihood(b.params, prompt, response) > before + 0.5
