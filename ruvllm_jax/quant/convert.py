"""Load-time precision policy: which storage a 2-D weight gets for a requested `Precision` (host side).

Q8 -> Q8_0, Q4 -> Q4_1, Q4K -> Q4_K when the rows are whole 256-weight super-blocks, otherwise Q5_0 (the
fallback llama.cpp uses for Q4_K, e.g. for Qwen2.5-0.5B's 896 columns). A matrix whose columns are not a
multiple of 32 fits no block format: it stays float32 and a warning says so. Float precisions dequantize
(if needed) and cast.
"""

from __future__ import annotations

import warnings
from typing import Optional, Union

import ml_dtypes
import numpy as np

from ruvllm_jax.errors import ConfigError
from ruvllm_jax.quant.formats import dequantize, quantize
from ruvllm_jax.quant.tensor import QuantizedTensor, block_format
from ruvllm_jax.types import Precision

_FLOAT_DTYPES = {Precision.FP32: np.float32, Precision.FP16: np.float16, Precision.BF16: ml_dtypes.bfloat16}
_PRECISION_OF_FORMAT = {"Q8_0": Precision.Q8, "Q4_1": Precision.Q4, "Q4_K": Precision.Q4K}

Weight = Union[np.ndarray, QuantizedTensor]


def precision_of_format(qtype: str) -> Optional[Precision]:
    """The `Precision` a block format stands for (Q8_0 -> Q8, Q4_1 -> Q4, Q4_K -> Q4K); None for Q5_0, Q6_K."""
    block_format(qtype)  # unknown names are an error, not None
    return _PRECISION_OF_FORMAT.get(qtype)


def _check_precision(precision) -> None:
    if precision is not None and not isinstance(precision, Precision):
        raise ConfigError(f"precision must be None or a Precision, got {precision!r}")


def format_for(precision: Optional[Precision], cols: int) -> Optional[str]:
    """The block format a weight with rows of `cols` gets for `precision`; None: keep it as floats."""
    _check_precision(precision)
    if precision is None or not precision.is_quantized or cols % 32:
        return None
    if precision is Precision.Q8:
        return "Q8_0"
    if precision is Precision.Q4:
        return "Q4_1"
    return "Q4_K" if cols % 256 == 0 else "Q5_0"


def to_precision(w: Weight, precision: Optional[Precision]) -> Weight:
    """`w` ([rows, cols] floats or blocks) stored as `precision` asks; None leaves it as it is.

    Float precisions give a numpy array of that dtype. Quantized ones give a `QuantizedTensor` in
    `format_for(precision, cols)`; blocks already in that format come back unchanged, blocks in another are
    dequantized and re-quantized. Columns not a multiple of 32 cannot be blocked: such a matrix is returned
    as float32 with a `UserWarning`.
    """
    _check_precision(precision)
    if precision is None:
        return w
    if not precision.is_quantized:
        floats = dequantize(w) if isinstance(w, QuantizedTensor) else np.asarray(w)
        return np.asarray(floats, np.float32).astype(_FLOAT_DTYPES[precision])
    shape = w.shape if isinstance(w, QuantizedTensor) else np.shape(w)
    if len(shape) != 2:
        raise ConfigError(f"only 2-D weights can be quantized to {precision.name}, got shape {tuple(shape)}")
    qtype = format_for(precision, shape[1])
    if isinstance(w, QuantizedTensor):
        if w.qtype == qtype:
            return w
        w = dequantize(w)
    if qtype is None:
        warnings.warn(
            f"a weight of shape {tuple(shape)} stays float32: {shape[1]} columns are not a multiple of 32, "
            f"so no block format holds it at {precision.name}",
            stacklevel=2,
        )
        return np.asarray(w, np.float32)
    return quantize(np.asarray(w, np.float32), qtype)
