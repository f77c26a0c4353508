"""Fixtures of the backend tests."""

from __future__ import annotations

import pytest

from ruvllm_jax.backend.jax_backend import JaxBackend


@pytest.fixture(scope="module")
def backend(llama_dir):
    """A backend with the tiny random transformers Llama loaded, one per test module (tests that
    change it, e.g. attach adapters, stay inside their module)."""
    _, folder = llama_dir
    b = JaxBackend.new()
    b.load_model(folder)
    return b
