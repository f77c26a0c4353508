"""Static attention configuration shared by every kernel family: what to compute and how to run it.

`AttentionConfig` is RuvLLM's struct (heads, KV heads, head_dim, causal, scale): *what* attention
computes. `KernelOptions` says *how*: the path (`impl`), Pallas interpret mode, the Pallas backend
and every family's tile sizes, in one frozen (hashable, jit-static) object that travels from the
model down to the kernels. `KernelOptions.path()` resolves it to one concrete path:

* ``"jnp"``: the plain-jnp path (what CPU runs, and what the backward passes reuse);
* ``"triton"``: the Pallas GPU kernels (Triton lowering), on a GPU or in interpret mode anywhere;
* ``"mosaic"``: the Pallas TPU kernels, on a TPU or in TPU interpret mode anywhere.

``impl="xla"`` is accepted as an older spelling of ``"jnp"``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import jax
import jax.numpy as jnp

from ruvllm_jax.errors import ConfigError

IMPLS = ("auto", "pallas", "jnp")
IMPL_ALIASES = {"xla": "jnp"}  # the name this path had before it was called after what it is written in
PALLAS_BACKENDS = ("triton", "mosaic")
_ACCELERATORS = ("gpu", "cuda", "rocm", "tpu")


@dataclasses.dataclass(frozen=True, slots=True)
class FlashBlockSizes:
    """Prefill tiles: query positions per tile (times the padded group gives the rows), keys per tile."""

    block_q: int = 64
    block_k: int = 64


@dataclasses.dataclass(frozen=True, slots=True)
class DecodeBlockSizes:
    """Decode tiles: keys per inner tile, and the most K splits (parallel programs along the cache)."""

    block_k: int = 128
    max_splits: int = 16


@dataclasses.dataclass(frozen=True, slots=True)
class PagedBlockSizes:
    """Paged tiles: pages gathered per inner step (Triton), and the most K splits along the table."""

    pages_per_compute_block: int = 4
    max_splits: int = 8


@dataclasses.dataclass(frozen=True, slots=True)
class BlockSizes:
    """Every kernel family's tile sizes (as `jax.experimental.pallas.ops` take `block_sizes=`)."""

    flash: FlashBlockSizes = FlashBlockSizes()
    decode: DecodeBlockSizes = DecodeBlockSizes()
    paged: PagedBlockSizes = PagedBlockSizes()

    def __post_init__(self):
        for family in (self.flash, self.decode, self.paged):
            for field in dataclasses.fields(family):
                value = getattr(family, field.name)
                if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                    raise ConfigError(f"{type(family).__name__}.{field.name} must be a positive int, got {value!r}")


QUANTIZED_MATMUL_IMPLS = ("auto", "native", "jnp")


@dataclasses.dataclass(frozen=True, slots=True)
class KernelOptions:
    """How attention runs: `impl` ("auto" | "pallas" | "jnp"), `interpret` (run Pallas kernels on
    CPU, for tests), `pallas_backend` ("triton" | "mosaic" | None = the device's) and `block_sizes`;
    and how linears with quantized weights multiply: `quantized_matmul` ("auto": the native CPU
    kernel where it is built, else jnp; "native"; "jnp"), see `ruvllm_jax.quant.matmul`; and `mesh`,
    the `jax.sharding.Mesh` the model is laid out on (None: one device), on which the products XLA
    cannot partition (the native quantized kernel) run per shard (see `ruvllm_jax.sharding`);
    `layer_scan`: let a cached prefill or decode over native quantized layers run them as one
    `lax.scan` (see `ruvllm_jax.models.llama`); False keeps the unrolled loop everywhere.

    Frozen and hashable: models, engines and kernels take it as one static jit argument.
    """

    impl: str = "auto"
    interpret: bool = False
    pallas_backend: Optional[str] = None
    block_sizes: BlockSizes = BlockSizes()
    quantized_matmul: str = "auto"
    mesh: Optional[jax.sharding.Mesh] = None
    layer_scan: bool = True

    def __post_init__(self):
        impl = IMPL_ALIASES.get(self.impl, self.impl) if isinstance(self.impl, str) else self.impl
        if impl not in IMPLS:
            raise ConfigError(f"impl must be one of {IMPLS}, got {self.impl!r}")
        object.__setattr__(self, "impl", impl)
        if self.pallas_backend is not None and self.pallas_backend not in PALLAS_BACKENDS:
            raise ConfigError(f"pallas_backend must be one of {PALLAS_BACKENDS} or None, got {self.pallas_backend!r}")
        if not isinstance(self.interpret, bool):
            raise ConfigError(f"interpret must be a bool, got {self.interpret!r}")
        if not isinstance(self.block_sizes, BlockSizes):
            raise ConfigError(f"block_sizes must be a BlockSizes, got {self.block_sizes!r}")
        if self.quantized_matmul not in QUANTIZED_MATMUL_IMPLS:
            raise ConfigError(
                f"quantized_matmul must be one of {QUANTIZED_MATMUL_IMPLS}, got {self.quantized_matmul!r}")
        if not isinstance(self.layer_scan, bool):
            raise ConfigError(f"layer_scan must be a bool, got {self.layer_scan!r}")
        if self.mesh is not None and not isinstance(self.mesh, jax.sharding.Mesh):
            raise ConfigError(f"mesh must be None or a jax.sharding.Mesh, got {self.mesh!r}")

    def pallas_target(self) -> str:
        """The Pallas backend the kernels lower for: the one asked for, else the device's."""
        if self.pallas_backend is not None:
            return self.pallas_backend
        return "mosaic" if jax.default_backend() == "tpu" else "triton"

    def path(self, *, has_mosaic: bool = True) -> str:
        """"jnp", "triton" or "mosaic" on this device (see module doc); `ConfigError` when a Pallas
        kernel cannot compile here. A family without a Mosaic kernel (`has_mosaic=False`) runs jnp
        on TPU under "auto"."""
        platform = jax.default_backend()
        impl = self.impl
        if impl == "auto":
            impl = "pallas" if platform in _ACCELERATORS else "jnp"
            if platform == "tpu" and not has_mosaic and self.pallas_backend is None:
                impl = "jnp"
        if impl == "jnp":
            return "jnp"
        backend = self.pallas_target()
        native = {"triton": ("gpu", "cuda", "rocm"), "mosaic": ("tpu",)}[backend]
        if platform not in native and not self.interpret:
            raise ConfigError(
                f"impl='pallas' ({backend}) cannot compile on the {platform!r} backend; "
                "use impl='jnp' (or 'auto'), or pass interpret=True to run the Pallas kernel in interpret mode"
            )
        return backend


@dataclasses.dataclass(frozen=True, slots=True)
class AttentionConfig:
    """RuvLLM's `AttentionConfig`: head counts, head size, causal flag and an optional scale."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    causal: bool = True
    scale: Optional[float] = None

    def __post_init__(self):
        for name in ("num_heads", "num_kv_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"AttentionConfig.{name} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"AttentionConfig.num_heads={self.num_heads} is not a multiple of "
                f"num_kv_heads={self.num_kv_heads}"
            )
        if self.scale is not None and not (math.isfinite(self.scale) and self.scale != 0):
            raise ConfigError(f"AttentionConfig.scale must be a finite non-zero float or None, got {self.scale!r}")

    def gqa_ratio(self) -> int:
        """Query heads per KV head (1 = MHA, num_heads = MQA)."""
        return self.num_heads // self.num_kv_heads

    def effective_scale(self) -> float:
        """The softmax scale: `scale` if set, else 1/sqrt(head_dim)."""
        return default_scale(self.scale, self.head_dim)


def default_scale(scale: Optional[float], head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)


def check_window(sliding_window: Optional[int]) -> Optional[int]:
    if sliding_window is None:
        return None
    if isinstance(sliding_window, bool) or int(sliding_window) != sliding_window or sliding_window < 1:
        raise ConfigError(f"sliding_window must be a positive int or None, got {sliding_window!r}")
    return int(sliding_window)


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def pad_axis(x: jax.Array, axis: int, size: int) -> jax.Array:
    """Zero-pad `x` along `axis` up to `size` (no copy when it already has that size)."""
    extra = size - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths)


def compute_dtype(*dtypes) -> jnp.dtype:
    """At least float32 (float64 stays float64 under x64): the dtype softmax statistics live in."""
    return jnp.promote_types(jnp.result_type(*dtypes), jnp.float32)
