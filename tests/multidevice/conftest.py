"""The sharded-model tests run here, in their own pytest process with 8 virtual CPU devices.

`tests/test_multidevice.py` starts that process (`XLA_FLAGS=--xla_force_host_platform_device_count=8`,
`RUVLLM_JAX_MULTIDEVICE=1`); the ordinary run does not collect this folder (see `tests/conftest.py`),
because jax there has one device. Run alone with:

    RUVLLM_JAX_MULTIDEVICE=1 XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m pytest tests/multidevice
"""

from __future__ import annotations

import jax
import pytest

from ruvllm_jax import JaxBackend, ModelConfig
from ruvllm_jax.testing import build_hf_model, save_hf_model

if jax.device_count() != 8:  # fail, never skip: without 8 devices nothing here would be tested
    raise RuntimeError(f"tests/multidevice needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8), "
                       f"jax sees {jax.device_count()}")


@pytest.fixture(scope="session")
def qwen2_dir(tmp_path_factory):
    """A tiny random Qwen2 with 8 heads and 2 KV heads (random biases): its heads split over 8 devices,
    its KV heads only over 1 or 2. Returns (transformers model, folder)."""
    model = build_hf_model("qwen2", num_attention_heads=8, num_key_value_heads=2, hidden_size=128,
                           intermediate_size=256)
    return model, save_hf_model(model, str(tmp_path_factory.mktemp("qwen2_8h_2kv")))


@pytest.fixture(scope="session")
def backends():
    """backends(path, mesh_shape, **config) -> a loaded JaxBackend, cached per arguments."""
    made = {}

    def get(path, mesh_shape, **kw):
        key = (path, mesh_shape, tuple(sorted(kw.items())))
        if key not in made:
            b = JaxBackend()
            b.load_model(path, ModelConfig(mesh_shape=mesh_shape, **kw))
            made[key] = b
        return made[key]

    return get
