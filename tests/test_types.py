"""Core value types: precision sizes, size classes, devices, and validated, frozen configs."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from ruvllm_jax import (
    ConfigError,
    DeviceType,
    GenerateParams,
    KvCacheConfig,
    KvCacheError,
    MemoryStats,
    ModelConfig,
    ModelSize,
    Precision,
)


@pytest.mark.parametrize("precision, expected", [
    (Precision.FP32, 4.0), (Precision.FP16, 2.0), (Precision.BF16, 2.0),
    (Precision.Q8, 34 / 32), (Precision.Q4, 20 / 32), (Precision.Q4K, 0.5625),
])
def test_bytes_per_element_includes_scale_overhead(precision, expected):
    assert precision.bytes_per_element() == expected
    assert isinstance(precision.bytes_per_element(), float)
    assert precision.is_quantized == (precision in (Precision.Q8, Precision.Q4, Precision.Q4K))


def test_q4k_is_144_bytes_per_super_block():
    assert Precision.Q4K.bytes_per_element() * 256 == 144
    assert Precision.Q8.bytes_per_element() * 32 == 34


@pytest.mark.parametrize("n, size", [
    (0, ModelSize.Tiny), (999_999_999, ModelSize.Tiny), (1_000_000_000, ModelSize.Small),
    (2_999_999_999, ModelSize.Small), (3_000_000_000, ModelSize.Medium), (12_999_999_999, ModelSize.Medium),
    (13_000_000_000, ModelSize.Large), (70_000_000_000, ModelSize.Large),
])
def test_model_size_boundaries(n, size):
    assert ModelSize.from_num_params(n) is size


def test_negative_param_count_is_a_config_error():
    with pytest.raises(ConfigError, match="-1"):
        ModelSize.from_num_params(-1)


def test_best_device_is_jaxs_default_device():
    assert DeviceType.best() == DeviceType.from_jax(jax.devices()[0])
    assert DeviceType.best().to_jax() == jax.devices()[0]
    assert DeviceType.Cpu.to_jax() == jax.devices("cpu")[0]  # every host has its CPU
    assert ModelConfig().device is None  # None = best present, resolved by the backend


def test_device_constructors_and_names():
    assert DeviceType.Cuda(1) == DeviceType("cuda", 1) and str(DeviceType.Cuda(1)) == "cuda:1"
    assert str(DeviceType.Tpu(0)) == "tpu:0" and str(DeviceType.Rocm(2)) == "rocm:2"
    assert str(DeviceType.Cpu) == "cpu" and str(DeviceType.Metal) == "metal"
    assert DeviceType.from_jax(jax.devices("cpu")[0]) == DeviceType.Cpu
    assert len({DeviceType.Cuda(0), DeviceType("cuda", 0), DeviceType.Cpu}) == 2  # hashable


def test_bad_devices_are_config_errors():
    with pytest.raises(ConfigError, match="'gpu'"):
        DeviceType("gpu")
    with pytest.raises(ConfigError, match="-1"):
        DeviceType.Cuda(-1)
    with pytest.raises(ConfigError, match="cuda:999.*not available"):
        DeviceType.Cuda(999).to_jax()
    with pytest.raises(ConfigError, match="cpu.*not available"):
        DeviceType("cpu", 5).to_jax()


def test_generate_params_defaults_match_ruvllm():
    p = GenerateParams()
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k, p.repetition_penalty) == (256, 0.7, 0.9, 0, 1.1)
    assert p.stop_sequences == () and p.seed is None
    assert p.replace(seed=3).seed == 3 and p.seed is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.temperature = 1.0  # type: ignore[misc]


def test_stop_sequences_become_a_tuple():
    assert GenerateParams(stop_sequences="\n").stop_sequences == ("\n",)
    assert GenerateParams(stop_sequences=["a", "bc"]).stop_sequences == ("a", "bc")
    hash(GenerateParams(stop_sequences=["a"]))  # still hashable


@pytest.mark.parametrize("field, value", [
    ("max_tokens", -1), ("max_tokens", 2.5), ("max_tokens", "8"), ("max_tokens", True),
    ("temperature", -0.1), ("temperature", float("nan")), ("temperature", float("inf")), ("temperature", "hot"),
    ("top_p", 0.0), ("top_p", 1.5), ("top_p", float("nan")), ("top_p", "0.5"),
    ("top_k", -1), ("top_k", 1.5), ("top_k", False),
    ("repetition_penalty", 0.0), ("repetition_penalty", -1.0), ("repetition_penalty", float("nan")),
    ("repetition_penalty", None),
    ("stop_sequences", ("",)), ("stop_sequences", (1,)),
    ("seed", -1), ("seed", 1.5), ("seed", "7"), ("seed", True),
])
def test_invalid_generate_params_are_config_errors_naming_the_value(field, value):
    with pytest.raises(ConfigError, match=field):
        GenerateParams(**{field: value})


def test_generate_params_edge_values_are_accepted():
    GenerateParams(max_tokens=0, temperature=0.0, top_p=1.0, top_k=0, repetition_penalty=1.0, seed=0)
    GenerateParams(seed=2**63)
    GenerateParams(temperature=np.float32(0.5), top_p=np.float32(0.9), repetition_penalty=np.float64(1.2))


def test_model_config_defaults_and_validation():
    c = ModelConfig()
    assert c.max_context == 4096 and c.quantization is None and c.use_flash_attention
    assert c.kv_cache_config is None  # the exact contiguous cache; the lossy two-tier one is opt-in
    with pytest.raises(ConfigError, match="max_context"):
        ModelConfig(max_context=0)
    with pytest.raises(ConfigError, match="max_context"):
        ModelConfig(max_context="big")
    with pytest.raises(ConfigError, match="'q4'"):
        ModelConfig(quantization="q4")
    with pytest.raises(KvCacheError, match="tail_length"):
        KvCacheConfig(tail_length=0)


def test_memory_stats_total():
    assert MemoryStats(params_bytes=10, cache_bytes=5, device="cpu").total_bytes == 15


@pytest.mark.parametrize("field, value", [
    ("max_context", True), ("max_context", 2.0), ("max_context", -5), ("max_context", None),
    ("use_flash_attention", "yes"), ("use_flash_attention", 1), ("use_flash_attention", None),
    ("quantization", "fp32"),
    ("kv_cache_config", {"tail_length": 8}), ("kv_cache_config", "q4"),
    ("device", "cuda"), ("device", 0), ("device", jax.devices("cpu")[0]),
    ("hf_token", 123), ("hf_token", b"token"),
])
def test_model_config_field_types_are_checked(field, value):
    with pytest.raises(ConfigError, match=field):
        ModelConfig(**{field: value})


def test_model_config_accepts_its_documented_types():
    c = ModelConfig(max_context=np.int64(64), use_flash_attention=False, device=DeviceType.Cpu, hf_token="t",
                    kv_cache_config=KvCacheConfig(tail_length=8, migration_batch=8))
    assert type(c.max_context) is int and c.max_context == 64 and c.device == DeviceType.Cpu


@pytest.mark.parametrize("kwargs, match", [
    ({"tail_length": True}, "tail_length"), ({"head_dim": 64.0}, "head_dim"), ({"max_tokens": "4096"}, "max_tokens"),
    ({"tail_precision": "fp16"}, "tail_precision"), ({"store_precision": None}, "store_precision"),
    ({"store_precision": Precision.Q4K}, "not.*|cache precision"), ({"tail_precision": Precision.Q8}, "tail_precision"),
    ({"num_sink_tokens": -1}, "num_sink_tokens"), ({"eviction": 1}, "eviction"),
    ({"tail_length": 48}, "multiple of migration_batch=64"), ({"head_dim": 63}, "even"),
    ({"max_tokens": 300}, "at least num_sink_tokens \\+ tail_length \\+ migration_batch = 320"),
])
def test_kv_cache_config_field_types_are_checked(kwargs, match):
    with pytest.raises(KvCacheError, match=match):
        KvCacheConfig(**kwargs)


@pytest.mark.parametrize("kind, index", [(None, 0), (["cpu"], 0), ("cuda", "1"), ("cuda", True), ("cuda", 1.0)])
def test_device_type_fields_are_checked(kind, index):
    with pytest.raises(ConfigError, match="device (kind|index)"):
        DeviceType(kind, index)


@pytest.mark.parametrize("field, value", [
    ("stop_sequences", None), ("stop_sequences", 5), ("stop_sequences", {"a"}), ("stop_sequences", ["a", None]),
    ("seed", 2**64), ("seed", -(2**63)), ("seed", np.bool_(True)),
    ("temperature", 10**400), ("temperature", 1e39), ("temperature", 1e-40), ("temperature", -0.0 - 1e-300),
    ("top_p", 1e-40), ("top_p", 10**400), ("top_p", np.float64("nan")),
    ("repetition_penalty", 1e39), ("repetition_penalty", 1e-40), ("repetition_penalty", float("inf")),
    ("top_k", None), ("top_k", 3.0), ("max_tokens", None), ("max_tokens", 10.0),
])
def test_more_invalid_generate_params_are_config_errors(field, value):
    # stop_sequences=None used to escape as a TypeError; huge ints as an OverflowError; 1e39 and
    # 1e-40 used to pass and then become inf or 0 in float32.
    with pytest.raises(ConfigError, match=field):
        GenerateParams(**{field: value})


def test_generate_params_normalize_number_types():
    p = GenerateParams(max_tokens=np.int32(4), top_k=np.int64(5), seed=np.uint64(2**64 - 1), stop_sequences=["x"])
    assert (type(p.max_tokens), type(p.top_k), type(p.seed)) == (int, int, int)
    assert p.seed == 2**64 - 1 and p.stop_sequences == ("x",)
    assert p == GenerateParams(max_tokens=4, top_k=5, seed=2**64 - 1, stop_sequences=("x",))
    GenerateParams(temperature=3e38, repetition_penalty=2.0**-126, top_p=2.0**-126)  # float32's range edges
