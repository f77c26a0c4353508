"""KIVI quantization (`cache.kv_quant`) against a NumPy reference written here.

The reference follows the layout the module documents, independently of its code: keys one scale
(and zero) per channel over a block, values one per token; Q8 symmetric, code = round(x / s) in
[-127, 127] with s = amax / 127; Q4 asymmetric, code = round((x - z) / s) in [0, 15] with z = min and
s = (max - z) / 15, packed two per byte (channel j low nibble, channel j + D/2 high); scales and
zeros float16, rounded *outward* (z to the largest float16 <= min, s to the smallest float16 >= the
exact f32 quotient) before the codes are computed. Reproducing that rounding, the codes, scales and
zeros must be *equal*, not merely close. The error bound |x - dequant| <= s / 2 is checked on the
float64 dequantization of the returned codes (plus float32 rounding of x - z: 2^-22 of |x| + |z|).
"""

from __future__ import annotations

import chex
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ruvllm_jax.cache import kv_quant
from ruvllm_jax.errors import KvCacheError
from ruvllm_jax.types import Precision

F16_MAX = float(np.finfo(np.float16).max)


def f16_up(x32: np.ndarray) -> np.ndarray:
    """The smallest float16 >= x (x float32)."""
    r = x32.astype(np.float16)
    return np.where(r.astype(np.float32) < x32, np.nextafter(r, np.float16(np.inf)), r)


def f16_down(x32: np.ndarray) -> np.ndarray:
    """The largest float16 <= x (x float32)."""
    r = x32.astype(np.float16)
    return np.where(r.astype(np.float32) > x32, np.nextafter(r, np.float16(-np.inf)), r)


def kivi_np(x: np.ndarray, bits: int, axis: int, reciprocal: bool = False):
    """NumPy KIVI of x [..., BS, D] reduced over `axis` -> (unpacked int codes, f16 scale, f16 zero or None).

    The scale's f32 quotient (amax / 127, range / 15) is IEEE division, or with `reciprocal` a
    multiplication by the f32 reciprocal, which is what XLA:CPU compiles a division by a constant
    to (one f32 ulp apart, it can land the outward rounding on the next float16)."""
    x = x.astype(np.float32)

    def quotient(a, c):
        return a * (np.float32(1) / np.float32(c)) if reciprocal else a / np.float32(c)

    if bits == 8:
        s = f16_up(quotient(np.max(np.abs(x), axis=axis), 127))
        safe = np.where(s == 0, np.float32(1), s.astype(np.float32))
        codes = np.clip(np.round(x / np.expand_dims(safe, axis)), -127, 127).astype(np.int64)
        return codes, s, None
    z = f16_down(np.min(x, axis=axis))
    s = f16_up(quotient(np.max(x, axis=axis) - z.astype(np.float32), 15))
    safe = np.where(s == 0, np.float32(1), s.astype(np.float32))
    codes = np.clip(np.round((x - np.expand_dims(z.astype(np.float32), axis)) / np.expand_dims(safe, axis)), 0, 15)
    return codes.astype(np.int64), s, z


def kivi_ties(x: np.ndarray, bits: int, axis: int) -> np.ndarray:
    """Where the reference's quotient x / s (or (x - z) / s) lies within 1e-5 of a half-integer: a
    compiled quantizer may compute it as x * (1 / s), a few ulps off, and round the other way (both
    neighbours are then s / 2 from x, so the error bound still holds)."""
    _, s, z = kivi_np(x, bits, axis)
    safe = np.where(s == 0, 1.0, s.astype(np.float64))
    shifted = x.astype(np.float64) - (0.0 if z is None else np.expand_dims(z.astype(np.float64), axis))
    r = np.abs(shifted / np.expand_dims(safe, axis))
    return np.abs(r - np.floor(r) - 0.5) <= 1e-5 * np.maximum(1.0, r)


def unpack_np(packed: np.ndarray) -> np.ndarray:
    """uint8 [..., D/2] -> int codes [..., D]: low nibble channel j, high nibble channel j + D/2."""
    p = packed.astype(np.int64)
    return np.concatenate([p & 15, p >> 4], axis=-1)


def dequant_np(codes, scale, zero, axis) -> np.ndarray:
    out = codes.astype(np.float64) * np.expand_dims(np.asarray(scale, np.float64), axis)
    if zero is not None:
        out = out + np.expand_dims(np.asarray(zero, np.float64), axis)
    return out


def codes_for(x: np.ndarray, bits: int, axis: int, scale, zero) -> np.ndarray:
    """The codes of x given (the library's) float16 scale and zero: round half to even, clipped."""
    safe = np.where(np.asarray(scale) == 0, np.float32(1), np.asarray(scale, np.float32))
    shifted = x if zero is None else x - np.expand_dims(np.asarray(zero, np.float32), axis)
    lo, hi = (-127, 127) if bits == 8 else (0, 15)
    return np.clip(np.round(shifted / np.expand_dims(safe, axis)), lo, hi).astype(np.int64)


def check_against_reference(x: np.ndarray, bits: int, axis: int):
    """Quantize x with the library; compare with the NumPy reference and check the bound."""
    q = kv_quant.quantize(jnp.asarray(x), bits, axis)
    d = x.shape[-1]
    red_shape = tuple(n for i, n in enumerate(x.shape) if i != x.ndim + axis)
    if bits == 8:
        chex.assert_shape(q.codes, x.shape)
        chex.assert_type(q.codes, jnp.int8)
        assert q.zero is None
        got_codes = np.asarray(q.codes).astype(np.int64)
    else:
        chex.assert_shape(q.codes, x.shape[:-1] + (d // 2,))
        chex.assert_type(q.codes, jnp.uint8)
        chex.assert_shape(q.zero, red_shape)
        chex.assert_type(q.zero, jnp.float16)
        got_codes = unpack_np(np.asarray(q.codes))
    chex.assert_shape(q.scale, red_shape)
    chex.assert_type(q.scale, jnp.float16)

    # Zero points: exactly the largest float16 <= min. Scales: the smallest float16 >= the f32
    # quotient, computed by division or by the reciprocal (`kivi_np`): equal to one of the two.
    _, s_div, z = kivi_np(x, bits, axis)
    _, s_mul, _ = kivi_np(x, bits, axis, reciprocal=True)
    got_s = np.asarray(q.scale)
    ok = (got_s == s_div) | (got_s == s_mul)
    assert ok.all(), f"scales {got_s[~ok]}, expected {s_div[~ok]} (or {s_mul[~ok]})"
    if bits == 4:
        np.testing.assert_array_equal(np.asarray(q.zero), z, err_msg="zero points")
    codes = codes_for(x, bits, axis, q.scale, q.zero)
    np.testing.assert_array_equal(got_codes, codes, err_msg="codes")
    if bits == 4:  # the packing itself, byte by byte
        np.testing.assert_array_equal(np.asarray(q.codes), (codes[..., : d // 2] | (codes[..., d // 2:] << 4))
                                      .astype(np.uint8), err_msg="packed bytes")

    deq = dequant_np(got_codes, q.scale, q.zero, axis)
    s64 = np.expand_dims(np.asarray(q.scale, np.float64), axis)
    assert np.all(s64 >= 0), "negative scale"
    z64 = 0.0 if q.zero is None else np.abs(np.expand_dims(np.asarray(q.zero, np.float64), axis))
    slack = 2.0 ** -22 * (np.abs(x.astype(np.float64)) + z64)  # x - z and x / s in float32
    err = np.abs(x.astype(np.float64) - deq)
    excess = err - s64 / 2 - slack
    assert np.all(excess <= 0), f"max error {err.max()} over the bound s / 2, worst excess {excess.max()}"
    # The library's own dequantize agrees with the float64 one up to float32 rounding.
    lib = np.asarray(kv_quant.dequantize(q, bits, axis), np.float64)
    np.testing.assert_allclose(lib, deq, rtol=2e-7, atol=1e-30)
    return q


@st.composite
def blocks(draw):
    """[KVH, BS, D] float32 blocks: Gaussian at many scales, with zero blocks, constant channels and
    tokens, and large outliers (kept inside the float16 range of the scales)."""
    # few shapes: the quantizer runs op by op, and every new shape compiles each op again
    kvh, (bs, d) = 2, draw(st.sampled_from([(4, 8), (1, 2), (4, 2)]))
    seed = draw(st.integers(0, 2 ** 31 - 1))
    rng = np.random.default_rng(seed)
    magnitude = draw(st.sampled_from([0.0, 1e-6, 1e-3, 1.0, 30.0, 1e3]))
    x = rng.standard_normal((kvh, bs, d)).astype(np.float32) * np.float32(magnitude)
    if draw(st.booleans()):  # constant channel (all tokens equal) and a constant token
        x[:, :, rng.integers(d)] = np.float32(rng.normal() * 5)
        x[:, rng.integers(bs), :] = np.float32(rng.normal())
    if draw(st.booleans()):  # outlier channel, KIVI's reason to quantize keys per channel
        x[:, :, rng.integers(d)] *= np.float32(draw(st.sampled_from([100.0, 1e4])))
        x = np.clip(x, -6e4, 6e4)
    if draw(st.booleans()):
        x[...] = np.float32(draw(st.sampled_from([0.0, 1.0, -2.5, 0.1, 1e-7])))  # all equal (zero too)
    return x


@pytest.mark.parametrize("bits", [8, 4])
@settings(max_examples=25, deadline=None)
@given(x=blocks())
def test_keys_per_channel_and_values_per_token_match_numpy_kivi(bits, x):
    qk = check_against_reference(x, bits, axis=-2)  # keys: per channel over the block
    qv = check_against_reference(x, bits, axis=-1)  # values: per token
    chex.assert_shape(qk.scale, (x.shape[0], x.shape[2]))
    chex.assert_shape(qv.scale, (x.shape[0], x.shape[1]))
    # quantize_keys / quantize_values are those axes.
    np.testing.assert_array_equal(np.asarray(kv_quant.quantize_keys(jnp.asarray(x), bits).codes), np.asarray(qk.codes))
    np.testing.assert_array_equal(np.asarray(kv_quant.quantize_values(jnp.asarray(x), bits).codes),
                                  np.asarray(qv.codes))


def test_scales_are_rounded_outward_to_float16():
    """A channel whose amax / 127 (or range / 15) is not a float16 gets the next float16 *up*; a
    minimum that is not a float16 gets the next one *down*: the extremes stay representable."""
    x = np.zeros((1, 4, 2), np.float32)
    x[0, :, 0] = [1.0001, -0.3, 0.2, 0.7]  # amax 1.0001: 1.0001/127 is not a float16
    x[0, :, 1] = [0.30001, 0.5, 0.9, 1.3]  # min 0.30001: not a float16
    q8 = kv_quant.quantize_keys(jnp.asarray(x), 8)
    s = np.asarray(q8.scale, np.float64)[0, 0]
    assert s >= 1.0001 / 127 and np.float16(s) == q8.scale[0, 0]
    assert np.nextafter(np.float16(s), np.float16(0)) < np.float32(1.0001) / np.float32(127)
    q4 = kv_quant.quantize_keys(jnp.asarray(x), 4)
    z = np.asarray(q4.zero, np.float64)[0, 1]
    assert z <= np.float32(0.30001) < np.nextafter(np.float16(z), np.float16(1))
    s4 = np.asarray(q4.scale, np.float64)[0, 1]
    assert z + 15 * s4 >= np.float32(1.3)


def test_all_zero_block_has_zero_scale_and_dequantizes_to_zero():
    x = np.zeros((2, 4, 8), np.float32)
    for bits in (8, 4):
        for axis in (-2, -1):
            q = kv_quant.quantize(jnp.asarray(x), bits, axis)
            assert not np.any(np.asarray(q.scale)) and not np.any(np.asarray(q.codes))
            np.testing.assert_array_equal(np.asarray(kv_quant.dequantize(q, bits, axis)), x)


def test_pack4_layout_is_halves_not_neighbours():
    codes = np.arange(16, dtype=np.uint8).reshape(1, 16)  # channel j holds code j
    packed = np.asarray(kv_quant.pack4(jnp.asarray(codes)))
    chex.assert_shape(packed, (1, 8))
    np.testing.assert_array_equal(packed & 15, np.arange(8)[None])
    np.testing.assert_array_equal(packed >> 4, np.arange(8, 16)[None])
    np.testing.assert_array_equal(np.asarray(kv_quant.unpack4(jnp.asarray(packed))), codes)


def test_bits_and_dtypes_of_precisions():
    assert kv_quant.bits_of(Precision.Q8) == 8 and kv_quant.bits_of(Precision.Q4) == 4
    for p in (Precision.FP32, Precision.FP16, Precision.BF16):
        assert kv_quant.bits_of(p) is None
    with pytest.raises(KvCacheError, match="Q4K"):
        kv_quant.bits_of(Precision.Q4K)
    with pytest.raises(KvCacheError, match="Q8"):
        kv_quant.float_dtype(Precision.Q8)
    with pytest.raises(KvCacheError, match="bits 8 or 4, got 3"):
        kv_quant.quantize(jnp.zeros((1, 2, 2)), 3, -1)


def test_zero_point_below_minus_one_is_rounded_down_and_error_stays_within_half_a_step():
    """Keys of one channel in [-100.03, -99]: float16(-100.03) = -100.0 is above the minimum, so the
    zero point must go one float16 step *down* (-100.0625); moving it up (-99.9375) puts -100.03
    outside the codes' range and its error (0.0925) past s / 2 = 0.03125."""
    col = np.array([-100.03, -99.0, -99.5, -99.2], np.float32)
    x = np.stack([col, col], axis=-1)[None]  # [KVH 1, BS 4, D 2]
    q = kv_quant.quantize_keys(jnp.asarray(x), 4)
    z = np.asarray(q.zero, np.float64)
    assert np.all(z <= np.float32(-100.03)), f"zero points {z} above the minimum -100.03"
    deq = dequant_np(unpack_np(np.asarray(q.codes)), q.scale, q.zero, -2)
    err = np.abs(deq - x)
    half = np.asarray(q.scale, np.float64)[:, None, :] / 2
    assert np.all(err <= half + 1e-5), f"error {err.max()} > s/2 = {half.max()}"


def test_scale_above_one_is_rounded_up_not_down():
    """amax 130.40001 -> amax / 127 = 1.02677; the nearest float16, 1.02637, falls short, so the scale
    must be the next float16 up, 1.02734, not the one below (1.02539)."""
    x = np.array([1.304, 130.40001], np.float32)[None, None]  # one token, D 2
    q = kv_quant.quantize_values(jnp.asarray(x), 8)
    s = float(np.asarray(q.scale, np.float64)[0, 0])
    assert s >= 130.40001 / 127 * (1 - 1e-6), f"scale {s} < amax / 127 = {130.40001 / 127}"
    # a negative constant channel keeps a non-negative Q4 scale
    c = np.full((1, 4, 2), -3.9631457, np.float32)
    q4 = kv_quant.quantize_keys(jnp.asarray(c), 4)
    assert np.all(np.asarray(q4.scale, np.float64) >= 0), f"negative scale {q4.scale}"
    assert np.all(np.asarray(q4.zero, np.float64) <= np.float32(-3.9631457)), f"zero {q4.zero} above the value"
