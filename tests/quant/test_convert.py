"""The load-time precision policy, with gguf's quantizer/dequantizer as the reference for the bytes."""

from __future__ import annotations

import warnings

import gguf.quants as gguf_quants
import ml_dtypes
import numpy as np
import pytest
from gguf import GGMLQuantizationType  # noqa: E402

from ruvllm_jax.errors import ConfigError
from ruvllm_jax.quant import QuantizedTensor, quantize, to_precision
from ruvllm_jax.quant.convert import format_for, precision_of_format
from ruvllm_jax.types import Precision


def gguf_quantize(w, name):
    return gguf_quants.quantize(np.asarray(w, np.float32), getattr(GGMLQuantizationType, name))


def gguf_dequantize(qt: QuantizedTensor) -> np.ndarray:
    return gguf_quants.dequantize(np.asarray(qt.data), getattr(GGMLQuantizationType, qt.qtype))


def matrix(cols: int, rows: int = 6, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)


def test_none_leaves_the_weight_alone():
    w, qt = matrix(64), quantize(matrix(64), "Q8_0")
    assert to_precision(w, None) is w
    assert to_precision(qt, None) is qt


@pytest.mark.parametrize(
    "precision, dtype",
    [(Precision.FP32, np.float32), (Precision.FP16, np.float16), (Precision.BF16, ml_dtypes.bfloat16)],
)
def test_float_precisions_cast_and_dequantize(precision, dtype):
    w = matrix(40)  # any width: no blocks involved
    out = to_precision(w, precision)
    assert out.dtype == dtype and out.shape == w.shape
    np.testing.assert_array_equal(out, w.astype(dtype))
    qt = quantize(matrix(64), "Q5_0")
    out = to_precision(qt, precision)
    assert isinstance(out, np.ndarray) and out.dtype == dtype
    np.testing.assert_array_equal(out, gguf_dequantize(qt).astype(dtype))


@pytest.mark.parametrize(
    "precision, cols, qtype",
    [
        (Precision.Q8, 96, "Q8_0"),
        (Precision.Q4, 96, "Q4_1"),
        (Precision.Q4K, 512, "Q4_K"),
        (Precision.Q4K, 896, "Q5_0"),  # llama.cpp's fallback when rows are not whole 256-blocks
    ],
)
def test_quantized_precisions_pick_the_format(precision, cols, qtype):
    w = matrix(cols)
    out = to_precision(w, precision)
    assert isinstance(out, QuantizedTensor) and out.qtype == qtype and out.shape == w.shape
    assert format_for(precision, cols) == qtype
    if qtype != "Q4_K":  # gguf has no Q4_K quantizer; test_formats covers our Q4_K against gguf's decoder
        np.testing.assert_array_equal(out.data, gguf_quantize(w, qtype))


def test_blocks_in_another_format_are_requantized_and_the_same_format_is_kept():
    q8 = quantize(matrix(512), "Q8_0")
    q4 = to_precision(q8, Precision.Q4)
    assert q4.qtype == "Q4_1"
    np.testing.assert_array_equal(q4.data, gguf_quantize(gguf_dequantize(q8), "Q4_1"))
    assert to_precision(q8, Precision.Q8) is q8
    assert to_precision(q4, Precision.Q4) is q4
    q4k = to_precision(q8, Precision.Q4K)
    assert q4k.qtype == "Q4_K" and to_precision(q4k, Precision.Q4K) is q4k
    # Q5_0 blocks of 896-wide rows already are what Q4K gives them: unchanged.
    q5 = quantize(matrix(896), "Q5_0")
    assert to_precision(q5, Precision.Q4K) is q5


@pytest.mark.parametrize("precision", [Precision.Q8, Precision.Q4, Precision.Q4K])
def test_widths_no_block_fits_stay_float32_with_a_warning(precision):
    w = matrix(40).astype(np.float16)
    with pytest.warns(UserWarning, match=r"\(6, 40\) stays float32.*40 columns"):
        out = to_precision(w, precision)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    np.testing.assert_array_equal(out, w.astype(np.float32))
    assert format_for(precision, 40) is None


def test_blockable_widths_do_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        to_precision(matrix(32), Precision.Q4K)


def test_format_for_and_precision_of_format_tables():
    assert format_for(None, 64) is None
    assert format_for(Precision.FP16, 64) is None
    assert [format_for(Precision.Q4K, c) for c in (256, 768, 288, 32, 16)] == ["Q4_K", "Q4_K", "Q5_0", "Q5_0", None]
    assert precision_of_format("Q8_0") is Precision.Q8
    assert precision_of_format("Q4_1") is Precision.Q4
    assert precision_of_format("Q4_K") is Precision.Q4K
    assert precision_of_format("Q5_0") is None and precision_of_format("Q6_K") is None


def test_errors_name_the_bad_value():
    with pytest.raises(ConfigError, match="'q8'"):
        to_precision(matrix(32), "q8")
    with pytest.raises(ConfigError, match="'int4'"):
        format_for("int4", 32)
    with pytest.raises(ConfigError, match=r"Q8.*\(64,\)"):
        to_precision(np.zeros(64, np.float32), Precision.Q8)
    with pytest.raises(ConfigError, match="IQ2_XS"):
        precision_of_format("IQ2_XS")
