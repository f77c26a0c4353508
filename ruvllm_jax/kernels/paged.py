"""Paged attention: decode queries against a block pool read through per-sequence block tables.

Arrays only, no allocator (that is `ruvllm_jax.cache`'s business):
q [B, H, D]; pools k_pages/v_pages [KVH, num_blocks, block_size, D]; block_tables [B, max_blocks]
(int, entry i of row b is the pool block holding tokens [i*block_size, (i+1)*block_size) of sequence
b); lengths [B]. Optional int8 KV: the pools hold int8 codes and k_scales/v_scales
[KVH, num_blocks, block_size] one float scale per token (value = code * scale).

`check_block_tables` validates tables and lengths on the host when they are concrete and raises
`PagedAttentionError` naming the bad entry; traced tables are clamped into the pool instead.

* `_paged_kernel_triton`: grid (B, KVH, K splits), a loop over groups of pages gathered from the pool.
* `_paged_kernel_mosaic`: grid (B, KVH, max_blocks) with the tables and lengths scalar-prefetched
  into SMEM; the K/V index maps read the table, so each step DMAs exactly one page (pages past the
  length map to the last valid one, which Pallas does not fetch again).
* `paged_attention_jnp` gathers the pages into a contiguous cache and runs the jnp decode;
  `paged_attention_reference` does the same with the reference decode: the spec.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from ruvllm_jax.errors import PagedAttentionError
from ruvllm_jax.kernels._online_softmax import NEG_INF, finish, merge_attention, online_softmax_step, qk
from ruvllm_jax.kernels.config import KernelOptions, PagedBlockSizes, next_pow2, pad_axis
from ruvllm_jax.kernels.decode import decode_attention_jnp, decode_attention_reference


def check_block_tables(block_tables, lengths, num_blocks: int, block_size: int) -> None:
    """Host-side validation; a no-op for traced arrays (inside jit the kernels clamp instead)."""
    if isinstance(block_tables, jax.core.Tracer) or isinstance(lengths, jax.core.Tracer):
        return
    tables = np.asarray(block_tables)
    lens = np.asarray(lengths)
    capacity = tables.shape[1] * block_size
    for b, n in enumerate(lens.tolist()):
        if not 0 <= n <= capacity:
            raise PagedAttentionError(
                f"lengths[{b}] = {n} is outside [0, {capacity}] "
                f"(max_blocks {tables.shape[1]} x block_size {block_size})")
        used = tables[b, : -(-n // block_size)]
        bad = np.nonzero((used < 0) | (used >= num_blocks))[0]
        if bad.size:
            i = int(bad[0])
            raise PagedAttentionError(
                f"block_tables[{b}, {i}] = {int(used[i])} is outside the pool of {num_blocks} blocks")


def check_table_shapes(block_tables, lengths, batch: int) -> None:
    """block_tables [batch, max_blocks] and lengths [batch], both integer arrays."""
    if block_tables.ndim != 2 or block_tables.shape[0] != batch or lengths.shape != (batch,):
        raise PagedAttentionError(
            f"expected block_tables [B={batch}, max_blocks] and lengths [{batch}], "
            f"got {block_tables.shape} and {lengths.shape}")
    if not jnp.issubdtype(block_tables.dtype, jnp.integer) or not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise PagedAttentionError(
            f"block_tables and lengths must be integer arrays, got {block_tables.dtype}, {lengths.dtype}")


def split_tables(tables, pages_per_step: int, max_splits: int):
    """Tables [B, MB] cut into K splits of whole steps of `pages_per_step` pages (padded with page 0,
    past every length) -> (tables [B, splits, pages_per_split], splits), for the split-K kernels."""
    b, mb = tables.shape
    n_steps = -(-mb // pages_per_step)
    splits = min(max_splits, n_steps)
    pages_per_split = -(-n_steps // splits) * pages_per_step
    return pad_axis(tables, 1, splits * pages_per_split).reshape(b, splits, pages_per_split), splits


def check_paged_shapes(q, k_pages, v_pages, block_tables, lengths, k_scales, v_scales) -> None:
    if q.ndim != 3 or k_pages.ndim != 4 or k_pages.shape != v_pages.shape:
        raise PagedAttentionError(
            f"expected q [B, H, D] and pools [KVH, num_blocks, block_size, D], got q {q.shape}, "
            f"k_pages {k_pages.shape}, v_pages {v_pages.shape}")
    b, h, d = q.shape
    if k_pages.shape[3] != d or h % k_pages.shape[0]:
        raise PagedAttentionError(f"q {q.shape} does not fit pools {k_pages.shape}: need same D and H % KVH == 0")
    check_table_shapes(block_tables, lengths, b)
    if (k_scales is None) != (v_scales is None):
        raise PagedAttentionError("int8 KV needs both k_scales and v_scales")
    if k_scales is not None and (k_scales.shape != k_pages.shape[:3] or v_scales.shape != k_pages.shape[:3]):
        raise PagedAttentionError(
            f"scales must be [KVH, num_blocks, block_size] = {k_pages.shape[:3]}, "
            f"got {k_scales.shape}, {v_scales.shape}")


def dequantize_pages(pages, scales, dtype):
    return pages if scales is None else (pages.astype(dtype) * scales[..., None].astype(dtype))


def gather_pages(pages, block_tables):
    """[KVH, NB, BS, D] read through [B, MB] -> a contiguous cache [B, KVH, MB * BS, D]."""
    kvh, _, bs, d = pages.shape
    b, mb = block_tables.shape
    return pages[:, block_tables].transpose(1, 0, 2, 3, 4).reshape(b, kvh, mb * bs, d)


# --------------------------------------------------------------------------------------------------
# Pallas GPU (Triton) kernel.


def _paged_kernel_triton(len_ref, tab_ref, q_ref, k_ref, v_ref, *refs, scale, window, ppcb, quantized):
    # len_ref [1]; tab_ref [pages_per_split] (this split's block ids); q_ref, o_ref [Gp, D];
    # k_ref, v_ref [num_blocks, block_size, D] (one KV head's whole pool); ks_ref, vs_ref
    # [num_blocks, block_size] (int8 only); m_ref, l_ref [Gp].
    if quantized:
        ks_ref, vs_ref, o_ref, m_ref, l_ref = refs
    else:
        o_ref, m_ref, l_ref = refs
    rows, d = q_ref.shape
    bs = k_ref.shape[1]
    pages_per_split = tab_ref.shape[0]
    bk = ppcb * bs
    start = pl.program_id(2) * pages_per_split * bs
    length = len_ref[0]
    lo_key = jnp.maximum(length - window, 0) if window is not None else 0
    q = q_ref[...]
    k_iota = lax.broadcasted_iota(jnp.int32, (rows, bk), 1)

    def body(j, carry):
        pages = tab_ref[pl.ds(j * ppcb, ppcb)]
        k = k_ref[pages].reshape(bk, d)
        v = v_ref[pages].reshape(bk, d)
        if quantized:
            s = qk(q, k.astype(q.dtype), 1.0) * (ks_ref[pages].reshape(1, bk) * scale)
            v = (v.astype(jnp.float32) * vs_ref[pages].reshape(bk, 1)).astype(q.dtype)
        else:
            s = qk(q, k, scale)
        pos = start + j * bk + k_iota
        s = jnp.where((pos < length) & (pos >= lo_key), s, NEG_INF)
        return online_softmax_step(s, *carry, v)

    n_steps = pages_per_split // ppcb
    hi = jnp.clip(pl.cdiv(length - start, bk), 0, n_steps)
    lo = jnp.clip((lo_key - start) // bk, 0, n_steps)
    init = (jnp.full((rows, 1), NEG_INF, jnp.float32), jnp.zeros((rows, 1), jnp.float32),
            jnp.zeros((rows, d), jnp.float32))
    m, l, acc = lax.fori_loop(lo, hi, body, init)
    out, _ = finish(m, l, acc)
    o_ref[...] = out.astype(o_ref.dtype)
    m_ref[...] = m[:, 0]
    l_ref[...] = l[:, 0]


def _paged_call_triton(qr, k_pages, v_pages, tables, lengths, k_scales, v_scales, *, scale, window, interpret,
                       blocks: PagedBlockSizes):
    from jax.experimental.pallas import triton as plgpu

    b, kvh, gp, d = qr.shape
    _, nb, bs, _ = k_pages.shape
    mb = tables.shape[1]
    ppcb = min(blocks.pages_per_compute_block, next_pow2(mb))
    while ppcb * bs < 16:
        ppcb *= 2
    tables, splits = split_tables(tables, ppcb, blocks.max_splits)
    pages_per_split = tables.shape[2]
    quantized = k_scales is not None
    pool_spec = pl.BlockSpec((None, nb, bs, d), lambda i, h, j: (h, 0, 0, 0))
    scale_specs = [pl.BlockSpec((None, nb, bs), lambda i, h, j: (h, 0, 0))] * 2 if quantized else []
    kernel = functools.partial(_paged_kernel_triton, scale=scale, window=window, ppcb=ppcb, quantized=quantized)
    out, m, l = pl.pallas_call(
        kernel,
        grid=(b, kvh, splits),
        in_specs=[
            pl.BlockSpec((1,), lambda i, h, j: (i,)),
            pl.BlockSpec((None, None, pages_per_split), lambda i, h, j: (i, j, 0)),
            pl.BlockSpec((None, None, gp, d), lambda i, h, j: (i, h, 0, 0)),
            pool_spec, pool_spec, *scale_specs,
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, gp, d), lambda i, h, j: (j, i, h, 0, 0)),
            pl.BlockSpec((None, None, None, gp), lambda i, h, j: (j, i, h, 0)),
            pl.BlockSpec((None, None, None, gp), lambda i, h, j: (j, i, h, 0)),
        ],
        out_shape=[jax.ShapeDtypeStruct((splits, b, kvh, gp, d), jnp.float32),
                   jax.ShapeDtypeStruct((splits, b, kvh, gp), jnp.float32),
                   jax.ShapeDtypeStruct((splits, b, kvh, gp), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret,
        name="ruvllm_paged_triton",
    )(lengths, tables, qr, k_pages, v_pages, *([k_scales, v_scales] if quantized else []))
    return merge_attention(list(out), list(zip(m, l, strict=True)))


# --------------------------------------------------------------------------------------------------
# Pallas TPU (Mosaic) kernel.


def _paged_kernel_mosaic(tab_ref, len_ref, q_ref, k_ref, v_ref, *refs, scale, window, max_blocks, quantized):
    # tab_ref [B * max_blocks], len_ref [B] (scalar-prefetched, SMEM); q_ref, o_ref [Gp, D];
    # k_ref, v_ref [block_size, D] (the one page this step reads); ks_ref [1, block_size],
    # vs_ref [block_size, 1] (int8 only); m_ref, l_ref, m_scr, l_scr [Gp, 1]; acc_scr [Gp, D].
    if quantized:
        ks_ref, vs_ref, o_ref, m_ref, l_ref, m_scr, l_scr, acc_scr = refs
    else:
        o_ref, m_ref, l_ref, m_scr, l_scr, acc_scr = refs
    b, i = pl.program_id(0), pl.program_id(2)
    rows, _ = q_ref.shape
    bs = k_ref.shape[0]
    length = len_ref[b]
    lo_key = jnp.maximum(length - window, 0) if window is not None else 0

    @pl.when(i == 0)
    def _init():
        m_scr[...] = jnp.full(m_scr.shape, NEG_INF, jnp.float32)
        l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
        acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

    @pl.when((i * bs < length) & ((i + 1) * bs > lo_key))
    def _compute():
        q = q_ref[...]
        k, v = k_ref[...], v_ref[...]
        if quantized:
            s = qk(q, k.astype(q.dtype), 1.0) * (ks_ref[...] * scale)  # [1, bs] per key
            v = (v.astype(jnp.float32) * vs_ref[...]).astype(q.dtype)  # [bs, 1] per value row
        else:
            s = qk(q, k, scale)
        pos = i * bs + lax.broadcasted_iota(jnp.int32, (rows, bs), 1)
        s = jnp.where((pos < length) & (pos >= lo_key), s, NEG_INF)
        m, l, acc = online_softmax_step(s, m_scr[...], l_scr[...], acc_scr[...], v)
        m_scr[...], l_scr[...], acc_scr[...] = m, l, acc

    @pl.when(i == max_blocks - 1)
    def _store():
        out, _ = finish(m_scr[...], l_scr[...], acc_scr[...])
        o_ref[...] = out.astype(o_ref.dtype)
        m_ref[...] = m_scr[...]
        l_ref[...] = l_scr[...]


def _paged_call_mosaic(qr, k_pages, v_pages, tables, lengths, k_scales, v_scales, *, scale, window, interpret):
    from jax.experimental.pallas import tpu as pltpu

    b, kvh, gp, d = qr.shape
    _, nb, bs, _ = k_pages.shape
    mb = tables.shape[1]
    quantized = k_scales is not None

    def page(i, h, p, tab, lens):
        # Pages outside [first, last] valid map to the nearest valid one: no fresh DMA for them.
        last = jnp.maximum(pl.cdiv(lens[i], bs) - 1, 0)
        first = jnp.minimum(lax.div(jnp.maximum(lens[i] - window, 0), bs), last) if window is not None else 0
        return tab[i * mb + jnp.clip(p, first, last)]

    pool_spec = pl.BlockSpec((None, None, bs, d), lambda i, h, p, tab, lens: (h, page(i, h, p, tab, lens), 0, 0))
    # Scales as [.., 1, bs] (keys, a row) and [.., bs, 1] (values, a column): free reshapes that make
    # each block's last two dims whole array dims, as Mosaic requires.
    k_scale_spec = pl.BlockSpec((None, None, 1, bs), lambda i, h, p, tab, lens: (h, page(i, h, p, tab, lens), 0, 0))
    v_scale_spec = pl.BlockSpec((None, None, bs, 1), lambda i, h, p, tab, lens: (h, page(i, h, p, tab, lens), 0, 0))
    head_spec = pl.BlockSpec((None, None, gp, d), lambda i, h, p, tab, lens: (i, h, 0, 0))
    stat_spec = pl.BlockSpec((None, None, gp, 1), lambda i, h, p, tab, lens: (i, h, 0, 0))
    kernel = functools.partial(_paged_kernel_mosaic, scale=scale, window=window, max_blocks=mb, quantized=quantized)
    out, m, l = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(b, kvh, mb),
            in_specs=[head_spec, pool_spec, pool_spec, *([k_scale_spec, v_scale_spec] if quantized else [])],
            out_specs=[head_spec, stat_spec, stat_spec],
            scratch_shapes=[pltpu.VMEM((gp, 1), jnp.float32), pltpu.VMEM((gp, 1), jnp.float32),
                            pltpu.VMEM((gp, d), jnp.float32)],
        ),
        out_shape=[jax.ShapeDtypeStruct((b, kvh, gp, d), jnp.float32),
                   jax.ShapeDtypeStruct((b, kvh, gp, 1), jnp.float32),
                   jax.ShapeDtypeStruct((b, kvh, gp, 1), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=pltpu.InterpretParams() if interpret else False,
        name="ruvllm_paged_mosaic",
    )(tables.reshape(-1), lengths, qr, k_pages, v_pages,
      *([k_scales.reshape(kvh, nb, 1, bs), v_scales.reshape(kvh, nb, bs, 1)] if quantized else []))
    return out, (m[..., 0], l[..., 0])


@functools.partial(jax.jit, static_argnames=("scale", "window", "kernel"))
def paged_attention_pallas(q, k_pages, v_pages, block_tables, lengths, k_scales=None, v_scales=None, *,
                           scale: float, window: Optional[int], kernel: KernelOptions):
    """Pallas paged attention -> (out [B, H, D], (max [B, H], sum [B, H])) for `kernel.pallas_target()`."""
    backend, interpret = kernel.pallas_target(), kernel.interpret
    b, h, d = q.shape
    kvh, nb = k_pages.shape[:2]
    g = h // kvh
    gp = max(16 if backend == "triton" else 8, next_pow2(g))
    qr = pad_axis(q.reshape(b, kvh, g, d), 2, gp)
    tables = jnp.clip(block_tables.astype(jnp.int32), 0, nb - 1)
    lengths = lengths.astype(jnp.int32)
    if backend == "triton":
        out, (m, l) = _paged_call_triton(qr, k_pages, v_pages, tables, lengths, k_scales, v_scales, scale=scale,
                                         window=window, interpret=interpret, blocks=kernel.block_sizes.paged)
    else:
        out, (m, l) = _paged_call_mosaic(qr, k_pages, v_pages, tables, lengths, k_scales, v_scales, scale=scale,
                                         window=window, interpret=interpret)
    return (out[:, :, :g].reshape(b, h, d).astype(q.dtype),
            (m[:, :, :g].reshape(b, h), l[:, :, :g].reshape(b, h)))


# --------------------------------------------------------------------------------------------------
# jnp path (CPU) and the reference.


@functools.partial(jax.jit, static_argnames=("scale", "sliding_window", "return_residuals"))
def paged_attention_jnp(q, k_pages, v_pages, block_tables, lengths, k_scales, v_scales, scale: float,
                        sliding_window: Optional[int], return_residuals: bool):
    """Gather the pages into a contiguous cache, dequantize, and run the jnp decode."""
    nb = k_pages.shape[1]
    tables = jnp.clip(block_tables, 0, nb - 1)
    ct = jnp.promote_types(q.dtype, jnp.float32) if k_scales is not None else k_pages.dtype
    k = gather_pages(dequantize_pages(k_pages, k_scales, ct), tables)
    v = gather_pages(dequantize_pages(v_pages, v_scales, ct), tables)
    return decode_attention_jnp(q, k, v, lengths, scale, sliding_window, return_residuals)


@functools.partial(jax.jit, static_argnames=("scale", "sliding_window"))
def paged_attention_reference(q, k_pages, v_pages, block_tables, lengths, k_scales=None, v_scales=None, *,
                              scale: Optional[float] = None, sliding_window: Optional[int] = None):
    """The spec: dequantize (code * scale), read the pages in table order, reference decode."""
    k = gather_pages(dequantize_pages(k_pages, k_scales, q.dtype), block_tables)
    v = gather_pages(dequantize_pages(v_pages, v_scales, q.dtype), block_tables)
    return decode_attention_reference(q, k, v, lengths, scale=scale, sliding_window=sliding_window)


@functools.partial(jax.jit, static_argnames=("scale", "sliding_window"))
def paged_context_attention(q, k_pages, v_pages, block_tables, lengths, k_scales=None, v_scales=None, *,
                            scale: float, sliding_window: Optional[int] = None):
    """A chunk of S queries per sequence against the `lengths` [B] tokens already in the pool.

    q [B, S, H, D] are the tokens at positions lengths + 0..S-1 (a session's next turn); every pool
    token before them is visible, within the layer's `sliding_window` (HF's convention: the query
    at p sees keys t > p - window). Returns (out [B, S, H, D], (max, sum) [B, S, H]) for an exact
    log-sum-exp merge with the chunk's causal attention over itself. jnp on every backend: a chunk
    is prefill-sized work, so the gather costs little next to its matmuls.
    """
    b, s, h, d = q.shape
    nb = k_pages.shape[1]
    tables = jnp.clip(block_tables, 0, nb - 1)
    ct = jnp.promote_types(q.dtype, jnp.float32)
    k = gather_pages(dequantize_pages(k_pages, k_scales, ct), tables).astype(ct)  # [B, KVH, T, D]
    v = gather_pages(dequantize_pages(v_pages, v_scales, ct), tables).astype(ct)
    kvh, t = k.shape[1], k.shape[2]
    g = h // kvh
    qg = q.reshape(b, s, kvh, g, d).transpose(0, 2, 3, 1, 4).reshape(b, kvh, g * s, d).astype(ct)
    scores = (jnp.einsum("bkqd,bktd->bkqt", qg, k) * scale).reshape(b, kvh, g, s, t)
    key = jnp.arange(t)[None, None, :]
    lengths = lengths.astype(jnp.int32)[:, None, None]
    mask = key < lengths  # [B, 1, T]
    if sliding_window is not None:
        mask = mask & (key > lengths + jnp.arange(s)[None, :, None] - sliding_window)  # [B, S, T]
    scores = jnp.where(mask[:, None, None], scores, -jnp.inf)
    m = jnp.max(scores, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(scores - m)
    l = jnp.sum(p, axis=-1, keepdims=True)
    acc = jnp.einsum("bkqt,bktd->bkqd", p.reshape(b, kvh, g * s, t), v).reshape(b, kvh, g, s, d)
    out = (acc / jnp.where(l == 0, 1.0, l)).transpose(0, 3, 1, 2, 4).reshape(b, s, h, d).astype(q.dtype)
    to_bsh = lambda x: x[..., 0].transpose(0, 3, 1, 2).reshape(b, s, h)  # noqa: E731
    l, m = to_bsh(l), to_bsh(m)
    return out, (jnp.where(l == 0, -jnp.inf, m), l)
