"""GGML block formats against gguf-py's reference (numpy ports of ggml's quantizers/dequantizers).

Evidence that does not lean on our own code: bytes equal to gguf's quantizer where gguf has one (Q8_0,
Q4_1, Q5_0), and decoding that is bit-equal to gguf's dequantizer for our bytes, for gguf's bytes and for
random valid blocks. Round trips are checked against the bounds `ruvllm_jax.quant.formats` documents.
"""

from __future__ import annotations

import chex
import gguf.quants as gguf_quants
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gguf import GGMLQuantizationType
from hypothesis import given, settings
from hypothesis import strategies as st

from ruvllm_jax.errors import ConfigError
from ruvllm_jax.quant import FORMATS, QuantizedTensor, dequantize, dequantize_rows_jnp, quantize

NAMES = list(FORMATS)
EXACT_QUANTIZERS = ["Q8_0", "Q4_1", "Q5_0"]  # ours follows ggml's reference quantizer byte for byte
F16_FIELDS = {"Q8_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q4_K": (0, 2), "Q6_K": (208,)}
# Largest |x| each format's f16 scales can hold, with margin (see the formats docstring).
SAFE_MAX = {"Q8_0": 8e6, "Q4_1": 6e4, "Q5_0": 1e6, "Q4_K": 4e6, "Q6_K": 2e8}


def ggml_type(name: str) -> GGMLQuantizationType:
    return getattr(GGMLQuantizationType, name)


def gguf_quantize(w: np.ndarray, name: str) -> np.ndarray | None:
    try:
        return gguf_quants.quantize(np.asarray(w, np.float32), ggml_type(name))
    except NotImplementedError:
        return None


def gguf_dequantize(data: np.ndarray, name: str) -> np.ndarray:
    return gguf_quants.dequantize(np.asarray(data, np.uint8), ggml_type(name))


def bits(a) -> np.ndarray:
    return np.asarray(a, np.float32).view(np.uint32)


_jnp_decoders: dict[tuple[str, int], object] = {}


def jnp_decode(data: np.ndarray, name: str, cols: int) -> np.ndarray:
    key = (name, cols)
    if key not in _jnp_decoders:
        _jnp_decoders[key] = jax.jit(lambda d: dequantize_rows_jnp(d, name, cols))
    return np.asarray(_jnp_decoders[key](jnp.asarray(data)))


def random_blocks(rng: np.random.Generator, name: str, rows: int, cols: int) -> np.ndarray:
    """Random bytes in every field, with finite f16 scales: blocks our quantizer would never write."""
    fmt = FORMATS[name]
    data = rng.integers(0, 256, (rows, cols // fmt.block_size, fmt.type_size), dtype=np.uint8)
    for off in F16_FIELDS[name]:
        scale = (rng.standard_normal(data.shape[:2]) * 10.0 ** rng.integers(-6, 3, data.shape[:2])).astype(np.float16)
        data[..., off : off + 2] = scale.view(np.uint8).reshape(*data.shape[:2], 2)
    return data.reshape(rows, -1)


def error_bound(w: np.ndarray, name: str) -> np.ndarray:
    """The documented per-element round-trip bound, float64, shaped like w."""
    fmt = FORMATS[name]
    rows, cols = w.shape
    b = w.astype(np.float64).reshape(rows, cols // fmt.block_size, fmt.block_size)
    amax = np.abs(b).max(-1, keepdims=True)
    eps = 2.0**-11
    if name == "Q8_0":
        bound = amax * (1 / 254 + eps) + 2.0**-18
    elif name == "Q4_1":
        lo, hi = b.min(-1, keepdims=True), b.max(-1, keepdims=True)
        bound = (hi - lo) * (1 / 30 + eps) + np.abs(lo) * eps + 2.0**-20
    elif name == "Q5_0":
        bound = amax * (1 / 16 + 16 * eps) + 2.0**-20
    elif name == "Q4_K":
        bound = amax / 14 + 2.0**-20
    else:
        bound = amax * 5 / 128 + 2.0**-19
    return np.broadcast_to(bound, b.shape).reshape(rows, cols)


def sample_matrix(rng: np.random.Generator, name: str, rows: int, blocks: int, scale_exp: int, special: str):
    cols = blocks * FORMATS[name].block_size
    w = rng.standard_normal((rows, cols)) * 10.0**scale_exp
    bs = FORMATS[name].block_size
    if special == "zero_block":
        w[:, :bs] = 0
    elif special == "all_zero":
        w[:] = 0
    elif special == "const_block":
        w[:, -bs:] = rng.choice([-1.0, 1.0]) * 10.0**scale_exp
    elif special == "outlier":
        w[rng.integers(rows), rng.integers(cols)] = rng.choice([-1.0, 1.0]) * SAFE_MAX[name]
    elif special == "tiny":
        w *= 1e-30
    elif special == "mixed":  # sub-blocks of very different magnitude inside one block
        w *= 10.0 ** rng.integers(-6, 1, (1, cols))
    elif special == "positive":
        w = np.abs(w)
    elif special == "negative":
        w = -np.abs(w) - 10.0**scale_exp
    return np.clip(w, -SAFE_MAX[name], SAFE_MAX[name]).astype(np.float32)


SPECIALS = ["none", "zero_block", "all_zero", "const_block", "outlier", "tiny", "mixed", "positive", "negative"]


@st.composite
def cases(draw, names=tuple(NAMES)):
    name = draw(st.sampled_from(names))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    w = sample_matrix(
        rng, name, draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(-8, 3)),
        draw(st.sampled_from(SPECIALS)),
    )
    return name, w


# ------------------------------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(cases(tuple(EXACT_QUANTIZERS)))
def test_bytes_equal_ggml_reference_quantizer(case):
    name, w = case
    ours = quantize(w, name)
    with np.errstate(all="ignore"):
        ref = gguf_quantize(w, name)
    chex.assert_shape(ours.data, ref.shape)
    fmt = FORMATS[name]
    ours_b, ref_b = ours.data.reshape(-1, fmt.type_size), ref.reshape(-1, fmt.type_size)
    odd = undefined_in_ggml(w, name)
    np.testing.assert_array_equal(ours_b[~odd], ref_b[~odd])
    # Where ggml's 1/d overflows (|x| < ~1e-37) its codes are casts of inf/NaN; ours are zeros, same decoding.
    np.testing.assert_array_equal(dequantize(ours).reshape(-1, fmt.block_size)[odd], 0)


def undefined_in_ggml(w: np.ndarray, name: str) -> np.ndarray:
    """Blocks whose ggml scale d is non-zero but 1/d overflows float32 (ggml then casts inf/NaN to ints)."""
    b = w.reshape(-1, 32).astype(np.float32)
    if name == "Q8_0":
        d = np.abs(b).max(-1) / np.float32(127)
    elif name == "Q4_1":
        d = (b.max(-1) - b.min(-1)) / np.float32(15)
    else:
        d = np.abs(b).max(-1) / np.float32(16)
    with np.errstate(divide="ignore", over="ignore"):
        return (d != 0) & ~np.isfinite(np.float32(1) / d)


@settings(max_examples=120, deadline=None)
@given(cases())
def test_round_trip_within_documented_bound_and_decodes_like_gguf(case):
    name, w = case
    qt = quantize(w, name)
    assert qt.data.dtype == np.uint8 and qt.data.shape == (w.shape[0], FORMATS[name].row_bytes(w.shape[1]))
    back = dequantize(qt)
    np.testing.assert_array_equal(bits(back), bits(gguf_dequantize(qt.data, name)))
    err = np.abs(back.astype(np.float64) - w.astype(np.float64))
    bound = error_bound(w, name)
    worst = np.unravel_index(np.argmax(err - bound), err.shape)
    assert (err <= bound).all(), f"{name}: |err| {err[worst]:g} > bound {bound[worst]:g} at {worst}"


@pytest.mark.parametrize("name", NAMES)
def test_zero_and_constant_blocks_are_exact(name):
    """Zeros always; a constant c = 127/128 wherever the format's scale for it (c/127, c/16, c/4096) is an
    f16. Q4_K's positive constant lands on step * 15 with a 6-bit step, which need not hit c exactly."""
    bs = FORMATS[name].block_size
    w = np.zeros((3, 2 * bs), np.float32)
    w[1, bs:] = 127 / 128
    w[2, :bs] = -127 / 128
    back = dequantize(quantize(w, name))
    np.testing.assert_array_equal(back[0], 0)
    if name == "Q4_K":
        np.testing.assert_allclose(back, w, atol=1e-3)
    else:
        np.testing.assert_array_equal(back, w)


@pytest.mark.parametrize("name", NAMES)
def test_k_and_legacy_rms_error_is_reasonable(name):
    """Not just bounded: a Gaussian matrix keeps an RMS error typical of the format's bit width."""
    w = np.random.default_rng(1).standard_normal((64, 512)).astype(np.float32)
    rms = np.sqrt(np.mean((dequantize(quantize(w, name)) - w) ** 2))
    assert rms < {"Q8_0": 0.006, "Q4_1": 0.1, "Q5_0": 0.06, "Q4_K": 0.1, "Q6_K": 0.025}[name], rms


@pytest.mark.parametrize("name", NAMES)
def test_our_bytes_decode_bit_equal_in_numpy_jnp_and_gguf(name):
    rng = np.random.default_rng(2)
    w = sample_matrix(rng, name, 5, 2, 0, "mixed")
    w[0] = sample_matrix(rng, name, 1, 2, -7, "none")[0]  # f16-subnormal scales
    qt = quantize(w, name)
    ref = gguf_dequantize(qt.data, name)
    np.testing.assert_array_equal(bits(dequantize(qt)), bits(ref))
    np.testing.assert_array_equal(bits(jnp_decode(qt.data, name, w.shape[1])), bits(ref))


@pytest.mark.parametrize("name", NAMES)
def test_random_valid_blocks_decode_bit_equal(name):
    rng = np.random.default_rng(3)
    cols = 2 * FORMATS[name].block_size
    data = random_blocks(rng, name, 7, cols)
    ref = gguf_dequantize(data, name)
    ours = dequantize(QuantizedTensor(data, name, (7, cols)))
    chex.assert_shape(ours, (7, cols))
    np.testing.assert_array_equal(bits(ours), bits(ref))
    np.testing.assert_array_equal(bits(jnp_decode(data, name, cols)), bits(ref))


# gguf has no quantizer for some formats (Q6_K in gguf 0.19): the random-blocks test covers those.
GGUF_QUANTIZABLE = [n for n in NAMES if gguf_quantize(np.ones((1, 256), np.float32), n) is not None]


@pytest.mark.parametrize("name", GGUF_QUANTIZABLE)
def test_gguf_quantized_bytes_decode_bit_equal(name):
    """Blocks written by gguf's quantizer, for the formats it has one for."""
    w = np.random.default_rng(4).standard_normal((3, 512)).astype(np.float32)
    data = gguf_quantize(w, name)
    ref = gguf_dequantize(data, name)
    np.testing.assert_array_equal(bits(dequantize(QuantizedTensor(data, name, w.shape))), bits(ref))
    np.testing.assert_array_equal(bits(jnp_decode(data, name, 512)), bits(ref))


@pytest.mark.parametrize("name", NAMES)
def test_jnp_rows_gather_then_decode_with_leading_axes(name):
    rng = np.random.default_rng(5)
    cols = FORMATS[name].block_size
    data = random_blocks(rng, name, 10, cols)
    tokens = np.array([[3, 0, 9], [9, 1, 1]])
    out = jax.jit(lambda d, t: dequantize_rows_jnp(d[t], name, cols))(jnp.asarray(data), jnp.asarray(tokens))
    chex.assert_shape(out, (2, 3, cols))
    chex.assert_type(out, jnp.float32)
    np.testing.assert_array_equal(bits(out), bits(gguf_dequantize(data, name)[tokens]))


def test_bfloat16_and_integer_inputs_are_accepted():
    import ml_dtypes

    w = np.random.default_rng(6).standard_normal((2, 32)).astype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(quantize(w, "Q8_0").data, gguf_quantize(w.astype(np.float32), "Q8_0"))
    ints = np.arange(64, dtype=np.int32).reshape(2, 32) - 30
    np.testing.assert_array_equal(quantize(ints, "Q8_0").data, gguf_quantize(ints.astype(np.float32), "Q8_0"))


# ------------------------------------------------------------------------------------------------------------
# errors name the offending value


@pytest.mark.parametrize(
    "w, qtype, match",
    [
        (np.zeros((2, 40), np.float32), "Q8_0", "40"),
        (np.zeros((2, 288), np.float32), "Q4_K", "288"),
        (np.zeros(64, np.float32), "Q8_0", r"\(64,\)"),
        (np.zeros((1, 2, 32), np.float32), "Q8_0", r"\(1, 2, 32\)"),
        (np.zeros((2, 32), np.float32), "Q3_K", "Q3_K"),
        (np.full((1, 32), np.nan, np.float32), "Q4_1", r"nan at \[0, 0\]"),
        (np.array([[0.0] * 31 + [np.inf]], np.float32), "Q5_0", r"inf at \[0, 31\]"),
        (np.full((1, 32), 1e30, np.float32), "Q8_0", "1e\\+30"),
        (np.full((1, 32), -1e5, np.float32), "Q4_1", "100000"),
        (np.full((1, 256), 3e38, np.float32), "Q6_K", "3e\\+38"),
        (np.full((1, 256), -1e7, np.float32), "Q4_K", "1e\\+07"),
        (np.zeros((2, 32), np.complex64), "Q8_0", "complex64"),
    ],
)
def test_bad_inputs_raise_config_error_naming_the_value(w, qtype, match):
    with pytest.raises(ConfigError, match=match):
        quantize(w, qtype)


def test_dequantize_rejects_data_of_the_wrong_shape():
    with pytest.raises(ConfigError, match=r"\(2, 33\)"):
        dequantize(QuantizedTensor(np.zeros((2, 33), np.uint8), "Q8_0", (2, 32)))
    with pytest.raises(ConfigError, match="33"):
        dequantize_rows_jnp(jnp.zeros((2, 33), jnp.uint8), "Q8_0", 32)


def _floats_near_half_integers() -> np.ndarray:
    """Every float32 within 64 ulps of each k + 0.5 and each integer k, |k| <= 300 (Q8_0 codes lie in
    [-127, 127]), and of every power of two up to 2**25 (where the float spacing passes 0.5 and 1)."""
    centers = np.concatenate([np.arange(-300, 301) + 0.5, np.arange(-300, 301),
                              2.0 ** np.arange(-3, 26), -(2.0 ** np.arange(-3, 26))]).astype(np.float32)
    bits = centers.view(np.int32)[:, None] + np.arange(-64, 65, dtype=np.int32)[None, :]
    return np.concatenate([bits.reshape(-1).view(np.float32), np.float32([0.0, -0.0, 1e-45, -1e-45])])


def test_round_half_away_is_gguf_np_roundf():
    """Q8_0 codes are `_round_half_away(x / d)`: the same as gguf-py's np_roundf (C's roundf), on the
    floats where a shortcut would differ (next to every half-integer) and on random bit patterns of
    every magnitude."""
    from ruvllm_jax.quant.formats import _round_half_away

    rng = np.random.default_rng(0)
    random_bits = rng.integers(0, 2**32, size=1 << 20, dtype=np.uint64).astype(np.uint32).view(np.float32)
    v = np.concatenate([_floats_near_half_integers(), random_bits[np.isfinite(random_bits)]])
    np.testing.assert_array_equal(_round_half_away(v), gguf_quants.np_roundf(v))
    assert _round_half_away(np.float32([0.49999997, 0.5, 1.5, 2.5, -0.5, -2.5])).tolist() == [0, 1, 2, 3, -1, -3]
