"""Static attention configuration and the `impl=` dispatch rules shared by every kernel family.

`AttentionConfig` is RuvLLM's struct (heads, KV heads, head_dim, causal, scale); `resolve_impl` turns
the public `impl=` / `interpret=` / `pallas_backend=` arguments into one concrete path:

* ``"xla"``: the plain-jnp path (what CPU runs, and what the backward passes reuse);
* ``"triton"``: the Pallas GPU kernels (Triton lowering), on a GPU or in interpret mode anywhere;
* ``"mosaic"``: the Pallas TPU kernels, on a TPU or in TPU interpret mode anywhere.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import jax
import jax.numpy as jnp

from ruvllm_jax.errors import ConfigError

IMPLS = ("auto", "pallas", "xla")
PALLAS_BACKENDS = ("triton", "mosaic")


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


def resolve_impl(impl: str, interpret: bool = False, pallas_backend: Optional[str] = None) -> str:
    """Map the public dispatch arguments to "xla", "triton" or "mosaic" (see module doc)."""
    if impl not in IMPLS:
        raise ConfigError(f"impl must be one of {IMPLS}, got {impl!r}")
    if pallas_backend is not None and pallas_backend not in PALLAS_BACKENDS:
        raise ConfigError(f"pallas_backend must be one of {PALLAS_BACKENDS} or None, got {pallas_backend!r}")
    platform = jax.default_backend()
    if impl == "auto":
        impl = "pallas" if platform in ("gpu", "cuda", "rocm", "tpu") else "xla"
    if impl == "xla":
        return "xla"
    if pallas_backend is None:
        pallas_backend = "mosaic" if platform == "tpu" else "triton"
    native = {"triton": ("gpu", "cuda", "rocm"), "mosaic": ("tpu",)}[pallas_backend]
    if platform not in native and not interpret:
        raise ConfigError(
            f"impl='pallas' ({pallas_backend}) cannot compile on the {platform!r} backend; "
            "use impl='xla' (or 'auto'), or pass interpret=True to run the Pallas kernel in interpret mode"
        )
    return pallas_backend


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
