"""Prefill (flash) attention: the blocked online-softmax kernels, the jnp path and the reference.

Layout as `jax.nn.dot_product_attention`: q [B, S, H, D], k/v [B, T, KVH, D] with H % KVH == 0. The
S queries are the *last* S positions of the T keys (T == S in prefill, T > S when a chunk attends to
an earlier prefix). Masks: causal keeps key t for the query at position p iff t <= p; a sliding
window of w keeps t > p - w (Hugging Face's convention).

The Pallas kernels see one KV head and the G query heads that share it as one tile of rows: the
wrapper lays q out as [B, KVH, S * Gp, D] with row r = position r // Gp, head r % Gp (Gp = G padded
to a power of two), so K/V are read once per group, not once per query head. Sequence lengths are
padded up to the block sizes and masked by the true lengths inside the kernels.

* `_flash_kernel_triton`: grid (B, KVH, S blocks), a `fori_loop` over only the KV blocks the masks
  can reach (causal and window bounds).
* `_flash_kernel_mosaic`: grid (B, KVH, S blocks, T blocks) with VMEM scratch accumulators; blocks
  that no query can see are skipped (`pl.when`) and not even fetched (the index map clamps).
* `flash_attention_jnp`: dense jnp, what CPU runs and the backward pass differentiates.
* `flash_attention_reference`: naive per-head softmax in the input dtype (float64 under x64): the
  spec the tests compare everything against.

The Pallas forward is wrapped in a `custom_vjp` whose backward differentiates the jnp path.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from ruvllm_jax.kernels._online_softmax import NEG_INF, finish, online_softmax_step, qk
from ruvllm_jax.kernels.config import FlashBlockSizes, KernelOptions, compute_dtype, next_pow2, pad_axis, round_up


@dataclasses.dataclass(frozen=True, slots=True)
class _FlashCall:
    """What one Pallas flash call needs statically: the masks, the scale and how to run."""

    causal: bool
    scale: float
    window: Optional[int]
    kernel: KernelOptions

    @property
    def backend(self) -> str:
        return self.kernel.pallas_target()

    @property
    def interpret(self) -> bool:
        return self.kernel.interpret

    @property
    def blocks(self) -> FlashBlockSizes:
        return self.kernel.block_sizes.flash


def _visible(q_pos, k_pos, seq_k: int, causal: bool, window: Optional[int]):
    mask = k_pos < seq_k
    if causal:
        mask &= k_pos <= q_pos
    if window is not None:
        mask &= k_pos > q_pos - window
    return mask


# --------------------------------------------------------------------------------------------------
# Pallas GPU (Triton) kernel.


def _flash_kernel_triton(q_ref, k_ref, v_ref, o_ref, lse_ref, *, scale, causal, window, block_q, block_k,
                         g_shift, seq_q, seq_k):
    # q_ref, o_ref [rows = block_q * Gp, D]; k_ref, v_ref [T_pad, D] (one KV head); lse_ref [rows].
    rows = q_ref.shape[0]
    iq = pl.program_id(2)
    offset = seq_k - seq_q
    first_pos = iq * block_q + offset
    q = q_ref[...]
    q_pos = first_pos + lax.shift_right_logical(lax.broadcasted_iota(jnp.int32, (rows, block_k), 0), g_shift)
    k_iota = lax.broadcasted_iota(jnp.int32, (rows, block_k), 1)

    def body(j, carry):
        m, l, acc = carry
        k = k_ref[pl.ds(j * block_k, block_k), :]
        v = v_ref[pl.ds(j * block_k, block_k), :]
        s = qk(q, k, scale)
        s = jnp.where(_visible(q_pos, j * block_k + k_iota, seq_k, causal, window), s, NEG_INF)
        return online_softmax_step(s, m, l, acc, v)

    hi = pl.cdiv(jnp.minimum(first_pos + block_q, seq_k), block_k) if causal else pl.cdiv(seq_k, block_k)
    lo = jnp.maximum(first_pos - window + 1, 0) // block_k if window is not None else 0
    init = (jnp.full((rows, 1), NEG_INF, jnp.float32), jnp.zeros((rows, 1), jnp.float32),
            jnp.zeros((rows, q_ref.shape[1]), jnp.float32))
    out, lse = finish(*lax.fori_loop(lo, hi, body, init))
    o_ref[...] = out.astype(o_ref.dtype)
    lse_ref[...] = lse[:, 0]


def _flash_call_triton(qr, kr, vr, st: _FlashCall, seq_q, seq_k, block_q, block_k, gp):
    from jax.experimental.pallas import triton as plgpu

    b, kvh, rows_total, d = qr.shape
    rows = block_q * gp
    kernel = functools.partial(
        _flash_kernel_triton, scale=st.scale, causal=st.causal, window=st.window, block_q=block_q,
        block_k=block_k, g_shift=gp.bit_length() - 1, seq_q=seq_q, seq_k=seq_k)
    t_pad = kr.shape[2]
    return pl.pallas_call(
        kernel,
        grid=(b, kvh, rows_total // rows),
        in_specs=[
            pl.BlockSpec((None, None, rows, d), lambda i, h, j: (i, h, j, 0)),
            pl.BlockSpec((None, None, t_pad, d), lambda i, h, j: (i, h, 0, 0)),
            pl.BlockSpec((None, None, t_pad, d), lambda i, h, j: (i, h, 0, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, None, rows, d), lambda i, h, j: (i, h, j, 0)),
            pl.BlockSpec((None, None, rows), lambda i, h, j: (i, h, j)),
        ],
        out_shape=[jax.ShapeDtypeStruct(qr.shape, qr.dtype),
                   jax.ShapeDtypeStruct((b, kvh, rows_total), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=4 if d <= 64 else 8, num_stages=2),
        interpret=st.interpret,
        name="ruvllm_flash_fwd_triton",
    )(qr, kr, vr)


# --------------------------------------------------------------------------------------------------
# Pallas TPU (Mosaic) kernel.


def _flash_kernel_mosaic(q_ref, k_ref, v_ref, o_ref, lse_ref, m_scr, l_scr, acc_scr, *, scale, causal, window,
                         block_q, block_k, g_shift, seq_q, seq_k):
    # q_ref, o_ref [rows = block_q * Gp, D]; k_ref, v_ref [block_k, D]; lse_ref, m_scr, l_scr [rows, 1];
    # acc_scr [rows, D] (VMEM scratch carried across the T-block grid axis).
    rows = q_ref.shape[0]
    iq, jk = pl.program_id(2), pl.program_id(3)
    first_pos = iq * block_q + (seq_k - seq_q)
    k_start = jk * block_k

    @pl.when(jk == 0)
    def _init():
        m_scr[...] = jnp.full(m_scr.shape, NEG_INF, jnp.float32)
        l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
        acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

    reachable = k_start < seq_k
    if causal:
        reachable &= k_start <= first_pos + block_q - 1
    if window is not None:
        reachable &= k_start + block_k - 1 > first_pos - window

    @pl.when(reachable)
    def _compute():
        q_pos = first_pos + lax.shift_right_logical(lax.broadcasted_iota(jnp.int32, (rows, block_k), 0), g_shift)
        k_pos = k_start + lax.broadcasted_iota(jnp.int32, (rows, block_k), 1)
        s = qk(q_ref[...], k_ref[...], scale)
        s = jnp.where(_visible(q_pos, k_pos, seq_k, causal, window), s, NEG_INF)
        m, l, acc = online_softmax_step(s, m_scr[...], l_scr[...], acc_scr[...], v_ref[...])
        m_scr[...], l_scr[...], acc_scr[...] = m, l, acc

    @pl.when(jk == pl.num_programs(3) - 1)
    def _store():
        out, lse = finish(m_scr[...], l_scr[...], acc_scr[...])
        o_ref[...] = out.astype(o_ref.dtype)
        lse_ref[...] = lse


def _flash_call_mosaic(qr, kr, vr, st: _FlashCall, seq_q, seq_k, block_q, block_k, gp):
    from jax.experimental.pallas import tpu as pltpu

    b, kvh, rows_total, d = qr.shape
    rows = block_q * gp
    nk = kr.shape[2] // block_k
    offset = seq_k - seq_q

    def kv_index(i, h, j, jk):
        # Clamp to the last block a causal tile can reach: an unchanged block index skips the DMA.
        if st.causal:
            jk = jnp.minimum(jk, lax.div(j * block_q + offset + block_q - 1, block_k))  # non-negative
        return (i, h, jk, 0)

    kernel = functools.partial(
        _flash_kernel_mosaic, scale=st.scale, causal=st.causal, window=st.window, block_q=block_q,
        block_k=block_k, g_shift=gp.bit_length() - 1, seq_q=seq_q, seq_k=seq_k)
    interpret = pltpu.InterpretParams() if st.interpret else False
    out, lse = pl.pallas_call(
        kernel,
        grid=(b, kvh, rows_total // rows, nk),
        in_specs=[
            pl.BlockSpec((None, None, rows, d), lambda i, h, j, jk: (i, h, j, 0)),
            pl.BlockSpec((None, None, block_k, d), kv_index),
            pl.BlockSpec((None, None, block_k, d), kv_index),
        ],
        out_specs=[
            pl.BlockSpec((None, None, rows, d), lambda i, h, j, jk: (i, h, j, 0)),
            pl.BlockSpec((None, None, rows, 1), lambda i, h, j, jk: (i, h, j, 0)),
        ],
        out_shape=[jax.ShapeDtypeStruct(qr.shape, qr.dtype),
                   jax.ShapeDtypeStruct((b, kvh, rows_total, 1), jnp.float32)],
        scratch_shapes=[pltpu.VMEM((rows, 1), jnp.float32), pltpu.VMEM((rows, 1), jnp.float32),
                        pltpu.VMEM((rows, d), jnp.float32)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name="ruvllm_flash_fwd_mosaic",
    )(qr, kr, vr)
    return out, lse[..., 0]


# --------------------------------------------------------------------------------------------------
# Pallas dispatch: layout, padding, custom_vjp.


def _tiles(st: _FlashCall, s: int, t: int, g: int):
    gp = next_pow2(g)
    if st.backend == "triton":  # Triton tiles are powers of two, dots at least 16 x 16
        block_q = max(1, min(st.blocks.block_q, next_pow2(s)))
        while block_q * gp < 16:
            block_q *= 2
        block_k = max(16, min(st.blocks.block_k, next_pow2(t)))
    else:  # Mosaic: sublane multiples of 8; a single tile may equal the whole (padded) axis
        block_q = min(st.blocks.block_q, round_up(s, 8))
        block_k = min(st.blocks.block_k, round_up(t, 8))
    return gp, block_q, block_k


def _flash_pallas_forward(q, k, v, st: _FlashCall):
    b, s, h, d = q.shape
    t, kvh = k.shape[1], k.shape[2]
    g = h // kvh
    gp, block_q, block_k = _tiles(st, s, t, g)
    s_pad, t_pad = round_up(s, block_q), round_up(t, block_k)
    d_pad = next_pow2(d) if st.backend == "triton" else d
    qr = pad_axis(pad_axis(q.reshape(b, s, kvh, g, d), 3, gp), 4, d_pad)
    qr = pad_axis(qr, 1, s_pad).transpose(0, 2, 1, 3, 4).reshape(b, kvh, s_pad * gp, d_pad)
    kr = pad_axis(pad_axis(k, 3, d_pad), 1, t_pad).transpose(0, 2, 1, 3)
    vr = pad_axis(pad_axis(v, 3, d_pad), 1, t_pad).transpose(0, 2, 1, 3)
    call = _flash_call_triton if st.backend == "triton" else _flash_call_mosaic
    out, lse = call(qr, kr, vr, st, s, t, block_q, block_k, gp)
    out = out.reshape(b, kvh, s_pad, gp, d_pad)[:, :, :s, :g, :d].transpose(0, 2, 1, 3, 4).reshape(b, s, h, d)
    lse = lse.reshape(b, kvh, s_pad, gp)[:, :, :s, :g].transpose(0, 1, 3, 2).reshape(b, h, s)
    return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _flash_pallas(q, k, v, st: _FlashCall):
    return _flash_pallas_forward(q, k, v, st)


def _flash_pallas_fwd(q, k, v, st):
    return _flash_pallas_forward(q, k, v, st), (q, k, v)


def _flash_pallas_bwd(st, residuals, cotangents):
    q, k, v = residuals
    _, vjp = jax.vjp(lambda q, k, v: flash_attention_jnp(q, k, v, st.causal, st.scale, st.window, True), q, k, v)
    return vjp(cotangents)


_flash_pallas.defvjp(_flash_pallas_fwd, _flash_pallas_bwd)


@functools.partial(jax.jit, static_argnames=("causal", "scale", "window", "kernel"))
def flash_attention_pallas(q, k, v, *, causal: bool, scale: float, window: Optional[int], kernel: KernelOptions):
    """Pallas flash attention -> (out [B, S, H, D], lse [B, H, S]); differentiable via the jnp path.

    Lowers for `kernel.pallas_target()` with `kernel.block_sizes.flash` tiles (no device check:
    the public `flash_attention` makes that).
    """
    return _flash_pallas(q, k, v, _FlashCall(causal=bool(causal), scale=scale, window=window, kernel=kernel))


# --------------------------------------------------------------------------------------------------
# jnp path (CPU) and the reference.


@functools.partial(jax.jit, static_argnames=("causal", "scale", "sliding_window", "return_lse"))
def flash_attention_jnp(q, k, v, causal: bool, scale: float, sliding_window: Optional[int], return_lse: bool):
    """Dense jnp attention with grouped heads; softmax in float32 (float64 for float64 inputs)."""
    b, s, h, d = q.shape
    t, kvh = k.shape[1], k.shape[2]
    g = h // kvh
    ct = compute_dtype(q.dtype, k.dtype)
    # Head-major operands ([B, KVH, rows, D]) make both einsums plain batched matmuls; with the
    # sequence-major layout XLA:CPU transposed inside the dots and ran 2-4x slower.
    qg = q.reshape(b, s, kvh, g, d).transpose(0, 2, 3, 1, 4).reshape(b, kvh, g * s, d).astype(ct)
    kt = k.transpose(0, 2, 1, 3).astype(ct)
    scores = (jnp.einsum("bkqd,bktd->bkqt", qg, kt) * scale).reshape(b, kvh, g, s, t)
    q_pos = jnp.arange(s)[:, None] + (t - s)  # queries are the last s positions of the keys
    k_pos = jnp.arange(t)[None, :]
    scores = jnp.where(_visible(q_pos, k_pos, t, causal, sliding_window), scores, -jnp.inf)
    m = jnp.max(scores, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(scores - m)
    l = jnp.sum(p, axis=-1, keepdims=True)
    p = (p / jnp.where(l == 0, 1.0, l)).reshape(b, kvh, g * s, t)
    out = jnp.einsum("bkqt,bktd->bkqd", p, v.transpose(0, 2, 1, 3).astype(ct))
    out = out.reshape(b, kvh, g, s, d).transpose(0, 3, 1, 2, 4).reshape(b, s, h, d).astype(q.dtype)
    if return_lse:
        lse = (m + jnp.log(l))[..., 0].reshape(b, h, s)
        return out, lse
    return out


@functools.partial(jax.jit, static_argnames=("causal", "scale", "sliding_window"))
def flash_attention_reference(q, k, v, *, causal: bool = True, scale: Optional[float] = None,
                              sliding_window: Optional[int] = None):
    """The spec: per-head softmax(q k^T * scale + mask) v, KV heads repeated, in the inputs' dtype.

    Returns (out [B, S, H, D], lse [B, H, S]); rows with no visible key give 0 and -inf.
    """
    b, s, h, d = q.shape
    t, kvh = k.shape[1], k.shape[2]
    scale = d ** -0.5 if scale is None else scale
    k = jnp.repeat(k, h // kvh, axis=2)
    v = jnp.repeat(v, h // kvh, axis=2)
    logits = jnp.einsum("bshd,bthd->bhst", q, k, precision=lax.Precision.HIGHEST) * scale
    pos = jnp.arange(s)[:, None] + (t - s)
    key = jnp.arange(t)[None, :]
    mask = jnp.ones((s, t), bool)
    if causal:
        mask &= key <= pos
    if sliding_window is not None:
        mask &= key > pos - sliding_window
    logits = jnp.where(mask, logits, -jnp.inf)
    lse = jax.nn.logsumexp(logits, axis=-1)
    weights = jnp.where(mask, jnp.exp(logits - jnp.where(jnp.isfinite(lse), lse, 0.0)[..., None]), 0.0)
    out = jnp.einsum("bhst,bthd->bshd", weights, v, precision=lax.Precision.HIGHEST)
    return out, lse
