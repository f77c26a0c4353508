"""KernelOptions: one static object says how attention runs, from the model down to the kernels."""

from __future__ import annotations

import ast
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ruvllm_jax
from ruvllm_jax.errors import ConfigError
from ruvllm_jax.kernels import (
    BlockSizes,
    DecodeBlockSizes,
    FlashBlockSizes,
    KernelOptions,
    decode_attention,
    flash_attention,
)


def test_options_are_static_and_validated():
    a, b = KernelOptions(impl="pallas", interpret=True), KernelOptions(impl="pallas", interpret=True)
    assert a == b and hash(a) == hash(b)  # usable as a static jit argument
    assert KernelOptions(impl="xla").impl == "jnp"  # the older spelling of the jnp path
    platform = jax.default_backend()
    assert KernelOptions().path() == {"cpu": "jnp", "tpu": "mosaic"}.get(platform, "triton")
    assert KernelOptions().path(has_mosaic=False) == {"cpu": "jnp", "tpu": "jnp"}.get(platform, "triton")
    assert KernelOptions(impl="pallas", interpret=True).path() == "triton"
    assert KernelOptions(impl="pallas", interpret=True, pallas_backend="mosaic").path() == "mosaic"
    with pytest.raises(ConfigError, match="impl must be one of"):
        KernelOptions(impl="cuda")
    with pytest.raises(ConfigError, match="pallas_backend must be one of"):
        KernelOptions(pallas_backend="cudnn")
    with pytest.raises(ConfigError, match="interpret must be a bool"):
        KernelOptions(interpret="yes")
    if platform != "tpu":
        with pytest.raises(ConfigError, match=f"cannot compile on the '{platform}' backend"):
            KernelOptions(impl="pallas", pallas_backend="mosaic").path()
    with pytest.raises(ConfigError, match="FlashBlockSizes.block_q must be a positive int, got 0"):
        BlockSizes(flash=FlashBlockSizes(block_q=0))


def test_block_sizes_reach_the_kernels_through_the_public_functions():
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((1, 40, 4, 16)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((1, 40, 2, 16)), jnp.float32)
    ref = flash_attention(q, k, k, impl="jnp")
    lowered = []
    for blocks in (FlashBlockSizes(block_q=8, block_k=16), FlashBlockSizes(block_q=16, block_k=32)):
        out = flash_attention(q, k, k, impl="pallas", interpret=True, block_sizes=blocks)
        np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-5)
        kernel = KernelOptions(impl="pallas", interpret=True, block_sizes=BlockSizes(flash=blocks))
        lowered.append(jax.jit(lambda q, k, kernel=kernel: flash_attention(q, k, k, kernel=kernel)).lower(q, k)
                       .as_text())
    assert lowered[0] != lowered[1]  # the tile sizes changed the program
    with pytest.raises(ConfigError, match="takes block_sizes=FlashBlockSizes"):
        flash_attention(q, k, k, block_sizes=DecodeBlockSizes())
    with pytest.raises(ConfigError, match="either kernel= or impl"):
        flash_attention(q, k, k, impl="jnp", kernel=KernelOptions())
    with pytest.raises(ConfigError, match="kernel must be a KernelOptions"):
        decode_attention(q[:, 0], k.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3), jnp.array([3]), kernel="jnp")


def _private_imports(path: pathlib.Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ruvllm_jax"):
            for alias in node.names:
                if alias.name.startswith("_"):
                    yield node.module, alias.name


def test_no_module_imports_another_modules_private_names():
    """Shared pieces live in a private *module* (kernels/_online_softmax.py) with public names."""
    package = pathlib.Path(ruvllm_jax.__file__).parent
    found = {str(p.relative_to(package)): list(_private_imports(p)) for p in package.rglob("*.py")}
    assert {k: v for k, v in found.items() if v} == {}
