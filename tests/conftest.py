"""Shared fixtures: tiny random transformers models saved as HF folders, with a real tokenizer.

The plain helpers behind them live in `ruvllm_jax.testing` (the experiments use them too); tests
import those from there, and get these fixtures from pytest without importing anything.
"""

from __future__ import annotations

import pytest

from ruvllm_jax.testing import build_hf_model, save_hf_model


@pytest.fixture(scope="session", params=["llama", "qwen2", "mistral"])
def hf_model_dir(request, tmp_path_factory):
    """(kind, transformers model, saved folder) for each supported family."""
    model = build_hf_model(request.param)
    folder = save_hf_model(model, str(tmp_path_factory.mktemp(request.param)))
    return request.param, model, folder


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory):
    model = build_hf_model("llama")
    return model, save_hf_model(model, str(tmp_path_factory.mktemp("llama_one")))
