"""Decode attention: one query token per sequence against a long cache, split-K, mergeable by LSE.

Layout: q [B, H, D] against a head-major cache k/v [B, KVH, T, D] with `lengths` [B]; key t of
sequence b is valid iff t < lengths[b] (and t >= lengths[b] - window with a sliding window).

Every path can return the softmax residuals (max [B, H], sum [B, H]) with out = sum_t p_t v_t / sum,
p_t = exp(s_t - max). Attention over two disjoint key sets (two cache tiers, or the K splits of the
kernel) is then recovered exactly by `merge_attention`. An empty key set has max = -inf, sum = 0 and
output 0, so it merges as the identity.

* `_decode_kernel_triton`: grid (B, KVH, K splits); each program takes the G query heads of one KV
  head (padded to >= 16 rows for the tensor-core dot) over one slice of the cache, looping only over
  the blocks inside [lengths - window, lengths); the splits are merged with `merge_attention`.
* `decode_attention_jnp`: dense jnp (the CPU path). `decode_attention_reference`: the spec.
There is no Mosaic decode kernel: on TPU the paged Mosaic kernel or the jnp path serve decode.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from ruvllm_jax.kernels._online_softmax import NEG_INF, finish, merge_attention, online_softmax_step, qk
from ruvllm_jax.kernels.config import KernelOptions, compute_dtype, next_pow2, pad_axis

# --------------------------------------------------------------------------------------------------
# Pallas GPU (Triton) kernel.


def _decode_kernel_triton(len_ref, q_ref, k_ref, v_ref, o_ref, m_ref, l_ref, *, scale, window, block_k):
    # len_ref [1]; q_ref, o_ref [Gp, D] (the query heads of one KV head); k_ref, v_ref [split_len, D]
    # (this program's slice of the cache); m_ref, l_ref [Gp].
    rows, d = q_ref.shape
    split_len = k_ref.shape[0]
    start = pl.program_id(2) * split_len
    length = len_ref[0]
    lo_key = jnp.maximum(length - window, 0) if window is not None else 0
    q = q_ref[...]
    k_iota = lax.broadcasted_iota(jnp.int32, (rows, block_k), 1)

    def body(j, carry):
        pos = start + j * block_k + k_iota
        s = qk(q, k_ref[pl.ds(j * block_k, block_k), :], scale)
        s = jnp.where((pos < length) & (pos >= lo_key), s, NEG_INF)
        return online_softmax_step(s, *carry, v_ref[pl.ds(j * block_k, block_k), :])

    n_blocks = split_len // block_k
    hi = jnp.clip(pl.cdiv(length - start, block_k), 0, n_blocks)
    lo = jnp.clip((lo_key - start) // block_k, 0, n_blocks)
    init = (jnp.full((rows, 1), NEG_INF, jnp.float32), jnp.zeros((rows, 1), jnp.float32),
            jnp.zeros((rows, d), jnp.float32))
    m, l, acc = lax.fori_loop(lo, hi, body, init)
    out, _ = finish(m, l, acc)
    o_ref[...] = out.astype(o_ref.dtype)
    m_ref[...] = m[:, 0]
    l_ref[...] = l[:, 0]


@functools.partial(jax.jit, static_argnames=("scale", "window", "kernel"))
def decode_attention_pallas(q, k, v, lengths, *, scale: float, window: Optional[int], kernel: KernelOptions):
    """Split-K Pallas GPU decode -> (out [B, H, D], (max [B, H], sum [B, H])), `kernel.block_sizes.decode` tiles."""
    from jax.experimental.pallas import triton as plgpu

    blocks, interpret = kernel.block_sizes.decode, kernel.interpret

    b, h, d = q.shape
    kvh, t = k.shape[1], k.shape[2]
    g = h // kvh
    gp = max(16, next_pow2(g))
    d_pad = next_pow2(d)
    block_k = max(16, min(blocks.block_k, next_pow2(t)))
    n_blocks = -(-t // block_k)
    splits = min(blocks.max_splits, n_blocks)
    split_len = -(-n_blocks // splits) * block_k
    t_pad = splits * split_len
    qr = pad_axis(pad_axis(q.reshape(b, kvh, g, d), 2, gp), 3, d_pad)
    kr = pad_axis(pad_axis(k, 3, d_pad), 2, t_pad)  # no copy for power-of-two caches and head sizes
    vr = pad_axis(pad_axis(v, 3, d_pad), 2, t_pad)
    kernel = functools.partial(_decode_kernel_triton, scale=scale, window=window, block_k=block_k)
    out, m, l = pl.pallas_call(
        kernel,
        grid=(b, kvh, splits),
        in_specs=[
            pl.BlockSpec((1,), lambda i, h, j: (i,)),
            pl.BlockSpec((None, None, gp, d_pad), lambda i, h, j: (i, h, 0, 0)),
            pl.BlockSpec((None, None, split_len, d_pad), lambda i, h, j: (i, h, j, 0)),
            pl.BlockSpec((None, None, split_len, d_pad), lambda i, h, j: (i, h, j, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, gp, d_pad), lambda i, h, j: (j, i, h, 0, 0)),
            pl.BlockSpec((None, None, None, gp), lambda i, h, j: (j, i, h, 0)),
            pl.BlockSpec((None, None, None, gp), lambda i, h, j: (j, i, h, 0)),
        ],
        out_shape=[jax.ShapeDtypeStruct((splits, b, kvh, gp, d_pad), jnp.float32),
                   jax.ShapeDtypeStruct((splits, b, kvh, gp), jnp.float32),
                   jax.ShapeDtypeStruct((splits, b, kvh, gp), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret,
        name="ruvllm_decode_triton",
    )(lengths.astype(jnp.int32), qr, kr, vr)
    out, (m, l) = merge_attention(list(out), list(zip(m, l, strict=True)))
    return (out[:, :, :g, :d].reshape(b, h, d).astype(q.dtype),
            (m[:, :, :g].reshape(b, h), l[:, :, :g].reshape(b, h)))


# --------------------------------------------------------------------------------------------------
# jnp path (CPU) and the reference.


def _decode_mask(lengths, t: int, window: Optional[int]):
    pos = jnp.arange(t)[None, :]
    lengths = lengths.reshape(-1, 1)
    mask = pos < lengths
    if window is not None:
        mask &= pos >= lengths - window
    return mask  # [B, T]


@functools.partial(jax.jit, static_argnames=("scale", "sliding_window", "return_residuals"))
def decode_attention_jnp(q, k, v, lengths, scale: float, sliding_window: Optional[int], return_residuals: bool):
    """Dense jnp decode with grouped heads; softmax in float32 (float64 for float64 inputs)."""
    b, h, d = q.shape
    kvh, t = k.shape[1], k.shape[2]
    g = h // kvh
    ct = compute_dtype(q.dtype, k.dtype)
    qg = q.reshape(b, kvh, g, d).astype(ct)
    scores = jnp.einsum("bkgd,bktd->bkgt", qg, k.astype(ct)) * scale
    scores = jnp.where(_decode_mask(lengths, t, sliding_window)[:, None, None, :], scores, -jnp.inf)
    m = jnp.max(scores, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(scores - m)
    l = jnp.sum(p, axis=-1, keepdims=True)
    acc = jnp.einsum("bkgt,bktd->bkgd", p, v.astype(ct))
    out = (acc / jnp.where(l == 0, 1.0, l)).reshape(b, h, d).astype(q.dtype)
    if return_residuals:
        l = l[..., 0].reshape(b, h)
        return out, (jnp.where(l == 0, -jnp.inf, m[..., 0].reshape(b, h)), l)
    return out


@functools.partial(jax.jit, static_argnames=("scale", "sliding_window"))
def decode_attention_reference(q, k, v, lengths, *, scale: Optional[float] = None,
                               sliding_window: Optional[int] = None):
    """The spec: per-head softmax over the valid keys, KV heads repeated, in the inputs' dtype.

    Returns (out [B, H, D], (max [B, H], sum [B, H])), max = -inf and out = 0 where no key is valid.
    """
    b, h, d = q.shape
    kvh, t = k.shape[1], k.shape[2]
    scale = d ** -0.5 if scale is None else scale
    k = jnp.repeat(k, h // kvh, axis=1)
    v = jnp.repeat(v, h // kvh, axis=1)
    logits = jnp.einsum("bhd,bhtd->bht", q, k, precision=lax.Precision.HIGHEST) * scale
    # The spec's own mask (not the jnp path's): key t is the (lengths - t)-th most recent, and a
    # window of w keeps the w most recent.
    age = jnp.asarray(lengths).reshape(-1, 1) - jnp.arange(t)[None, :]  # 1 = the newest stored key
    mask = age >= 1
    if sliding_window is not None:
        mask &= age <= sliding_window
    mask = mask[:, None, :]
    logits = jnp.where(mask, logits, -jnp.inf)
    m = jnp.max(logits, axis=-1)
    p = jnp.where(mask, jnp.exp(logits - jnp.where(jnp.isfinite(m), m, 0.0)[..., None]), 0.0)
    l = jnp.sum(p, axis=-1)
    out = jnp.einsum("bht,bhtd->bhd", p, v, precision=lax.Precision.HIGHEST) / jnp.where(l == 0, 1.0, l)[..., None]
    return out, (m, l)
