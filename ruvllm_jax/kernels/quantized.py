"""Quantized paged attention: decode queries against a KIVI-quantized block store, never dequantized whole.

The store tier of the two-tier quantized KV cache (`ruvllm_jax.cache.two_tier`). Arrays only:
q [B, H, D]; codes k_codes/v_codes [KVH, NB, BS, Dc]; block_tables [B, MB] and lengths [B] as in
`paged` (entry i of row b holds tokens [i*BS, (i+1)*BS) of sequence b; token i is valid iff
i < lengths[b]; no window). Codes (see `ruvllm_jax.cache.kv_quant`):

* bits 8: int8, Dc = D, symmetric: value = code * scale;
* bits 4: uint8, Dc = D / 2, value = code * scale + zero, byte j holding channel j in the low nibble
  and channel j + D/2 in the high one, so the two code planes are `b & 15` and `b >> 4` and each
  pairs with one half of the query: nothing is ever interleaved.

Keys are scaled per channel over a block (k_scale, k_zero [KVH, NB, D]), values per token (v_scale,
v_zero [KVH, NB, BS]), both float16. The fast paths fold the scales into the small operands instead
of dequantizing the codes: scores = (q * k_scale) . codes + q . k_zero, and the value sum is
(p * v_scale) @ codes + (p . v_zero). Every path returns the softmax residuals (max, sum) [B, H], so
the store merges with the float tail by `merge_attention`; an empty store (length 0) has out 0,
max -inf and sum 0 and merges as the identity.

* `_quantized_kernel_triton`: grid (B, KVH, K splits); each step reads `pages_per_compute_block`
  pages one at a time (the per-page key scales fold into that page's query) and updates the online
  softmax once for the group. No Mosaic kernel: on TPU "auto" runs the jnp path.
* `quantized_attention_jnp` (the CPU path): a loop over the table, `pages_per_step` pages a step,
  gathering only those pages and widening only their codes to float32 for f32 dots (see
  PERF-NOTES: the fast shapes on XLA:CPU).
* `quantized_attention_reference`: the spec: dequantize everything, gather in table order, reference
  decode.
"""

from __future__ import annotations

import functools
from typing import List, Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from ruvllm_jax.errors import ConfigError, PagedAttentionError
from ruvllm_jax.kernels._online_softmax import NEG_INF, finish, merge_attention
from ruvllm_jax.kernels.config import KernelOptions, PagedBlockSizes, compute_dtype, next_pow2, pad_axis
from ruvllm_jax.kernels.decode import decode_attention_reference
from ruvllm_jax.kernels.paged import check_table_shapes, gather_pages, split_tables

CODE_DTYPES = {8: jnp.int8, 4: jnp.uint8}
_MIN_DOT = 16  # Triton's smallest dot tile; below it the kernel multiplies and reduces instead


def code_planes(codes: jax.Array, bits: int) -> List[jax.Array]:
    """The code planes of [..., Dc] codes, one per channel range: [codes] for 8 bits; for 4 bits
    [low nibbles (channels [0, D/2)), high nibbles (channels [D/2, D))]."""
    return [codes] if bits == 8 else [codes & 15, codes >> 4]


def dequantize_codes(codes, scale, zero, bits: int, axis: int, dtype):
    """codes [..., BS, Dc] -> values [..., BS, D] in `dtype`: code * scale (+ zero), with scale/zero
    expanded at `axis` (-2: per-channel keys, scale [..., D]; -1: per-token values, scale [..., BS])."""
    planes = code_planes(codes, bits)
    x = (planes[0] if bits == 8 else jnp.concatenate(planes, axis=-1)).astype(dtype)
    x = x * jnp.expand_dims(scale.astype(dtype), axis)
    return x if zero is None else x + jnp.expand_dims(zero.astype(dtype), axis)


def check_quantized_shapes(q, k_codes, v_codes, k_scale, k_zero, v_scale, v_zero, block_tables, lengths,
                           bits) -> None:
    """Raise `PagedAttentionError` naming the first input that does not fit the layout above."""
    if isinstance(bits, bool) or bits not in CODE_DTYPES:
        raise PagedAttentionError(f"bits must be 8 or 4, got {bits!r}")
    if q.ndim != 3 or k_codes.ndim != 4 or k_codes.shape != v_codes.shape:
        raise PagedAttentionError(
            f"expected q [B, H, D] and codes [KVH, num_blocks, block_size, Dc], got q {q.shape}, "
            f"k_codes {k_codes.shape}, v_codes {v_codes.shape}")
    b, h, d = q.shape
    kvh, nb, bs, dc = k_codes.shape
    if h % kvh:
        raise PagedAttentionError(f"q has {h} heads, not a multiple of the store's {kvh} KV heads")
    want = CODE_DTYPES[bits]
    for name, codes in (("k_codes", k_codes), ("v_codes", v_codes)):
        if codes.dtype != want:
            raise PagedAttentionError(f"{bits}-bit codes must be {jnp.dtype(want).name}, got {name} {codes.dtype}")
    if bits == 4 and d % 2:
        raise PagedAttentionError(f"4-bit codes pack two channels a byte: head_dim must be even, got {d}")
    want_dc = d if bits == 8 else d // 2
    if dc != want_dc:
        raise PagedAttentionError(f"{bits}-bit codes of head_dim {d} have Dc = {want_dc}, got codes {k_codes.shape}")
    for name, zero in (("k_zero", k_zero), ("v_zero", v_zero)):
        if (zero is None) != (bits == 8):
            raise PagedAttentionError(
                f"{bits}-bit codes {'take no' if bits == 8 else 'need'} zero points, got {name} "
                f"{None if zero is None else zero.shape}")
    for name, x, shape in (("k_scale", k_scale, (kvh, nb, d)), ("k_zero", k_zero, (kvh, nb, d)),
                           ("v_scale", v_scale, (kvh, nb, bs)), ("v_zero", v_zero, (kvh, nb, bs))):
        if x is None:
            continue
        if x.shape != shape or not jnp.issubdtype(x.dtype, jnp.floating):
            raise PagedAttentionError(f"{name} must be a float array of shape {shape}, got {x.dtype}{list(x.shape)}")
    check_table_shapes(block_tables, lengths, b)


# --------------------------------------------------------------------------------------------------
# Pallas GPU (Triton) kernel.


def _dot(a, b, contract_b: int):
    """a [rows, K] times b, contracting b's axis `contract_b`, in float32. Tiles below Triton's
    16x16 dot minimum (small pages or 4-bit halves of small heads) multiply and reduce instead."""
    if min(b.shape) >= _MIN_DOT:
        return lax.dot_general(a, b, (((1,), (contract_b,)), ((), ())), preferred_element_type=jnp.float32)
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    if contract_b == 1:  # [rows, 1, K] * [1, N, K] -> [rows, N]
        return jnp.sum(a[:, None, :] * b[None, :, :], axis=2)
    return jnp.sum(a[:, :, None] * b[None, :, :], axis=1)  # [rows, K, 1] * [1, K, N] -> [rows, N]


def _quantized_kernel_triton(len_ref, tab_ref, q_ref, kc_ref, vc_ref, ks_ref, vs_ref, *refs, scale, bits, ppcb):
    # len_ref [1]; tab_ref [pages_per_split] (this split's block ids); q_ref, o_ref [planes, Gp, Dc]
    # (query/output channels split like the code planes); kc_ref, vc_ref [num_blocks, BS, Dc] (one KV
    # head's store); ks_ref (kz_ref) [num_blocks, planes, Dc]; vs_ref (vz_ref) [num_blocks, BS];
    # m_ref, l_ref [Gp]. Zero points (kz_ref, vz_ref) for 4 bits only.
    if bits == 4:
        kz_ref, vz_ref, o_ref, m_ref, l_ref = refs
    else:
        (o_ref, m_ref, l_ref), kz_ref, vz_ref = refs, None, None
    n_planes, rows, _ = q_ref.shape
    bs = kc_ref.shape[1]
    pages_per_split = tab_ref.shape[0]
    start = pl.program_id(2) * pages_per_split * bs
    length = len_ref[0]
    dt = q_ref.dtype  # dot operands in the query's dtype (codes are exact in bf16/f16), f32 accumulation
    q = [q_ref[c].astype(jnp.float32) * scale for c in range(n_planes)]
    t_iota = lax.broadcasted_iota(jnp.int32, (rows, bs), 1)

    def page_scores(page, first_token):
        k = code_planes(kc_ref[page], bits)
        s = functools.reduce(jnp.add, [
            _dot((q[c] * ks_ref[page, c].astype(jnp.float32)[None, :]).astype(dt), k[c].astype(dt), 1)
            for c in range(n_planes)])
        if bits == 4:  # + q . k_zero, one number per query row for the whole page
            s = s + functools.reduce(jnp.add, [
                jnp.sum(q[c] * kz_ref[page, c].astype(jnp.float32)[None, :], axis=1, keepdims=True)
                for c in range(n_planes)])
        return jnp.where(first_token + t_iota < length, s, NEG_INF)

    def page_values(page, p):
        v = code_planes(vc_ref[page], bits)
        pv_scaled = (p * vs_ref[page].astype(jnp.float32)[None, :]).astype(dt)
        pv = [_dot(pv_scaled, v[c].astype(dt), 0) for c in range(n_planes)]
        if bits == 4:  # + p . v_zero, added to every channel
            pz = jnp.sum(p * vz_ref[page].astype(jnp.float32)[None, :], axis=1, keepdims=True)
            pv = [x + pz for x in pv]
        return pv

    def body(j, carry):
        # One online-softmax update for ppcb pages: each page's scores first, then one rescale.
        m_prev, l_prev, acc = carry
        pages = [tab_ref[j * ppcb + i] for i in range(ppcb)]
        scores = [page_scores(page, start + (j * ppcb + i) * bs) for i, page in enumerate(pages)]
        m_new = functools.reduce(jnp.maximum, [jnp.max(s, axis=1, keepdims=True) for s in scores], m_prev)
        m_safe = jnp.where(m_new == NEG_INF, 0.0, m_new)  # rows with nothing visible yet stay at 0
        alpha = jnp.exp(m_prev - m_safe)
        l_new, acc = alpha * l_prev, [alpha * a for a in acc]
        for page, s in zip(pages, scores, strict=True):
            p = jnp.exp(s - m_safe)
            l_new = l_new + jnp.sum(p, axis=1, keepdims=True)
            acc = [a + x for a, x in zip(acc, page_values(page, p), strict=True)]
        return m_new, l_new, tuple(acc)

    n_steps = pages_per_split // ppcb
    hi = jnp.clip(pl.cdiv(length - start, ppcb * bs), 0, n_steps)
    init = (jnp.full((rows, 1), NEG_INF, jnp.float32), jnp.zeros((rows, 1), jnp.float32),
            tuple(jnp.zeros(q[0].shape, jnp.float32) for _ in range(n_planes)))
    m, l, acc = lax.fori_loop(0, hi, body, init)
    for c in range(n_planes):
        o_ref[c] = finish(m, l, acc[c])[0].astype(o_ref.dtype)
    m_ref[...] = m[:, 0]
    l_ref[...] = l[:, 0]


def _quantized_call_triton(qr, k_codes, v_codes, k_scale, k_zero, v_scale, v_zero, tables, lengths, *, scale, bits,
                           interpret, blocks: PagedBlockSizes):
    from jax.experimental.pallas import triton as plgpu

    b, kvh, n_planes, gp, dc = qr.shape
    _, nb, bs, _ = k_codes.shape
    mb = tables.shape[1]
    ppcb = min(blocks.pages_per_compute_block, mb)
    tables, splits = split_tables(tables, ppcb, blocks.max_splits)
    pages_per_split = tables.shape[2]
    # Channel scales as [.., planes, Dc]: a free reshape that puts each code plane's scales in a row.
    channel = [x.reshape(kvh, nb, n_planes, dc) for x in (k_scale, k_zero) if x is not None]
    token = [x for x in (v_scale, v_zero) if x is not None]
    codes_spec = pl.BlockSpec((None, nb, bs, dc), lambda i, h, j: (h, 0, 0, 0))
    channel_spec = pl.BlockSpec((None, nb, n_planes, dc), lambda i, h, j: (h, 0, 0, 0))
    token_spec = pl.BlockSpec((None, nb, bs), lambda i, h, j: (h, 0, 0))
    zero_specs = [channel_spec, token_spec] if bits == 4 else []
    kernel = functools.partial(_quantized_kernel_triton, scale=scale, bits=bits, ppcb=ppcb)
    out, m, l = pl.pallas_call(
        kernel,
        grid=(b, kvh, splits),
        in_specs=[
            pl.BlockSpec((1,), lambda i, h, j: (i,)),
            pl.BlockSpec((None, None, pages_per_split), lambda i, h, j: (i, j, 0)),
            pl.BlockSpec((None, None, n_planes, gp, dc), lambda i, h, j: (i, h, 0, 0, 0)),
            codes_spec, codes_spec, channel_spec, token_spec, *zero_specs,
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, n_planes, gp, dc), lambda i, h, j: (j, i, h, 0, 0, 0)),
            pl.BlockSpec((None, None, None, gp), lambda i, h, j: (j, i, h, 0)),
            pl.BlockSpec((None, None, None, gp), lambda i, h, j: (j, i, h, 0)),
        ],
        out_shape=[jax.ShapeDtypeStruct((splits, b, kvh, n_planes, gp, dc), jnp.float32),
                   jax.ShapeDtypeStruct((splits, b, kvh, gp), jnp.float32),
                   jax.ShapeDtypeStruct((splits, b, kvh, gp), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret,
        name="ruvllm_quantized_triton",
    )(lengths, tables, qr, k_codes, v_codes, channel[0], token[0], *channel[1:], *token[1:])
    # Planes back side by side (plane c holds channels [c*Dc, (c+1)*Dc)), then merge the splits.
    out = out.transpose(0, 1, 2, 4, 3, 5).reshape(splits, b, kvh, gp, n_planes * dc)
    return merge_attention(list(out), list(zip(m, l, strict=True)))


@functools.partial(jax.jit, static_argnames=("bits", "scale", "kernel"))
def quantized_attention_pallas(q, k_codes, v_codes, k_scale, k_zero, v_scale, v_zero, block_tables, lengths, *,
                               bits: int, scale: float, kernel: KernelOptions):
    """Pallas GPU quantized paged attention -> (out [B, H, D], (max [B, H], sum [B, H])).

    Tiles from `kernel.block_sizes.paged`. On GPU, BS and Dc must be powers of two (Triton tiles).
    """
    if kernel.pallas_target() != "triton":
        raise ConfigError("quantized paged attention has no Mosaic (TPU) kernel; use impl='jnp'")
    b, h, d = q.shape
    kvh, nb = k_codes.shape[:2]
    g = h // kvh
    n_planes = 1 if bits == 8 else 2
    gp = max(16, next_pow2(g))
    # q [B, KVH, planes, Gp, Dc]: the query halves that meet each code plane, query heads padded.
    qr = q.reshape(b, kvh, g, n_planes, d // n_planes).transpose(0, 1, 3, 2, 4)
    qr = pad_axis(qr, 3, gp)
    tables = jnp.clip(block_tables.astype(jnp.int32), 0, nb - 1)
    out, (m, l) = _quantized_call_triton(qr, k_codes, v_codes, k_scale, k_zero, v_scale, v_zero, tables,
                                         lengths.astype(jnp.int32), scale=scale, bits=bits,
                                         interpret=kernel.interpret, blocks=kernel.block_sizes.paged)
    return (out[:, :, :g].reshape(b, h, d).astype(q.dtype),
            (m[:, :, :g].reshape(b, h), l[:, :, :g].reshape(b, h)))


# --------------------------------------------------------------------------------------------------
# jnp path (CPU) and the reference.


def _per_head(x):
    """A gathered [KVH, B, P, ...] scale -> [B, KVH, 1, P, ...], broadcastable against [B, KVH, G, P, ...]."""
    return jnp.swapaxes(x, 0, 1)[:, :, None]


@functools.partial(jax.jit, static_argnames=("bits", "scale", "pages_per_step", "return_residuals"))
def quantized_attention_jnp(q, k_codes, v_codes, k_scale, k_zero, v_scale, v_zero, block_tables, lengths, *,
                            bits: int, scale: float, pages_per_step: int, return_residuals: bool):
    """Online softmax over the table, `pages_per_step` pages a step: only those pages are gathered
    and only their codes widened to float (f32 dots; float64 for float64 queries), scales folded."""
    b, h, d = q.shape
    kvh, nb, bs, _ = k_codes.shape
    mb = block_tables.shape[1]
    g = h // kvh
    ct = compute_dtype(q.dtype)
    n_planes = 1 if bits == 8 else 2
    pps = max(1, min(pages_per_step, mb))
    n_steps = -(-mb // pps)
    tables = pad_axis(jnp.clip(block_tables.astype(jnp.int32), 0, nb - 1), 1, n_steps * pps)
    lengths = lengths.astype(jnp.int32)
    q_planes = jnp.split(q.reshape(b, kvh, g, d).astype(ct) * scale, n_planes, axis=-1)  # [B, KVH, G, Dc] each
    tokens = jnp.arange(pps * bs)

    def planes_of(x):  # a gathered channel scale [KVH, B, P, D] -> per plane [B, KVH, 1, P, Dc]
        return jnp.split(_per_head(x.astype(ct)), n_planes, axis=-1)

    def step(j, carry):
        m_prev, l_prev, acc = carry  # [B, KVH, G, 1] twice, and per plane [B, KVH, G, Dc]
        pages = lax.dynamic_slice_in_dim(tables, j * pps, pps, axis=1)  # [B, P]
        k = code_planes(k_codes[:, pages], bits)  # [KVH, B, P, BS, Dc] each
        s = sum(jnp.einsum("bkgpc,kbptc->bkgpt", qc[:, :, :, None] * ksc, kc.astype(ct))
                for qc, ksc, kc in zip(q_planes, planes_of(k_scale[:, pages]), k, strict=True))
        if k_zero is not None:  # + q . k_zero, one number per query and page
            s = s + sum(jnp.sum(qc[:, :, :, None] * kzc, axis=-1)
                        for qc, kzc in zip(q_planes, planes_of(k_zero[:, pages]), strict=True))[..., None]
        s = s.reshape(b, kvh, g, pps * bs)
        visible = (j * pps * bs + tokens)[None, :] < lengths[:, None]  # [B, P * BS]
        s = jnp.where(visible[:, None, None, :], s, -jnp.inf)
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=-1, keepdims=True))
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        alpha = jnp.exp(m_prev - m_safe)
        p = jnp.exp(s - m_safe)
        l_new = alpha * l_prev + jnp.sum(p, axis=-1, keepdims=True)
        p = p.reshape(b, kvh, g, pps, bs)
        p_scaled = p * _per_head(v_scale[:, pages].astype(ct))
        pv = [jnp.einsum("bkgpt,kbptc->bkgc", p_scaled, vc.astype(ct)) for vc in code_planes(v_codes[:, pages], bits)]
        if v_zero is not None:  # + p . v_zero, added to every channel
            pz = jnp.sum(p * _per_head(v_zero[:, pages].astype(ct)), axis=(-2, -1))[..., None]
            pv = [x + pz for x in pv]
        return m_new, l_new, tuple(alpha * a + x for a, x in zip(acc, pv, strict=True))

    n_active = jnp.clip(-(-jnp.max(lengths, initial=0) // (pps * bs)), 0, n_steps)  # skip the unused table tail
    init = (jnp.full((b, kvh, g, 1), -jnp.inf, ct), jnp.zeros((b, kvh, g, 1), ct),
            tuple(jnp.zeros((b, kvh, g, d // n_planes), ct) for _ in range(n_planes)))
    m, l, acc = lax.fori_loop(0, n_active, step, init)
    out, _ = finish(m, l, jnp.concatenate(acc, axis=-1))
    out = out.reshape(b, h, d).astype(q.dtype)
    if return_residuals:
        return out, (m[..., 0].reshape(b, h), l[..., 0].reshape(b, h))
    return out


@functools.partial(jax.jit, static_argnames=("bits", "scale"))
def quantized_attention_reference(q, k_codes, v_codes, k_scale, k_zero, v_scale, v_zero, block_tables, lengths, *,
                                  bits: int, scale: Optional[float] = None):
    """The spec: dequantize the whole store in q's dtype, read the pages in table order, reference decode.

    Returns (out [B, H, D], (max [B, H], sum [B, H])).
    """
    k = gather_pages(dequantize_codes(k_codes, k_scale, k_zero, bits, -2, q.dtype), block_tables)
    v = gather_pages(dequantize_codes(v_codes, v_scale, v_zero, bits, -1, q.dtype), block_tables)
    return decode_attention_reference(q, k, v, lengths, scale=scale)

