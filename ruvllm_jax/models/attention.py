"""The model's one attention path: queries and the keys a cache hands over -> attention outputs.

Every layer of every model attends here, whatever cache it runs on:

- `attend_prompt(q, k, v, ...)`: causal attention of a prompt over its own keys (prefill,
  training and scoring), through `kernels.flash_attention`;
- `attend_parts(q, parts, ...)`: one query token per sequence over the parts a cache's `append`
  returned (`cache.base`): each part goes to the kernel for its layout (`decode_attention` for a
  contiguous `KVPart`, `paged_attention` for a `PagedKVPart`, `quantized_paged_attention` for a
  `QuantizedKVPart`) with `return_residuals`, and the
  partial results merge exactly by log-sum-exp (`kernels.merge_attention`).

The softmax scale comes from the model (`LlamaConfig.attention_config().effective_scale()`), and
how the kernels run from one `KernelOptions`. Sliding windows are the layer's (Hugging Face's
convention: the query at position p sees keys t with p - window < t <= p); each part translates
the window into its own coordinates through its `query_offset`.
"""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp

from ruvllm_jax.cache.base import KVPart, PagedKVPart, Part, QuantizedKVPart
from ruvllm_jax.errors import KvCacheError
from ruvllm_jax.kernels import KernelOptions, decode_attention, flash_attention, merge_attention, paged_attention
from ruvllm_jax.kernels.paged import paged_context_attention


def attend_prompt(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float, sliding_window: Optional[int],
                  kernel: KernelOptions, context: Optional[PagedKVPart] = None) -> jax.Array:
    """q [B, S, H, D] over its own k, v [B, S, KVH, D], causal -> [B, S, H, D].

    With `context` (the tokens a paged cache already holds before the chunk, `cache.context`), the
    queries also see those, merged exactly by log-sum-exp: a session's next turn prefills only
    its new tokens.
    """
    if context is None:
        return flash_attention(q, k, v, scale, True, sliding_window=sliding_window, kernel=kernel)
    out, lse = flash_attention(q, k, v, scale, True, sliding_window=sliding_window, kernel=kernel, return_lse=True)
    lse = lse.transpose(0, 2, 1)  # [B, S, H]
    ctx_out, ctx_res = paged_context_attention(
        q, context.k_pages, context.v_pages, context.block_tables, context.lengths, context.k_scales,
        context.v_scales, scale=scale, sliding_window=sliding_window)
    merged, _ = merge_attention([out, ctx_out], [(lse, jnp.ones_like(lse)), ctx_res])
    return merged.astype(q.dtype)


def part_window(part: Part, sliding_window: Optional[int]) -> Optional[int]:
    """The layer's window in the part's coordinates: keys t >= lengths - result stay visible.

    0 means the window leaves no key of this part visible. `KvCacheError` when the part cannot
    place the query (query_offset None) but the layer slides.
    """
    if sliding_window is None:
        return None
    if part.query_offset is None:
        raise KvCacheError(
            f"a {type(part).__name__} whose query offset varies per step cannot take a sliding window "
            f"of {sliding_window} (a SegmentedKVCache base, say); use a cache that places the query")
    return max(0, sliding_window - 1 - part.query_offset)


def attend_parts(q: jax.Array, parts: Sequence[Part], *, scale: float, sliding_window: Optional[int],
                 kernel: KernelOptions) -> jax.Array:
    """q [B, H, D] over every key of `parts` -> [B, H, D] in q's dtype."""
    outs, residuals = [], []
    for part in parts:
        window = part_window(part, sliding_window)
        if window == 0:
            continue  # the window ends before this part: it adds nothing to the softmax
        if isinstance(part, KVPart):
            out, res = decode_attention(q, part.k, part.v, part.lengths, scale=scale, sliding_window=window,
                                        return_residuals=True, kernel=kernel)
        elif isinstance(part, PagedKVPart):
            out, res = paged_attention(q, part.k_pages, part.v_pages, part.block_tables, part.lengths,
                                       k_scales=part.k_scales, v_scales=part.v_scales, scale=scale,
                                       sliding_window=window, return_residuals=True, kernel=kernel)
        elif isinstance(part, QuantizedKVPart):
            from ruvllm_jax.kernels import quantized_paged_attention

            out, res = quantized_paged_attention(
                q, part.k_codes, part.v_codes, part.k_scale, part.v_scale, part.block_tables, part.lengths,
                k_zero=part.k_zero, v_zero=part.v_zero, bits=part.bits, scale=scale, return_residuals=True,
                kernel=kernel)
        else:
            raise KvCacheError(f"attention cannot read a part of type {type(part).__name__}")
        outs.append(out)
        residuals.append(res)
    if not outs:
        raise KvCacheError(f"no part holds a key the query can see ({len(parts)} parts, window {sliding_window})")
    if len(outs) == 1:
        return outs[0].astype(q.dtype)
    return merge_attention(outs, residuals)[0].astype(q.dtype)
