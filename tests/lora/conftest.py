"""Fixtures for the LoRA tests: one tiny random transformers llama loaded into a JaxBackend."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def lora_backend(llama_dir):
    from ruvllm_jax.backend import JaxBackend

    _, folder = llama_dir
    backend = JaxBackend()
    backend.load_model(folder)
    return backend
