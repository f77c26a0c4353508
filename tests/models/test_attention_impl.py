"""The model's logits do not depend on which attention implementation runs them.

The jnp path is what CPUs run; the Pallas kernels (Triton and Mosaic, interpreted on CPU here) are
what GPUs and TPUs run. Prefill and every decode step must agree to 1e-5.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ruvllm_jax.cache import ContiguousKVCache
from ruvllm_jax.kernels import KernelOptions
from ruvllm_jax.models import llama, loader
from ruvllm_jax.testing import build_hf_model, rng_tokens, save_hf_model


def _logits_per_step(params, cfg, tokens, split, **impl):
    cache = ContiguousKVCache.init(num_layers=cfg.num_layers, batch=1, num_kv_heads=cfg.num_kv_heads,
                                   head_dim=cfg.head_dim, max_len=tokens.shape[1])
    logits, cache = llama.prefill(params, cfg, jnp.asarray(tokens[:, :split]), cache, **impl)
    steps = [np.asarray(logits)]
    for t in range(split, tokens.shape[1]):
        out, cache = llama.decode(params, cfg, jnp.asarray(tokens[:, t]), jnp.array([t]), cache, **impl)
        steps.append(np.asarray(out)[:, None])
    return np.concatenate(steps, axis=1)


@pytest.fixture(scope="module", params=["llama", "mistral"])
def model(request, tmp_path_factory):
    folder = save_hf_model(build_hf_model(request.param), str(tmp_path_factory.mktemp(request.param)))
    cfg = loader.load_config(folder)
    return loader.load_params(folder, cfg), cfg


def test_model_logits_equal_across_attention_impls(model):
    params, cfg = model
    tokens = rng_tokens(14, seed=3)  # mistral's window is 8: prompt and decode both cross it
    jnp_path = _logits_per_step(params, cfg, tokens, 10, impl="jnp")
    auto = _logits_per_step(params, cfg, tokens, 10, kernel=KernelOptions())
    if jax.default_backend() == "cpu":
        np.testing.assert_array_equal(auto, jnp_path)  # "auto" on CPU is the jnp path
    else:  # the compiled Pallas kernels on GPU/TPU
        np.testing.assert_allclose(auto, jnp_path, atol=1e-5, rtol=0)
    # On CPU, impl="pallas" with interpret=True runs the GPU (Triton) flash and decode kernels.
    pallas = _logits_per_step(params, cfg, tokens, 10, impl="pallas", interpret=True)
    np.testing.assert_allclose(pallas, jnp_path, atol=1e-5, rtol=0)
    assert np.abs(jnp_path).max() > 0.1  # the comparison is over real logits, not zeros
