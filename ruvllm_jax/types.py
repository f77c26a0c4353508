"""Core value types of the RuvLLM API as frozen dataclasses and enums.

They are static configuration: hashable, never traced by jit, validated on construction so a bad
value fails where it was written rather than deep inside a compiled function.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import numbers
from typing import Optional

from ruvllm_jax.errors import ConfigError, KvCacheError


def _is_int(v) -> bool:
    """An integer that is not a bool (True would otherwise pass as max_tokens=1)."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(x) -> bool:
    """A real number (int or float, not a string or None), so comparisons cannot raise TypeError."""
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


# Sampling parameters run as float32 on device: a value float32 cannot hold would silently become
# inf (above the max) or 0 (below the smallest normal, which XLA may flush), changing its meaning.
_F32_MAX = 3.4028234663852886e38
_F32_MIN_NORMAL = 2.0**-126

SEED_LIMIT = 2**64
"""Seeds are ints in [0, SEED_LIMIT): every one gives its own random stream."""


def _as_float(x) -> Optional[float]:
    """`x` as a float when it is a real number float() can hold (not NaN), else None."""
    if not _is_real(x):
        return None
    try:
        f = float(x)
    except (OverflowError, ValueError, TypeError):  # ints beyond 1.8e308
        return None
    return None if math.isnan(f) else f


def _positive_f32(x) -> bool:
    """A real number in [smallest normal float32, largest float32]."""
    f = _as_float(x)
    return f is not None and _F32_MIN_NORMAL <= f <= _F32_MAX


class Precision(enum.Enum):
    """Numeric precision of weights or KV-cache entries."""

    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"
    Q8 = "q8"
    Q4 = "q4"
    Q4K = "q4k"

    def bytes_per_element(self) -> float:
        """Bytes per stored element, scale overhead included (Q4K: 144 bytes per 256 = 0.5625)."""
        return _BYTES_PER_ELEMENT[self]

    @property
    def is_quantized(self) -> bool:
        return self in (Precision.Q8, Precision.Q4, Precision.Q4K)


_BYTES_PER_ELEMENT = {
    Precision.FP32: 4.0,
    Precision.FP16: 2.0,
    Precision.BF16: 2.0,
    # GGML Q8_0: 32 int8 codes + one f16 scale = 34 bytes per 32.
    Precision.Q8: 34 / 32,
    # 32 codes packed two per byte + f16 scale + f16 min = 20 bytes per 32.
    Precision.Q4: 20 / 32,
    # GGML Q4_K super-block: 144 bytes per 256 weights.
    Precision.Q4K: 144 / 256,
}


class ModelSize(enum.Enum):
    """Size class of a model, for routing: Tiny < 1B ≤ Small < 3B ≤ Medium < 13B ≤ Large."""

    Tiny = "tiny"
    Small = "small"
    Medium = "medium"
    Large = "large"

    @classmethod
    def from_num_params(cls, n: int) -> "ModelSize":
        if n < 0:
            raise ConfigError(f"num_params must be >= 0, got {n}")
        if n < 1_000_000_000:
            return cls.Tiny
        if n < 3_000_000_000:
            return cls.Small
        if n < 13_000_000_000:
            return cls.Medium
        return cls.Large


@dataclasses.dataclass(frozen=True)
class DeviceType:
    """A compute device: `DeviceType.Cpu`, `DeviceType.Metal`, `DeviceType.Cuda(i)`, `Rocm(i)`, `Tpu(i)`."""

    kind: str
    index: int = 0

    _KINDS = ("cpu", "cuda", "rocm", "tpu", "metal")

    def __post_init__(self):
        if not isinstance(self.kind, str) or self.kind not in self._KINDS:
            raise ConfigError(f"device kind must be one of {self._KINDS}, got {self.kind!r}")
        if not _is_int(self.index) or self.index < 0:
            raise ConfigError(f"device index must be an int >= 0, got {self.index!r}")
        object.__setattr__(self, "index", int(self.index))  # numpy ints hash and print as ints

    @staticmethod
    def Cuda(index: int = 0) -> "DeviceType":  # noqa: N802 - RuvLLM spelling
        return DeviceType("cuda", index)

    @staticmethod
    def Rocm(index: int = 0) -> "DeviceType":  # noqa: N802
        return DeviceType("rocm", index)

    @staticmethod
    def Tpu(index: int = 0) -> "DeviceType":  # noqa: N802
        return DeviceType("tpu", index)

    @staticmethod
    def best() -> "DeviceType":
        """The best JAX device present: an accelerator if there is one, else the CPU."""
        import jax

        dev = jax.devices()[0]
        return DeviceType.from_jax(dev)

    @staticmethod
    def from_jax(dev) -> "DeviceType":
        platform = dev.platform.lower()
        if platform == "gpu" or platform == "cuda":
            kind = "rocm" if "rocm" in str(getattr(dev, "client", "")).lower() else "cuda"
        elif platform in ("rocm", "tpu", "metal", "cpu"):
            kind = platform
        else:
            kind = "cpu"
        return DeviceType(kind, dev.id if kind != "cpu" else 0)

    def to_jax(self):
        """The `jax.Device` this names; `ConfigError` if it is not present."""
        import jax

        platform = {"cuda": "gpu", "rocm": "gpu"}.get(self.kind, self.kind)
        try:
            devices = jax.devices(platform)
        except RuntimeError as e:
            raise ConfigError(f"device {self} is not available: {e}") from None
        if self.index >= len(devices):
            raise ConfigError(f"device {self} is not available: only {len(devices)} {platform} device(s)")
        return devices[self.index]

    def __str__(self) -> str:
        return self.kind if self.kind in ("cpu", "metal") else f"{self.kind}:{self.index}"


DeviceType.Cpu = DeviceType("cpu")  # type: ignore[attr-defined]
DeviceType.Metal = DeviceType("metal")  # type: ignore[attr-defined]


@dataclasses.dataclass(frozen=True)
class KvCacheConfig:
    """Two-tier KV cache layout (`ruvllm_jax.cache.two_tier`): a high-precision tail, a quantized store.

    RuvLLM's fields and defaults: the newest `tail_length` tokens stay in `tail_precision` (FP32,
    FP16 or BF16); when the tail is full its oldest `migration_batch` tokens are quantized once into
    the store (`store_precision`: Q8, Q4, or a float precision), which holds up to `max_tokens`
    tokens in all (sinks, store and tail; the store is rounded up to whole blocks). `num_kv_heads`
    and `head_dim` are the facade's; generation takes them from the model.

    Ours: `num_sink_tokens` (default 0) keeps the first tokens forever, in tail precision;
    `eviction` (default True) evicts the oldest store blocks past `max_tokens`, False makes an
    append past it a `KvCacheError`. Bad values raise `KvCacheError` naming them.
    """

    tail_length: int = 256
    tail_precision: Precision = Precision.FP16
    store_precision: Precision = Precision.Q4
    max_tokens: int = 4096
    num_kv_heads: int = 8
    head_dim: int = 128
    migration_batch: int = 64
    num_sink_tokens: int = 0
    eviction: bool = True

    def __post_init__(self):
        for name in ("tail_length", "max_tokens", "num_kv_heads", "head_dim", "migration_batch"):
            value = getattr(self, name)
            if not _is_int(value) or value <= 0:
                raise KvCacheError(f"KvCacheConfig.{name} must be an int > 0, got {value!r}")
            object.__setattr__(self, name, int(value))
        if not _is_int(self.num_sink_tokens) or self.num_sink_tokens < 0:
            raise KvCacheError(f"KvCacheConfig.num_sink_tokens must be an int >= 0, got {self.num_sink_tokens!r}")
        object.__setattr__(self, "num_sink_tokens", int(self.num_sink_tokens))
        if not isinstance(self.eviction, bool):
            raise KvCacheError(f"KvCacheConfig.eviction must be a bool, got {self.eviction!r}")
        tails = (Precision.FP32, Precision.FP16, Precision.BF16)
        stores = (*tails, Precision.Q8, Precision.Q4)
        if self.tail_precision not in tails:
            raise KvCacheError(f"KvCacheConfig.tail_precision must be one of {[p.name for p in tails]}, "
                               f"got {self.tail_precision!r}")
        if self.store_precision not in stores:
            raise KvCacheError(f"KvCacheConfig.store_precision must be a cache precision, one of "
                               f"{[p.name for p in stores]}, got {self.store_precision!r}")
        if self.tail_length % self.migration_batch:
            raise KvCacheError(f"KvCacheConfig.tail_length={self.tail_length} must be a multiple of "
                               f"migration_batch={self.migration_batch} (the tail is whole blocks)")
        if self.head_dim % 2:
            raise KvCacheError(f"KvCacheConfig.head_dim={self.head_dim} must be even (4-bit codes pack two "
                               "channels per byte)")
        least = self.num_sink_tokens + self.tail_length + self.migration_batch
        if self.max_tokens < least:
            raise KvCacheError(
                f"KvCacheConfig.max_tokens={self.max_tokens} leaves no store block: it must be at least "
                f"num_sink_tokens + tail_length + migration_batch = {least}")

    def replace(self, **changes) -> "KvCacheConfig":
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """How to load a model.

    `quantization` None (the default) keeps what the file holds: a safetensors folder computes in
    float32 from its stored dtype, a GGUF keeps its tensors in their stored types (quantized blocks
    stay quantized, F16 stays F16). An explicit `Precision` converts every 2-D weight at load: FP32 /
    FP16 / BF16 keep floats of that width (FP32 on a GGUF dequantizes it); Q8, Q4 and Q4K quantize to
    GGML Q8_0, Q4_1 and Q4_K (Q5_0 where rows are not a multiple of 256, as llama.cpp does). Norms
    and biases stay float32. `use_flash_attention` False forces the plain jnp attention.

    `kv_cache_config` defaults to None (not RuvLLM's two-tier default): generation then keeps every
    key and value in a full-precision contiguous cache, exact against transformers. A
    `KvCacheConfig` turns on the lossy two-tier quantized cache (its `num_kv_heads`/`head_dim`
    are replaced by the model's), bounded in memory by its `max_tokens`.

    `mesh_shape` (data, model) lays the model out over data * model devices (`ruvllm_jax.sharding`:
    heads and MLP columns over `model`, batches over `data`); None (the default) is one device,
    `device`. The heads must divide over `model` (`ConfigError` at load otherwise).
    """

    max_context: int = 4096
    use_flash_attention: bool = True
    quantization: Optional[Precision] = None
    kv_cache_config: Optional[KvCacheConfig] = None
    device: Optional[DeviceType] = None  # None = best present
    hf_token: Optional[str] = None
    mesh_shape: Optional[tuple[int, int]] = None

    def __post_init__(self):
        if self.mesh_shape is not None:
            shape = self.mesh_shape
            if (not isinstance(shape, (tuple, list)) or len(shape) != 2
                    or not all(_is_int(n) and n >= 1 for n in shape)):
                raise ConfigError(f"mesh_shape must be None or (data, model), two ints >= 1, got {shape!r}")
            object.__setattr__(self, "mesh_shape", (int(shape[0]), int(shape[1])))
            if self.device is not None:
                raise ConfigError(f"pass either device={self.device} (one device) or mesh_shape={self.mesh_shape}, "
                                  "not both")
        if not _is_int(self.max_context) or self.max_context <= 0:
            raise ConfigError(f"max_context must be an int > 0, got {self.max_context!r}")
        if not isinstance(self.use_flash_attention, bool):
            raise ConfigError(f"use_flash_attention must be a bool, got {self.use_flash_attention!r}")
        if self.quantization is not None and not isinstance(self.quantization, Precision):
            raise ConfigError(f"quantization must be None or a Precision, got {self.quantization!r}")
        if self.kv_cache_config is not None and not isinstance(self.kv_cache_config, KvCacheConfig):
            raise ConfigError(f"kv_cache_config must be None or a KvCacheConfig, got {self.kv_cache_config!r}")
        if self.device is not None and not isinstance(self.device, DeviceType):
            raise ConfigError(
                f"device must be a DeviceType (e.g. DeviceType.Cpu, DeviceType.Cuda(0)) or None, got {self.device!r}"
            )
        if self.hf_token is not None and not isinstance(self.hf_token, str):
            raise ConfigError(f"hf_token must be a str or None, got {type(self.hf_token).__name__}")
        object.__setattr__(self, "max_context", int(self.max_context))


@dataclasses.dataclass(frozen=True)
class GenerateParams:
    """Sampling parameters; temperature 0 means greedy. Validated on construction.

    - max_tokens: int >= 0 (bools are not ints).
    - temperature: 0 (greedy) or a real in [2**-126, 3.4e38] (sampling runs in float32, so
      anything outside would become 0 or inf); top_p: a real in (0, 1], at least 2**-126;
      repetition_penalty: a real in [2**-126, 3.4e38] (1.0 = off).
    - top_k: int >= 0 (0 = off); at generation it must not exceed the model's vocabulary.
    - stop_sequences: a tuple or list of non-empty strs (one str is taken as a single stop).
    - seed: None (fresh entropy) or an int in [0, 2**64); each seed gives its own stream.
    """

    max_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 0
    repetition_penalty: float = 1.1
    stop_sequences: tuple[str, ...] = ()
    seed: Optional[int] = None

    def __post_init__(self):
        if not _is_int(self.max_tokens) or self.max_tokens < 0:
            raise ConfigError(f"max_tokens must be an int >= 0, got {self.max_tokens!r}")
        if not (_as_float(self.temperature) == 0.0 or _positive_f32(self.temperature)):
            raise ConfigError(
                f"temperature must be 0 (greedy) or a finite number in [2**-126, 3.4e38] (float32), "
                f"got {self.temperature!r}"
            )
        f = _as_float(self.top_p)
        if f is None or not (_F32_MIN_NORMAL <= f <= 1.0):
            raise ConfigError(f"top_p must be a number in (0, 1] (at least 2**-126), got {self.top_p!r}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise ConfigError(f"top_k must be an int >= 0 (0 disables it), got {self.top_k!r}")
        if not _positive_f32(self.repetition_penalty):
            raise ConfigError(
                f"repetition_penalty must be a finite number > 0 in [2**-126, 3.4e38] (float32; 1.0 = off), "
                f"got {self.repetition_penalty!r}"
            )
        stops = self.stop_sequences
        if isinstance(stops, str):
            stops = (stops,)
        if not isinstance(stops, (tuple, list)):
            raise ConfigError(
                f"stop_sequences must be a tuple or list of non-empty strs, got {type(stops).__name__} {stops!r}"
            )
        bad = [s for s in stops if not isinstance(s, str) or not s]
        if bad:
            raise ConfigError(f"stop_sequences must be non-empty strs, got {bad[0]!r} in {tuple(stops)!r}")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < SEED_LIMIT):
            raise ConfigError(f"seed must be None or an int in [0, 2**64), got {self.seed!r}")
        # Plain Python values, so equal params hash and compare equal whatever number types built them.
        object.__setattr__(self, "stop_sequences", tuple(stops))
        object.__setattr__(self, "max_tokens", int(self.max_tokens))
        object.__setattr__(self, "top_k", int(self.top_k))
        if self.seed is not None:
            object.__setattr__(self, "seed", int(self.seed))

    def replace(self, **changes) -> "GenerateParams":
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What a loaded model is."""

    name: str
    architecture: str
    num_parameters: int
    size: ModelSize
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_context: int
    dtype: str  # storage kinds by bytes held, e.g. "float32" or "Q5_0+Q8_0+Q4_K+float32"
    quantization: Optional[Precision]  # as requested, else of the kind holding most bytes (None: Q5_0/Q6_K)
    path: str


@dataclasses.dataclass(frozen=True)
class MemoryStats:
    """Real bytes held on the device by the loaded model and its KV cache."""

    params_bytes: int
    cache_bytes: int
    device: str

    @property
    def total_bytes(self) -> int:
        return self.params_bytes + self.cache_bytes
