"""`ModelConfig.mesh_shape` and `ruvllm_jax.sharding` in the one-device test process: validation, a
refused mesh keeping the loaded model, and the 1 x 1 mesh equal to no mesh. The layouts on 8 devices
are tested in tests/multidevice (run by tests/test_multidevice.py)."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from ruvllm_jax import ConfigError, DeviceType, GenerateParams, JaxBackend, ModelConfig
from ruvllm_jax.models import llama
from ruvllm_jax.sharding import ModelSharding, make_mesh

GREEDY = GenerateParams(max_tokens=12, temperature=0.0)


@pytest.mark.parametrize("shape", [(0, 1), (1,), (1, 2, 3), "1x2", (True, 1), (1.0, 2), (2, -1), [1, None]])
def test_bad_mesh_shapes_are_config_errors(shape):
    with pytest.raises(ConfigError, match="mesh_shape must be None or \\(data, model\\)"):
        ModelConfig(mesh_shape=shape)


def test_mesh_shape_is_normalized_and_excludes_a_device():
    assert ModelConfig(mesh_shape=[np.int64(1), 1]).mesh_shape == (1, 1)
    with pytest.raises(ConfigError, match="either device=cpu .* or mesh_shape=\\(1, 1\\)"):
        ModelConfig(mesh_shape=(1, 1), device=DeviceType.Cpu)


def test_a_mesh_larger_than_the_devices_fails_the_load_and_keeps_the_model():
    b = JaxBackend()
    b.load_model()
    before = b.generate_tokens([5, 6, 7], GREEDY)
    n = jax.device_count()
    with pytest.raises(ConfigError, match=f"needs {2 * n} devices, only {n} present"):
        b.load_model(None, ModelConfig(mesh_shape=(1, 2 * n)))
    assert b.mesh is None and b.generate_tokens([5, 6, 7], GREEDY) == before


def test_a_one_by_one_mesh_is_the_one_device_model_in_the_split_layout():
    one, mesh = JaxBackend(), JaxBackend()
    one.load_model()
    mesh.load_model(None, ModelConfig(mesh_shape=(1, 1)))
    assert mesh.mesh is not None and mesh.memory_stats().device.startswith("mesh data=1 x model=1")
    assert isinstance(mesh.params["layers"][0]["wqkv"], tuple) and len(mesh.params["layers"][0]["wqkv"]) == 3
    assert mesh.memory_stats().params_bytes == one.memory_stats().params_bytes
    assert mesh.generate_tokens([5, 6, 7], GREEDY) == one.generate_tokens([5, 6, 7], GREEDY)
    tokens = jax.numpy.asarray([[5, 6, 7, 8]])
    np.testing.assert_array_equal(np.asarray(llama.forward(mesh.params, mesh.config, tokens)),
                                  np.asarray(llama.forward(one.params, one.config, tokens)))


def test_layout_rules_on_a_one_device_mesh_replicate_everything():
    b = JaxBackend()
    b.load_model()
    layout = ModelSharding.create(b.config, make_mesh((1, 1)))
    specs = jax.tree.leaves(jax.tree.map(lambda s: s.spec, layout.param_shardings(layout.split_fused(b.params))),
                            is_leaf=lambda x: isinstance(x, P))
    assert specs and all(all(a is None for a in s) for s in specs)
    with pytest.raises(ConfigError, match="axes must be named"):
        ModelSharding.create(b.config, jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1), ("x", "y")))
