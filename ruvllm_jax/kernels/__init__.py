"""Attention kernels: Pallas for GPU (Triton) and TPU (Mosaic), jnp for CPU, one dispatch.

Kernels know arrays, not caches. One module per kernel family, each holding its kernels, its jnp
path and its reference side by side: `flash` (prefill), `decode` (split-K single query), `paged`
(block tables). They share the online-softmax step, finish and LSE merge of `_online_softmax`.
`attention` holds the public entry points; `config` the static `AttentionConfig` (what to compute)
and `KernelOptions` (how: path, interpret mode, tile sizes).
"""

from ruvllm_jax.kernels._online_softmax import merge_attention
from ruvllm_jax.kernels.attention import (
    decode_attention,
    flash_attention,
    grouped_query_attention,
    multi_query_attention,
    paged_attention,
    quantized_paged_attention,
)
from ruvllm_jax.kernels.config import (
    AttentionConfig,
    BlockSizes,
    DecodeBlockSizes,
    FlashBlockSizes,
    KernelOptions,
    PagedBlockSizes,
)
from ruvllm_jax.kernels.decode import decode_attention_reference
from ruvllm_jax.kernels.flash import flash_attention_reference
from ruvllm_jax.kernels.paged import paged_attention_reference
from ruvllm_jax.kernels.quantized import quantized_attention_reference

__all__ = [
    "AttentionConfig",
    "BlockSizes",
    "DecodeBlockSizes",
    "FlashBlockSizes",
    "KernelOptions",
    "PagedBlockSizes",
    "flash_attention",
    "decode_attention",
    "paged_attention",
    "quantized_paged_attention",
    "grouped_query_attention",
    "multi_query_attention",
    "merge_attention",
    "flash_attention_reference",
    "decode_attention_reference",
    "paged_attention_reference",
    "quantized_attention_reference",
]
