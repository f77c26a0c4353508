"""Public attention entry points: validate shapes, pick the path, call the kernel family.

How a call runs is one `KernelOptions` (`kernel=`), or its fields as keywords for convenience:
`impl="auto"` runs the Pallas kernels on GPU (Triton) and TPU (Mosaic) and the jnp path on CPU;
`impl="jnp"` forces the jnp path; `impl="pallas"` forces the kernels, which on CPU needs
`interpret=True` (`pallas_backend="triton" | "mosaic"` picks which kernel to interpret there);
`block_sizes=` takes the family's tile sizes (`FlashBlockSizes`, `DecodeBlockSizes`,
`PagedBlockSizes`), as `jax.experimental.pallas.ops` do.

Layouts: prefill takes q [B, S, H, D] and k, v [B, T, KVH, D] (as `jax.nn.dot_product_attention`);
decode takes q [B, H, D] against a head-major cache k, v [B, KVH, T, D] with `lengths` [B] valid
entries per sequence; paged takes q [B, H, D] against pools [KVH, num_blocks, block_size, D] read
through block tables [B, max_blocks]. RuvLLM's single-query forms (`flash_attention_neon`,
`grouped_query_attention_neon`, `multi_query_attention_neon`) are accepted too, see each function.
"""

from __future__ import annotations

from typing import Optional

import chex
import jax
import jax.numpy as jnp

from ruvllm_jax.errors import ConfigError
from ruvllm_jax.kernels._online_softmax import merge_attention
from ruvllm_jax.kernels.config import (
    AttentionConfig,
    BlockSizes,
    DecodeBlockSizes,
    FlashBlockSizes,
    KernelOptions,
    PagedBlockSizes,
    check_window,
    default_scale,
)
from ruvllm_jax.kernels.decode import decode_attention_jnp, decode_attention_pallas
from ruvllm_jax.kernels.flash import flash_attention_jnp, flash_attention_pallas
from ruvllm_jax.kernels.paged import (
    check_block_tables,
    check_paged_shapes,
    paged_attention_jnp,
    paged_attention_pallas,
)
from ruvllm_jax.kernels.quantized import check_quantized_shapes, quantized_attention_jnp, quantized_attention_pallas

__all__ = [
    "AttentionConfig",
    "KernelOptions",
    "flash_attention",
    "decode_attention",
    "paged_attention",
    "quantized_paged_attention",
    "grouped_query_attention",
    "multi_query_attention",
    "merge_attention",
]


_FAMILY_BLOCKS = {"flash": FlashBlockSizes, "decode": DecodeBlockSizes, "paged": PagedBlockSizes}


def kernel_options(kernel: Optional[KernelOptions], family: str, impl: str = "auto", interpret: bool = False,
                   pallas_backend: Optional[str] = None, block_sizes=None) -> KernelOptions:
    """The one `KernelOptions` of a public call: `kernel` as given, or built from the keywords."""
    if kernel is not None:
        if not isinstance(kernel, KernelOptions):
            raise ConfigError(f"kernel must be a KernelOptions, got {kernel!r}")
        if (impl, interpret, pallas_backend, block_sizes) != ("auto", False, None, None):
            raise ConfigError("pass either kernel= or impl/interpret/pallas_backend/block_sizes, not both")
        return kernel
    blocks = BlockSizes()
    if block_sizes is not None:
        expected = _FAMILY_BLOCKS[family]
        if not isinstance(block_sizes, expected):
            raise ConfigError(f"{family} attention takes block_sizes={expected.__name__}(...), got {block_sizes!r}")
        blocks = BlockSizes(**{family: block_sizes})
    return KernelOptions(impl=impl, interpret=interpret, pallas_backend=pallas_backend, block_sizes=blocks)


def flash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    scale: Optional[float] = None,
    causal: bool = True,
    *,
    sliding_window: Optional[int] = None,
    impl: str = "auto",
    interpret: bool = False,
    return_lse: bool = False,
    pallas_backend: Optional[str] = None,
    block_sizes: Optional[FlashBlockSizes] = None,
    kernel: Optional[KernelOptions] = None,
):
    """Prefill attention: q [B, S, H, D], k/v [B, T, KVH, D] -> [B, S, H, D] (and lse [B, H, S]).

    The S queries are the last S of the T key positions. RuvLLM's form `flash_attention(query [D],
    key [T, D], value [T, D], scale, causal)` returns [D] (one query at the last position, so every
    key is visible either way). Differentiable on every path (Pallas: custom_vjp over the jnp path).
    """
    if q.ndim == 1:
        if k.ndim != 2 or v.shape != k.shape or k.shape[1] != q.shape[0]:
            raise ConfigError(
                f"single-query form needs query [D], key/value [T, D]; got {q.shape}, {k.shape}, {v.shape}")
        res = flash_attention(q[None, None, None], k[None, :, None], v[None, :, None], scale, causal,
                              sliding_window=sliding_window, return_lse=return_lse,
                              kernel=kernel_options(kernel, "flash", impl, interpret, pallas_backend, block_sizes))
        return (res[0][0, 0, 0], res[1][0, 0, 0]) if return_lse else res[0, 0, 0]
    chex.assert_rank([q, k, v], 4)
    chex.assert_equal_shape([k, v])
    b, s, h, d = q.shape
    if k.shape[0] != b or k.shape[3] != d or h % k.shape[2] or k.shape[1] < s:
        raise ConfigError(
            f"q {q.shape} and k {k.shape} do not fit: expected k [B, T, KVH, D] with H % KVH == 0 and T >= S")
    window = check_window(sliding_window)
    kernel = kernel_options(kernel, "flash", impl, interpret, pallas_backend, block_sizes)
    scale = default_scale(scale, d)
    if kernel.path() == "jnp":
        return flash_attention_jnp(q, k, v, bool(causal), scale, window, return_lse)
    out, lse = flash_attention_pallas(q, k, v, causal=bool(causal), scale=scale, window=window, kernel=kernel)
    return (out, lse) if return_lse else out


def decode_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    lengths: jax.Array,
    *,
    scale: Optional[float] = None,
    sliding_window: Optional[int] = None,
    impl: str = "auto",
    interpret: bool = False,
    return_residuals: bool = False,
    pallas_backend: Optional[str] = None,
    block_sizes: Optional[DecodeBlockSizes] = None,
    kernel: Optional[KernelOptions] = None,
):
    """One query token per sequence: q [B, H, D], cache k/v [B, KVH, T, D], lengths [B] -> [B, H, D].

    With `return_residuals`, also (max [B, H], sum [B, H]) of the softmax, for `merge_attention`.
    There is no Mosaic decode kernel: on TPU, "auto" runs the jnp path (or use `paged_attention`).
    """
    chex.assert_rank([q, k, v], [3, 4, 4])
    chex.assert_equal_shape([k, v])
    b, h, d = q.shape
    if k.shape[0] != b or k.shape[3] != d or h % k.shape[1]:
        raise ConfigError(f"q {q.shape} and cache {k.shape} do not fit: expected [B, KVH, T, D] with H % KVH == 0")
    lengths = jnp.broadcast_to(jnp.asarray(lengths), (b,))
    window = check_window(sliding_window)
    kernel = kernel_options(kernel, "decode", impl, interpret, pallas_backend, block_sizes)
    path = kernel.path(has_mosaic=False)
    scale = default_scale(scale, d)
    if path == "jnp":
        return decode_attention_jnp(q, k, v, lengths, scale, window, return_residuals)
    if path == "mosaic":
        raise ConfigError("decode_attention has no Mosaic (TPU) kernel; use impl='jnp' or paged_attention")
    out, res = decode_attention_pallas(q, k, v, lengths, scale=scale, window=window, kernel=kernel)
    return (out, res) if return_residuals else out


def paged_attention(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    block_tables: jax.Array,
    lengths: jax.Array,
    *,
    k_scales: Optional[jax.Array] = None,
    v_scales: Optional[jax.Array] = None,
    scale: Optional[float] = None,
    sliding_window: Optional[int] = None,
    impl: str = "auto",
    interpret: bool = False,
    return_residuals: bool = False,
    pallas_backend: Optional[str] = None,
    block_sizes: Optional[PagedBlockSizes] = None,
    kernel: Optional[KernelOptions] = None,
):
    """Decode queries q [B, H, D] against pools [KVH, num_blocks, block_size, D] through block_tables
    [B, max_blocks] and lengths [B] -> [B, H, D] (and residuals (max, sum) [B, H]).

    int8 pools take per-token scales k_scales/v_scales [KVH, num_blocks, block_size]. An unbatched
    q [H, D] with block_tables [max_blocks] and a scalar length works too. Concrete tables/lengths
    are checked on the host: out-of-range entries raise `PagedAttentionError`.
    """
    block_tables, lengths = jnp.asarray(block_tables), jnp.asarray(lengths)
    kernel = kernel_options(kernel, "paged", impl, interpret, pallas_backend, block_sizes)
    if q.ndim == 2:
        res = paged_attention(q[None], k_pages, v_pages, block_tables[None], lengths.reshape(1), k_scales=k_scales,
                              v_scales=v_scales, scale=scale, sliding_window=sliding_window,
                              return_residuals=return_residuals, kernel=kernel)
        return (res[0][0], (res[1][0][0], res[1][1][0])) if return_residuals else res[0]
    check_paged_shapes(q, k_pages, v_pages, block_tables, lengths, k_scales, v_scales)
    check_block_tables(block_tables, lengths, k_pages.shape[1], k_pages.shape[2])
    window = check_window(sliding_window)
    scale = default_scale(scale, q.shape[-1])
    if kernel.path() == "jnp":
        return paged_attention_jnp(q, k_pages, v_pages, block_tables, lengths, k_scales, v_scales, scale, window,
                                   return_residuals)
    out, res = paged_attention_pallas(q, k_pages, v_pages, block_tables, lengths, k_scales, v_scales, scale=scale,
                                      window=window, kernel=kernel)
    return (out, res) if return_residuals else out


def quantized_paged_attention(
    q: jax.Array,
    k_codes: jax.Array,
    v_codes: jax.Array,
    k_scale: jax.Array,
    v_scale: jax.Array,
    block_tables: jax.Array,
    lengths: jax.Array,
    *,
    k_zero: Optional[jax.Array] = None,
    v_zero: Optional[jax.Array] = None,
    bits: int,
    scale: Optional[float] = None,
    impl: str = "auto",
    interpret: bool = False,
    return_residuals: bool = False,
    pallas_backend: Optional[str] = None,
    block_sizes: Optional[PagedBlockSizes] = None,
    kernel: Optional[KernelOptions] = None,
):
    """Decode queries q [B, H, D] against a KIVI-quantized paged store -> [B, H, D] (and residuals
    (max, sum) [B, H], which merge with another key set, e.g. the float tail, by `merge_attention`).

    codes k_codes/v_codes [KVH, num_blocks, block_size, Dc]: int8 (Dc = D) for `bits=8`, uint8 with
    two codes a byte (Dc = D / 2) for `bits=4`; per-channel key scales k_scale (and k_zero, 4 bits)
    [KVH, num_blocks, D]; per-token value scales v_scale (and v_zero, 4 bits) [KVH, num_blocks,
    block_size]. Read through block_tables [B, max_blocks] and lengths [B] as `paged_attention`
    (no window). The store is never dequantized whole. `block_sizes.pages_per_compute_block` pages
    make one step on every path. No Mosaic kernel: on TPU "auto" runs the jnp path.
    """
    block_tables, lengths = jnp.asarray(block_tables), jnp.asarray(lengths)
    kernel = kernel_options(kernel, "paged", impl, interpret, pallas_backend, block_sizes)
    check_quantized_shapes(q, k_codes, v_codes, k_scale, k_zero, v_scale, v_zero, block_tables, lengths, bits)
    check_block_tables(block_tables, lengths, k_codes.shape[1], k_codes.shape[2])
    scale = default_scale(scale, q.shape[-1])
    path = kernel.path(has_mosaic=False)
    if path == "mosaic":
        raise ConfigError("quantized_paged_attention has no Mosaic (TPU) kernel; use impl='jnp'")
    args = (q, k_codes, v_codes, k_scale, k_zero, v_scale, v_zero, block_tables, lengths)
    if path == "jnp":
        return quantized_attention_jnp(*args, bits=bits, scale=scale, return_residuals=return_residuals,
                                       pages_per_step=kernel.block_sizes.paged.pages_per_compute_block)
    out, res = quantized_attention_pallas(*args, bits=bits, scale=scale, kernel=kernel)
    return (out, res) if return_residuals else out


def grouped_query_attention(
    queries: jax.Array,
    keys: jax.Array,
    values: jax.Array,
    config: Optional[AttentionConfig] = None,
    *,
    lengths: Optional[jax.Array] = None,
    impl: str = "auto",
    interpret: bool = False,
    pallas_backend: Optional[str] = None,
    kernel: Optional[KernelOptions] = None,
) -> jax.Array:
    """GQA, KV heads shared by groups of query heads; shapes as RuvLLM's or batched:

    * queries [H, D], keys/values [T, KVH, D] -> [H, D] (RuvLLM's `grouped_query_attention_neon`);
    * queries [B, H, D], keys/values [B, T, KVH, D] -> [B, H, D] (one query per sequence, optional
      `lengths` [B] of valid keys);
    * queries [B, S, H, D], keys/values [B, T, KVH, D] -> [B, S, H, D] (prefill, `config.causal`).
    A single query is the last position, so causal masking hides nothing from it.
    """
    if queries.ndim == 2:
        if keys.ndim != 3:
            raise ConfigError(f"unbatched queries [H, D] need keys [T, KVH, D], got {keys.shape}")
        out = grouped_query_attention(queries[None], keys[None], values[None], config, lengths=lengths,
                                      kernel=kernel_options(kernel, "decode", impl, interpret, pallas_backend))
        return out[0]
    if keys.ndim != 4 or values.shape != keys.shape or queries.ndim not in (3, 4):
        raise ConfigError(f"expected queries [B, (S,) H, D] and keys/values [B, T, KVH, D], got {queries.shape}, "
                          f"{keys.shape}, {values.shape}")
    h, d = queries.shape[-2:]
    kvh = keys.shape[2]
    if config is None:
        if h % kvh:
            raise ConfigError(f"num_heads={h} is not a multiple of num_kv_heads={kvh}")
        config = AttentionConfig(num_heads=h, num_kv_heads=kvh, head_dim=d)
    elif (config.num_heads, config.num_kv_heads, config.head_dim) != (h, kvh, d):
        raise ConfigError(
            f"shapes give num_heads={h}, num_kv_heads={kvh}, head_dim={d} but config has num_heads={config.num_heads}, "
            f"num_kv_heads={config.num_kv_heads}, head_dim={config.head_dim}")
    scale = config.effective_scale()
    kernel = kernel_options(kernel, "decode", impl, interpret, pallas_backend)
    if queries.ndim == 4:
        if lengths is not None:
            raise ConfigError("lengths applies to single-query (decode) calls only")
        return flash_attention(queries, keys, values, scale, config.causal, kernel=kernel)
    b, t = keys.shape[:2]
    lengths = jnp.full((b,), t, jnp.int32) if lengths is None else lengths
    return decode_attention(queries, keys.transpose(0, 2, 1, 3), values.transpose(0, 2, 1, 3), lengths, scale=scale,
                            kernel=kernel)


def multi_query_attention(
    queries: jax.Array,
    key: jax.Array,
    value: jax.Array,
    config: Optional[AttentionConfig] = None,
    *,
    lengths: Optional[jax.Array] = None,
    impl: str = "auto",
    interpret: bool = False,
    pallas_backend: Optional[str] = None,
    kernel: Optional[KernelOptions] = None,
) -> jax.Array:
    """MQA, one KV head shared by all query heads (RuvLLM's `multi_query_attention_neon`):

    queries [H, D] with key/value [T, D] -> [H, D]; [B, H, D] with [B, T, D] -> [B, H, D];
    [B, S, H, D] with [B, T, D] -> [B, S, H, D]. `config`, if given, must have num_kv_heads == 1.
    """
    if config is not None and config.num_kv_heads != 1:
        raise ConfigError(f"multi_query_attention needs config.num_kv_heads == 1, got {config.num_kv_heads}")
    if key.ndim not in (2, 3) or value.shape != key.shape:
        raise ConfigError(f"MQA key/value must be [T, D] or [B, T, D], got {key.shape} and {value.shape}")
    return grouped_query_attention(queries, key[..., None, :], value[..., None, :], config, lengths=lengths,
                                   kernel=kernel_options(kernel, "decode", impl, interpret, pallas_backend))

