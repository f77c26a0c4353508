"""GGML block formats: host-side quantize/dequantize in numpy, and a jnp dequantizer for use under jit.

Bytes are exactly GGML's (see `ruvllm_jax.quant.tensor`), so a GGUF tensor loads as-is and ours export
as-is. `dequantize` and `dequantize_rows_jnp` do the same float32 operations, in the same order, as
ggml's reference dequantizers (gguf-py's numpy ports), so all three agree bit for bit.

Quantizers, and the round-trip bound each guarantees for every finite input whose scales fit in f16
(A = max |x| of the block, blocks of 32 for Q8_0/Q4_1/Q5_0 and 256 for the K formats; eps = 2^-11 is f16's
relative rounding and the absolute tails cover f16 subnormal scales):

* Q8_0: ggml's `quantize_row_q8_0_ref` (d = A / 127, round half away from zero): byte-identical to
  llama.cpp. |err| <= A * (1/254 + eps) + 2^-18.
* Q4_1: ggml's `quantize_row_q4_1_ref` (d = (max - min) / 15, m = min): byte-identical.
  |err| <= (max - min) * (1/30 + eps) + |min| * eps + 2^-20 <= A * (1/15 + 3 eps) + 2^-20.
* Q5_0: ggml's `quantize_row_q5_0_ref` (the signed extreme maps to -16): byte-identical. The opposite
  end clips at +15, so |err| <= A * (1/16 + 16 eps) + 2^-20.
* Q4_K: ours (not llama.cpp's make_qkx2 search): per sub-block of 32, min(x, 0) and max(x) set an
  affine 4-bit grid; the 6-bit scales and mins are taken relative to super-block scales d, dmin that
  are rounded *up* to f16 (so f16 rounding never overflows a 6-bit code), and the 4-bit codes are then
  re-derived from the stored grid. |err| <= A / 14 + 2^-20 (in-range values: sub-block range / 30 + A / 1890).
* Q6_K: ours, likewise: per sub-block of 16 the signed extreme maps to -32, 8-bit scales relative to
  an f16 super-scale rounded away from zero, codes re-derived from the stored grid.
  |err| <= A * 5/128 + 2^-19 (the 5/128 is the +31 end clipping a value as large as the extreme).

Inputs that are not 2-D, whose columns are not whole blocks, that hold NaN/inf, or whose block scales
overflow f16 raise `ConfigError` (|x| beyond about 8.3e6 for Q8_0, 65504 for Q4_1, 1e6 for Q5_0, 4e6 for
Q4_K, 2.6e8 for Q6_K; GGML would silently store inf).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ruvllm_jax.errors import ConfigError
from ruvllm_jax.quant.tensor import QuantizedTensor, block_format

# Blocks handled per numpy pass: bounds the temporaries of quantize/dequantize to a few tens of MB.
_CHUNK_BLOCKS = 1 << 16
_F32 = np.float32


# ----------------------------------------------------------------------------------------------------------
# small numpy helpers


_JUST_BELOW_HALF = np.nextafter(_F32(0.5), _F32(0))


def _round_half_away(v: np.ndarray) -> np.ndarray:
    """C's roundf in float32, as gguf-py's np_roundf, in two passes instead of its seven (a third of
    a Q8 conversion at load was spent here).

    `trunc(v + 0.5)` would double-round: 0.49999997 + 0.5 rounds up to 1.0 in float32. Adding the
    largest float below one half instead never carries a fraction below .5 to the next integer,
    while the sum's own rounding still carries every fraction of .5 or more (ties included). Checked
    equal to np_roundf on every finite float32 of both signs; tests/quant/test_formats.py compares
    the two on every float near the half-integers, at binade edges and across magnitudes."""
    return np.trunc(v + np.copysign(_JUST_BELOW_HALF, v))


def _inverse(d: np.ndarray) -> np.ndarray:
    """ggml's `id = d ? 1/d : 0`, except that a 1/d overflowing float32 is also 0.

    That only happens for blocks below ~1e-37, whose f16 scale is 0 anyway: ggml would cast inf/NaN codes
    to int8 (undefined behaviour in C); we write zero codes, which decode to the same zeros.
    """
    with np.errstate(divide="ignore", over="ignore"):
        inv = _F32(1) / d
    return np.where(np.isfinite(inv), inv, _F32(0)).astype(_F32)


def _f16_up(v: np.ndarray) -> np.ndarray:
    """The smallest float16 >= v (v >= 0): a super-scale that never pushes a sub-block code past its maximum."""
    with np.errstate(over="ignore"):
        h = v.astype(np.float16)
    low = h.astype(_F32) < v
    return np.where(low, np.nextafter(h, np.float16(np.inf)), h)


def _f16_bytes(v: np.ndarray) -> np.ndarray:
    """[n] float16 -> [n, 2] uint8, little-endian as GGML stores it."""
    return np.ascontiguousarray(v, dtype="<f2").view(np.uint8).reshape(-1, 2)


def _f16_field(blocks: np.ndarray, start: int) -> np.ndarray:
    """The f16 at byte `start` of every block, as float32 [n, 1]."""
    return np.ascontiguousarray(blocks[:, start : start + 2]).view("<f2").astype(_F32)


def _check_scales(scales: np.ndarray, blocks: np.ndarray, qtype: str) -> None:
    if not np.isfinite(scales.astype(_F32)).all():
        bad = np.nonzero(~np.isfinite(scales.astype(_F32)).reshape(len(blocks), -1).all(axis=1))[0][0]
        big = float(np.abs(blocks[bad]).max())
        raise ConfigError(f"{qtype} cannot hold values as large as {big:g}: the block scale overflows f16")


# ----------------------------------------------------------------------------------------------------------
# quantizers: float32 [n, block] -> uint8 [n, type_size]


def _quantize_q8_0(b: np.ndarray) -> np.ndarray:
    d = np.abs(b).max(axis=1, keepdims=True) / _F32(127)
    inv = _inverse(d)
    q = _round_half_away(b * inv).astype(np.int8)
    with np.errstate(over="ignore"):
        d16 = d.astype(np.float16)
    _check_scales(d16, b, "Q8_0")
    return np.concatenate([_f16_bytes(d16), q.view(np.uint8)], axis=1)


def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    """uint8 [n, 32] codes -> [n, 16]: byte j = code j | code j+16 << 4."""
    return q[:, :16] | (q[:, 16:] << np.uint8(4))


def _quantize_q4_1(b: np.ndarray) -> np.ndarray:
    mx = b.max(axis=1, keepdims=True)
    mn = b.min(axis=1, keepdims=True)
    d = (mx - mn) / _F32(15)
    inv = _inverse(d)
    q = np.trunc((b - mn) * inv + _F32(0.5)).astype(np.uint8).clip(0, 15)
    with np.errstate(over="ignore"):
        d16, m16 = d.astype(np.float16), mn.astype(np.float16)
    _check_scales(np.concatenate([d16, m16], axis=1), b, "Q4_1")
    return np.concatenate([_f16_bytes(d16), _f16_bytes(m16), _pack_nibbles(q)], axis=1)


def _quantize_q5_0(b: np.ndarray) -> np.ndarray:
    n = len(b)
    imax = np.abs(b).argmax(axis=1)[:, None]
    d = np.take_along_axis(b, imax, axis=1) / _F32(-16)
    inv = _inverse(d)
    q = np.trunc(b * inv + _F32(16.5)).astype(np.uint8).clip(0, 31)
    qh = np.packbits((q >> np.uint8(4)).reshape(n, 32), axis=1, bitorder="little")
    with np.errstate(over="ignore"):
        d16 = d.astype(np.float16)
    _check_scales(d16, b, "Q5_0")
    return np.concatenate([_f16_bytes(d16), qh, _pack_nibbles(q & np.uint8(15))], axis=1)


def _quantize_q4_k(b: np.ndarray) -> np.ndarray:
    n = len(b)
    x = b.reshape(n, 8, 32)
    mn = np.minimum(x.min(axis=2), 0)  # GGML's mins are offsets below zero
    mx = x.max(axis=2)
    scale = (mx - mn) / _F32(15)  # [n, 8] grid step of each sub-block
    offset = -mn
    with np.errstate(over="ignore"):
        d = _f16_up(scale.max(axis=1) / _F32(63))
        dmin = _f16_up(offset.max(axis=1) / _F32(63))
    _check_scales(np.stack([d, dmin], axis=1), b, "Q4_K")
    df, dminf = d.astype(_F32)[:, None], dmin.astype(_F32)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(df > 0, np.rint(scale / df), 0).clip(0, 63).astype(np.uint8)
        mi = np.where(dminf > 0, np.rint(offset / dminf), 0).clip(0, 63).astype(np.uint8)
        step = (df * sc.astype(_F32))[..., None]  # the grid as stored, so codes see what decoding will
        low = (dminf * mi.astype(_F32))[..., None]
        codes = np.where(step > 0, np.rint((x + low) / step), 0).clip(0, 15).astype(np.uint8)
    packed = np.empty((n, 12), np.uint8)
    packed[:, 0:4] = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    packed[:, 4:8] = mi[:, :4] | ((mi[:, 4:] >> 4) << 6)
    packed[:, 8:12] = (sc[:, 4:] & 15) | ((mi[:, 4:] & 15) << 4)
    pairs = codes.reshape(n, 4, 2, 32)  # chunk c of qs: sub-block 2c low nibbles, 2c + 1 high
    qs = (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(n, 128)
    return np.concatenate([_f16_bytes(d), _f16_bytes(dmin), packed, qs], axis=1)


def _quantize_q6_k(b: np.ndarray) -> np.ndarray:
    n = len(b)
    x = b.reshape(n, 16, 16)
    imax = np.abs(x).argmax(axis=2)[..., None]
    scale = np.take_along_axis(x, imax, axis=2)[..., 0] / _F32(-32)  # [n, 16], the extreme maps to -32
    star = np.take_along_axis(scale, np.abs(scale).argmax(axis=1)[:, None], axis=1)[:, 0]
    with np.errstate(over="ignore"):
        mag = _f16_up(np.abs(star) / _F32(128))
    _check_scales(mag, b, "Q6_K")
    d = np.where(star > 0, -mag, mag)  # the largest scale gets code -128
    df = d.astype(_F32)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(df != 0, np.rint(scale / df), 0).clip(-128, 127).astype(np.int8)
        step = (df * sc.astype(_F32))[..., None]
        codes = (np.where(step != 0, np.rint(x / step), 0).clip(-32, 31) + 32).astype(np.uint8)
    q = codes.reshape(n, 2, 4, 32)  # [half, quarter, l]
    ql = ((q[:, :, 0:2] & 15) | ((q[:, :, 2:4] & 15) << 4)).reshape(n, 128)
    qh = ((q[:, :, 0] >> 4) | ((q[:, :, 1] >> 4) << 2) | ((q[:, :, 2] >> 4) << 4) | ((q[:, :, 3] >> 4) << 6)).reshape(
        n, 64
    )
    return np.concatenate([ql, qh, sc.view(np.uint8), _f16_bytes(d)], axis=1)


_QUANTIZERS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "Q8_0": _quantize_q8_0,
    "Q4_1": _quantize_q4_1,
    "Q5_0": _quantize_q5_0,
    "Q4_K": _quantize_q4_k,
    "Q6_K": _quantize_q6_k,
}


def quantize(w: np.ndarray, qtype: str) -> QuantizedTensor:
    """A float [rows, cols] matrix as GGML blocks of `qtype` (host numpy; bounds in the module docstring)."""
    fmt = block_format(qtype)
    arr = np.asarray(w)
    if arr.ndim != 2:
        raise ConfigError(f"quantize needs a 2-D [rows, cols] matrix, got shape {arr.shape}")
    if arr.dtype.kind not in "fiu" and arr.dtype.name != "bfloat16":
        raise ConfigError(f"quantize needs a real floating-point matrix, got dtype {arr.dtype}")
    rows, cols = arr.shape
    row_bytes = fmt.row_bytes(cols)
    x = arr.astype(_F32, copy=False)
    finite = np.isfinite(x)
    if not finite.all():
        r, c = (int(i[0]) for i in np.nonzero(~finite))
        raise ConfigError(f"quantize needs finite weights, got {x[r, c]} at [{r}, {c}]")
    blocks = x.reshape(-1, fmt.block_size)
    out = np.empty((len(blocks), fmt.type_size), np.uint8)
    for start in range(0, len(blocks), _CHUNK_BLOCKS):
        out[start : start + _CHUNK_BLOCKS] = _QUANTIZERS[qtype](blocks[start : start + _CHUNK_BLOCKS])
    return QuantizedTensor(out.reshape(rows, row_bytes), qtype, (rows, cols))


# ----------------------------------------------------------------------------------------------------------
# numpy dequantizers: uint8 [n, type_size] -> float32 [n, block], ops in ggml's order


def _nibble_codes(qs: np.ndarray) -> np.ndarray:
    """uint8 [n, 16] -> uint8 [n, 32] codes (low nibbles first)."""
    out = np.empty((len(qs), 2, 16), np.uint8)
    np.bitwise_and(qs, np.uint8(15), out=out[:, 0])
    np.right_shift(qs, np.uint8(4), out=out[:, 1])
    return out.reshape(len(qs), 32)


def _dequantize_q8_0(blocks: np.ndarray) -> np.ndarray:
    out = blocks[:, 2:].view(np.int8).astype(_F32)
    out *= _f16_field(blocks, 0)
    return out


def _dequantize_q4_1(blocks: np.ndarray) -> np.ndarray:
    out = _nibble_codes(blocks[:, 4:]).astype(_F32)
    out *= _f16_field(blocks, 0)
    out += _f16_field(blocks, 2)
    return out


def _dequantize_q5_0(blocks: np.ndarray) -> np.ndarray:
    codes = _nibble_codes(blocks[:, 6:])
    codes |= np.unpackbits(blocks[:, 2:6], axis=1, bitorder="little") << np.uint8(4)  # bit j of qh: weight j
    out = codes.view(np.int8) - np.int8(16)
    return out.astype(_F32) * _f16_field(blocks, 0)


def _q4_k_scales(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """GGML's get_scale_min_k4 for all eight sub-blocks: uint8 [n, 12] -> (scales, mins) uint8 [n, 8]."""
    a, b, c = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    sc = np.concatenate([a & 63, (c & 15) | ((a >> 2) & 48)], axis=1)
    mi = np.concatenate([b & 63, (c >> 4) | ((b >> 2) & 48)], axis=1)
    return sc, mi


def _dequantize_q4_k(blocks: np.ndarray) -> np.ndarray:
    n = len(blocks)
    sc, mi = _q4_k_scales(blocks[:, 4:16])
    step = _f16_field(blocks, 0) * sc.astype(_F32)
    low = _f16_field(blocks, 2) * mi.astype(_F32)
    qs = blocks[:, 16:].reshape(n, 4, 1, 32)
    out = np.empty((n, 4, 2, 32), _F32)
    out[:, :, 0] = qs[:, :, 0] & np.uint8(15)
    out[:, :, 1] = qs[:, :, 0] >> np.uint8(4)
    out = out.reshape(n, 8, 32)
    out *= step[..., None]
    out -= low[..., None]
    return out.reshape(n, 256)


def _dequantize_q6_k(blocks: np.ndarray) -> np.ndarray:
    n = len(blocks)
    ql = blocks[:, 0:128].reshape(n, 2, 1, 2, 32)  # [half, -, l // 32, l % 32]
    qh = blocks[:, 128:192].reshape(n, 2, 1, 32)
    low = np.concatenate([ql & np.uint8(15), ql >> np.uint8(4)], axis=2).reshape(n, 2, 4, 32)
    high = (qh >> np.array([0, 2, 4, 6], np.uint8)[:, None]) & np.uint8(3)
    out = (low | (high << np.uint8(4))).astype(_F32)
    out -= _F32(32)
    step = _f16_field(blocks, 208) * blocks[:, 192:208].view(np.int8).astype(_F32)  # [n, 16]
    out = out.reshape(n, 16, 16)
    out *= step[..., None]
    return out.reshape(n, 256)


_DEQUANTIZERS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "Q8_0": _dequantize_q8_0,
    "Q4_1": _dequantize_q4_1,
    "Q5_0": _dequantize_q5_0,
    "Q4_K": _dequantize_q4_k,
    "Q6_K": _dequantize_q6_k,
}


def dequantize(qt: QuantizedTensor) -> np.ndarray:
    """The float32 [rows, cols] matrix `qt` encodes (host numpy), bit-equal to ggml's reference dequantizers."""
    fmt = block_format(qt.qtype)
    rows, cols = qt.shape
    data = np.asarray(qt.data, dtype=np.uint8)
    if data.shape != (rows, fmt.row_bytes(cols)):
        want = (rows, fmt.row_bytes(cols))
        raise ConfigError(f"{qt.qtype} data for shape {qt.shape} must have shape {want}, got {data.shape}")
    blocks = data.reshape(-1, fmt.type_size)
    out = np.empty((len(blocks), fmt.block_size), _F32)
    for start in range(0, len(blocks), _CHUNK_BLOCKS):
        out[start : start + _CHUNK_BLOCKS] = _DEQUANTIZERS[qt.qtype](blocks[start : start + _CHUNK_BLOCKS])
    return out.reshape(rows, cols)


# ----------------------------------------------------------------------------------------------------------
# jnp dequantizer: uint8 [..., nb, type_size] -> float32 [..., nb, block], the same ops as above


def _jf16(blocks: jax.Array, start: int) -> jax.Array:
    """The f16 at byte `start` of each block, as float32 [..., nb, 1].

    (A bitcast, which XLA:CPU computes once per block in its own small loop; assembling the word with
    shifts instead fuses it into the decoding, which then converts f16 -> f32 once per weight: 8x slower.)
    """
    return jax.lax.bitcast_convert_type(blocks[..., start : start + 2], jnp.float16).astype(jnp.float32)[..., None]


def _jnibbles(qs: jax.Array) -> jax.Array:
    """uint8 [..., k] -> uint8 [..., 2, k]: low nibbles, then high ones."""
    return jnp.stack([qs & 15, qs >> 4], axis=-2)


def _jq8_0(blocks: jax.Array) -> jax.Array:
    q = jax.lax.bitcast_convert_type(blocks[..., 2:], jnp.int8).astype(jnp.float32)
    return q * _jf16(blocks, 0)


def _jq4_1(blocks: jax.Array) -> jax.Array:
    # A broadcast shift rather than `_jnibbles`' stack: measured 2-3x faster for Q4_1 on XLA:CPU (and
    # slower for Q4_K, whose decoding keeps the stack).
    qs = blocks[..., None, 4:] >> jnp.array([0, 4], jnp.uint8)[:, None]
    q = (qs & 15).reshape(*blocks.shape[:-1], 32).astype(jnp.float32)
    return q * _jf16(blocks, 0) + _jf16(blocks, 2)


def _jq5_0(blocks: jax.Array) -> jax.Array:
    qh = jax.lax.bitcast_convert_type(blocks[..., 2:6], jnp.uint32)[..., None]
    high = ((qh >> jnp.arange(32, dtype=jnp.uint32)) & 1).astype(jnp.uint8)
    q = _jnibbles(blocks[..., 6:]).reshape(*blocks.shape[:-1], 32) | (high << 4)
    return (q.astype(jnp.int32) - 16).astype(jnp.float32) * _jf16(blocks, 0)


def q4_k_scales_jnp(packed: jax.Array) -> tuple[jax.Array, jax.Array]:
    """GGML's get_scale_min_k4 in jnp: uint8 [..., 12] -> (scales, mins) uint8 [..., 8]."""
    a, b, c = packed[..., 0:4], packed[..., 4:8], packed[..., 8:12]
    sc = jnp.concatenate([a & 63, (c & 15) | ((a >> 2) & 48)], axis=-1)
    mi = jnp.concatenate([b & 63, (c >> 4) | ((b >> 2) & 48)], axis=-1)
    return sc, mi


def _jq4_k(blocks: jax.Array) -> jax.Array:
    lead = blocks.shape[:-1]
    sc, mi = q4_k_scales_jnp(blocks[..., 4:16])
    step = (_jf16(blocks, 0) * sc.astype(jnp.float32))[..., None]  # [..., nb, 8, 1]
    low = (_jf16(blocks, 2) * mi.astype(jnp.float32))[..., None]
    qs = blocks[..., 16:].reshape(*lead, 4, 32)
    q = _jnibbles(qs).reshape(*lead, 8, 32).astype(jnp.float32)
    return (q * step - low).reshape(*lead, 256)


def _jq6_k(blocks: jax.Array) -> jax.Array:
    lead = blocks.shape[:-1]
    ql = blocks[..., 0:128].reshape(*lead, 2, 2, 32)  # [half, l // 32, l % 32]
    qh = blocks[..., 128:192].reshape(*lead, 2, 1, 32)
    low = jnp.concatenate([ql & 15, ql >> 4], axis=-2)  # [half, quarter, l]
    high = (qh >> jnp.array([0, 2, 4, 6], jnp.uint8)[:, None]) & 3
    q = ((low | (high << 4)).astype(jnp.int32) - 32).astype(jnp.float32).reshape(*lead, 16, 16)
    sc = jax.lax.bitcast_convert_type(blocks[..., 192:208], jnp.int8).astype(jnp.float32)
    step = (_jf16(blocks, 208) * sc)[..., None]
    return (q * step).reshape(*lead, 256)


_JNP_DEQUANTIZERS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "Q8_0": _jq8_0,
    "Q4_1": _jq4_1,
    "Q5_0": _jq5_0,
    "Q4_K": _jq4_k,
    "Q6_K": _jq6_k,
}


def dequantize_blocks_jnp(data: jax.Array, qtype: str, cols: int) -> jax.Array:
    """uint8 [..., row_bytes] -> float32 [..., cols // block, block]: the blocked view the matmul reduces over."""
    fmt = block_format(qtype)
    row_bytes = fmt.row_bytes(cols)
    if data.shape[-1] != row_bytes:
        raise ConfigError(f"{qtype} rows of {cols} weights are {row_bytes} bytes, got {data.shape[-1]}")
    blocks = jnp.asarray(data, jnp.uint8).reshape(*data.shape[:-1], cols // fmt.block_size, fmt.type_size)
    return _JNP_DEQUANTIZERS[qtype](blocks)


def dequantize_rows_jnp(data: jax.Array, qtype: str, cols: int) -> jax.Array:
    """uint8 [..., row_bytes] rows of blocks -> float32 [..., cols]; traceable, so gather rows first, then call."""
    out = dequantize_blocks_jnp(data, qtype, cols)
    return out.reshape(*out.shape[:-2], cols)
