"""Weight quantization in GGML's block formats (Q8_0, Q4_1, Q5_0, Q4_K, Q6_K).

`QuantizedTensor` holds GGML's bytes; `quantize`/`dequantize` convert on the host; `quantized_matmul`
and `embed_rows` use the blocks inside jit; `to_precision` is the load-time policy. The native CPU
kernel (`ruvllm_jax.quant.native`) is optional and imported only when a product asks for it.
"""

from ruvllm_jax.quant.convert import format_for, precision_of_format, to_precision
from ruvllm_jax.quant.formats import dequantize, dequantize_rows_jnp, quantize
from ruvllm_jax.quant.matmul import embed_rows, quantized_matmul, quantized_matmul_jnp
from ruvllm_jax.quant.tensor import FORMATS, BlockFormat, QuantizedTensor, block_format

__all__ = [
    "FORMATS",
    "BlockFormat",
    "QuantizedTensor",
    "block_format",
    "dequantize",
    "dequantize_rows_jnp",
    "embed_rows",
    "format_for",
    "precision_of_format",
    "quantize",
    "quantized_matmul",
    "quantized_matmul_jnp",
    "to_precision",
]
