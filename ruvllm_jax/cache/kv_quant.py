"""KIVI quantization of KV blocks: keys per channel over a block of tokens, values per token.

Keys have a few outlier *channels* (the same channel is large for every token), values do not, so
KIVI (Liu et al., 2024) quantizes keys along the token axis (one scale per channel per block) and
values along the channel axis (one scale per token). Layouts, for one block of BS tokens:

- 8 bits (`Precision.Q8`): symmetric int8 codes, code = round(x / s) in [-127, 127], no zero point;
- 4 bits (`Precision.Q4`): asymmetric unsigned codes, code = round((x - z) / s) in [0, 15], packed
  two per uint8: byte j of a row holds channel j in the low nibble and channel j + D/2 in the high
  nibble (halves, not neighbours, so a kernel unpacks with a mask and a shift and never interleaves).

Scales and zero points are float16 (KIVI's choice: with f32 they would cost a quarter of a Q4
block). They are rounded *before* the codes are computed, outward (z down, s up), so every value
lies inside the representable range and the error stays within s / 2 of the value.

Float stores (FP32 / FP16 / BF16) keep the values themselves: `bits` None, no scales.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ruvllm_jax.errors import KvCacheError
from ruvllm_jax.kernels.quantized import code_planes, dequantize_codes
from ruvllm_jax.types import Precision

SCALE_DTYPE = jnp.float16
F16_MAX = 65504.0  # values beyond it have no float16 tail entry, zero point or (Q8) scale
TAIL_PRECISIONS = (Precision.FP32, Precision.FP16, Precision.BF16)
STORE_PRECISIONS = (Precision.FP32, Precision.FP16, Precision.BF16, Precision.Q8, Precision.Q4)
_FLOAT_DTYPES = {Precision.FP32: jnp.float32, Precision.FP16: jnp.float16, Precision.BF16: jnp.bfloat16}
_BITS = {Precision.Q8: 8, Precision.Q4: 4}


class Quantized(NamedTuple):
    """codes [..., Dc] (int8, or uint8 with two codes per byte), scale and zero (None for 8 bits)."""

    codes: jax.Array
    scale: jax.Array
    zero: Optional[jax.Array]


def float_dtype(precision: Precision):
    """The array dtype of a float tier; `KvCacheError` for a quantized precision."""
    if precision not in _FLOAT_DTYPES:
        raise KvCacheError(f"{precision.name} is not a float precision; expected one of "
                           f"{[p.name for p in _FLOAT_DTYPES]}")
    return _FLOAT_DTYPES[precision]


def bits_of(precision: Precision) -> Optional[int]:
    """8 for Q8, 4 for Q4, None for a float store; `KvCacheError` for anything else (Q4K)."""
    if precision not in STORE_PRECISIONS:
        raise KvCacheError(f"{precision!r} is not a KV store precision; expected one of "
                           f"{[p.name for p in STORE_PRECISIONS]}")
    return _BITS.get(precision)


def _round_f16(x: jax.Array, direction: float) -> jax.Array:
    """x rounded to float16, then moved one step towards +inf (`direction` > 0) or -inf if it fell short."""
    r = x.astype(SCALE_DTYPE)
    short = (r.astype(jnp.float32) < x) if direction > 0 else (r.astype(jnp.float32) > x)
    return jnp.where(short, jnp.nextafter(r, jnp.asarray(direction * np.inf, SCALE_DTYPE)), r)


def pack4(codes: jax.Array) -> jax.Array:
    """uint8 codes [..., D] in [0, 15] -> [..., D/2]: channel j low nibble, channel j + D/2 high."""
    half = codes.shape[-1] // 2
    return codes[..., :half] | (codes[..., half:] << 4)


def unpack4(packed: jax.Array) -> jax.Array:
    """[..., D/2] uint8 -> [..., D] uint8 codes (the inverse of `pack4`; the kernels' code planes)."""
    return jnp.concatenate(code_planes(packed, 4), axis=-1)


def quantize(x: jax.Array, bits: int, axis: int) -> Quantized:
    """Quantize x [..., D] with one scale (and zero) per slice along `axis` (reduced over it).

    axis=-2 over [KVH, BS, D] gives per-channel key scales [KVH, D]; axis=-1 per-token value scales
    [KVH, BS]. All-equal slices get scale 0 and dequantize to their value rounded to float16.
    """
    x = x.astype(jnp.float32)
    if bits == 8:
        amax = jnp.max(jnp.abs(x), axis=axis)
        s = _round_f16(amax / 127.0, +1.0)
        s_safe = jnp.where(s == 0, 1.0, s.astype(jnp.float32))
        codes = jnp.clip(jnp.round(x / jnp.expand_dims(s_safe, axis)), -127, 127).astype(jnp.int8)
        return Quantized(codes, s, None)
    if bits == 4:
        lo, hi = jnp.min(x, axis=axis), jnp.max(x, axis=axis)
        z = _round_f16(lo, -1.0)
        s = _round_f16((hi - z.astype(jnp.float32)) / 15.0, +1.0)
        s_safe = jnp.where(s == 0, 1.0, s.astype(jnp.float32))
        shifted = x - jnp.expand_dims(z.astype(jnp.float32), axis)
        codes = jnp.clip(jnp.round(shifted / jnp.expand_dims(s_safe, axis)), 0, 15).astype(jnp.uint8)
        return Quantized(pack4(codes), s, z)
    raise KvCacheError(f"quantize takes bits 8 or 4, got {bits!r}")


def dequantize(q: Quantized, bits: int, axis: int, dtype=jnp.float32) -> jax.Array:
    """The values `quantize(x, bits, axis)` stands for, in `dtype` (what the attention kernels read)."""
    return dequantize_codes(q.codes, q.scale, q.zero, bits, axis, dtype)


def quantize_keys(k: jax.Array, bits: int) -> Quantized:
    """Keys [..., BS, D] of one block: per channel (scale/zero [..., D])."""
    return quantize(k, bits, axis=-2)


def quantize_values(v: jax.Array, bits: int) -> Quantized:
    """Values [..., BS, D] of one block: per token (scale/zero [..., BS])."""
    return quantize(v, bits, axis=-1)
