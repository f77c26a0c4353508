"""The paged KV cache: one pool of fixed-size blocks per layer, read through per-sequence block tables.

Sequences of different lengths share one pool without each reserving `max_context`: sequence b's
token t lives in block `block_tables[b, t // block_size]` at offset `t % block_size` (vLLM's
PagedAttention layout, the one `kernels.paged_attention` reads). Pools are
[num_kv_heads, num_blocks, block_size, head_dim] for K and V, float or int8 with one scale per
token (then k_scales/v_scales [num_kv_heads, num_blocks, block_size]).

Which blocks a sequence owns is decided on the host (`cache.allocator`); the device side here is
pure functions of arrays:

- `PagedKVCache`: the model's cache (the `KVCache` protocol of `cache.base`). Its block tables
  are the host's, handed in per call (`with_tables`); entries past a sequence's blocks hold
  `num_blocks`, and writes there are dropped, so a free slot or padding never touches a block
  another sequence owns. Decode goes through `read` / `write` (attention first, then the write,
  tied to attention's output so XLA:CPU updates the pool in place); `write_prompt` stores a prompt
  or, with `start`, a chunk after tokens already cached (a session's next turn), and
  `context(layer, start)` hands attention those earlier tokens.
- `copy_blocks`: the device half of copy-on-write (the allocator says which blocks to copy).
- `PagedKvCache`: RuvLLM's stateful facade over both halves, for use outside the engine.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
from typing import Optional, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from ruvllm_jax.cache.allocator import BlockCopy, PagedAllocator
from ruvllm_jax.cache.base import KVPart, PagedKVPart
from ruvllm_jax.errors import KvCacheError

_DTYPES = {"float32": jnp.float32, "float16": jnp.float16, "bfloat16": jnp.bfloat16, "int8": jnp.int8}
KV_DTYPES = tuple(_DTYPES)  # what a pool may hold


@dataclasses.dataclass(frozen=True)
class PagedSpec:
    """Static layout of a paged pool: `num_blocks` blocks of `block_size` tokens per layer."""

    num_blocks: int
    block_size: int = 16
    num_kv_heads: int = 1
    head_dim: int = 64
    dtype: str = "float32"  # "float32" | "float16" | "bfloat16" | "int8" (per-token scales)

    def __post_init__(self):
        for name in ("num_blocks", "block_size", "num_kv_heads", "head_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
                raise KvCacheError(f"PagedSpec.{name} must be an int > 0, got {value!r}")
            object.__setattr__(self, name, int(value))
        if self.dtype not in _DTYPES:
            raise KvCacheError(f"PagedSpec.dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")

    @property
    def quantized(self) -> bool:
        return self.dtype == "int8"

    @property
    def capacity(self) -> int:
        """Tokens the whole pool holds."""
        return self.num_blocks * self.block_size

    def bytes_per_token(self, num_layers: int = 1) -> int:
        """Pool bytes per cached token (K and V, scales included) over `num_layers` layers."""
        per = jnp.dtype(_DTYPES[self.dtype]).itemsize * self.head_dim + (4 if self.quantized else 0)
        return 2 * self.num_kv_heads * per * num_layers


def quantize_tokens(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Symmetric int8 per token: x [..., D] -> (codes [..., D] int8, scale [...] f32), x ≈ codes * scale."""
    amax = jnp.max(jnp.abs(x.astype(jnp.float32)), axis=-1)
    scale = jnp.where(amax > 0, amax / 127.0, 1.0)
    codes = jnp.clip(jnp.round(x.astype(jnp.float32) / scale[..., None]), -127, 127).astype(jnp.int8)
    return codes, scale


@struct.dataclass
class PagedKVCache:
    """Every layer's pool and the block tables [B, W] of the B sequences being run."""

    k: tuple[jax.Array, ...]  # per layer [KVH, NB, BS, D]
    v: tuple[jax.Array, ...]
    k_scales: Optional[tuple[jax.Array, ...]]  # per layer [KVH, NB, BS] (int8 only)
    v_scales: Optional[tuple[jax.Array, ...]]
    block_tables: jax.Array  # [B, W] int32; `num_blocks` = no block (writes dropped)
    spec: PagedSpec = struct.field(pytree_node=False)

    @classmethod
    def init(cls, spec: PagedSpec, *, num_layers: int, batch: int = 1, width: int = 1) -> "PagedKVCache":
        if min(num_layers, batch, width) <= 0:
            raise KvCacheError(f"cache dimensions must be > 0, got layers={num_layers} batch={batch} width={width}")
        shape = (spec.num_kv_heads, spec.num_blocks, spec.block_size, spec.head_dim)
        dtype = _DTYPES[spec.dtype]
        pools = lambda s, dt: tuple(jnp.zeros(s, dt) for _ in range(num_layers))  # noqa: E731
        scales = (lambda: pools(shape[:3], jnp.float32)) if spec.quantized else (lambda: None)
        return cls(k=pools(shape, dtype), v=pools(shape, dtype), k_scales=scales(), v_scales=scales(),
                   block_tables=jnp.full((batch, width), spec.num_blocks, jnp.int32), spec=spec)

    @property
    def max_len(self) -> int:
        """Tokens one sequence can reach through tables of this width."""
        return self.block_tables.shape[1] * self.spec.block_size

    def nbytes(self) -> int:
        """Bytes of the pools (and scales); the tables are the host's."""
        return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves((self.k, self.v, self.k_scales,
                                                                                   self.v_scales)))

    def with_tables(self, block_tables: jax.Array) -> "PagedKVCache":
        """The same pools read through other tables [B', W'] (int; `num_blocks` = unused entry)."""
        return self.replace(block_tables=jnp.asarray(block_tables, jnp.int32))

    # -- locating tokens --------------------------------------------------------------------------
    def _where(self, positions: jax.Array, valid: jax.Array):
        """Block ids and offsets of tokens at `positions` [B, ...]; invalid or unmapped -> `num_blocks`."""
        bs, nb = self.spec.block_size, self.spec.num_blocks
        width = self.block_tables.shape[1]
        index = positions // bs
        inside = valid & (positions >= 0) & (index < width)
        rows = jnp.arange(positions.shape[0]).reshape((-1,) + (1,) * (positions.ndim - 1))
        blocks = self.block_tables[rows, jnp.clip(index, 0, width - 1)]
        return jnp.where(inside, blocks, nb), positions % bs

    def _store(self, layer: int, blocks: jax.Array, offsets: jax.Array, k: jax.Array, v: jax.Array):
        """Scatter k, v [N, KVH, D] to (blocks, offsets) [N] of layer `layer`, dropping ids >= num_blocks."""
        kh, vh = k.transpose(1, 0, 2), v.transpose(1, 0, 2)  # [KVH, N, D]
        ks, vs = list(self.k), list(self.v)
        if self.spec.quantized:
            (kh, k_scale), (vh, v_scale) = quantize_tokens(kh), quantize_tokens(vh)
            kss, vss = list(self.k_scales), list(self.v_scales)
            kss[layer] = kss[layer].at[:, blocks, offsets].set(k_scale, mode="drop")
            vss[layer] = vss[layer].at[:, blocks, offsets].set(v_scale, mode="drop")
            scales = dict(k_scales=tuple(kss), v_scales=tuple(vss))
        else:
            scales = {}
        ks[layer] = ks[layer].at[:, blocks, offsets].set(kh.astype(ks[layer].dtype), mode="drop")
        vs[layer] = vs[layer].at[:, blocks, offsets].set(vh.astype(vs[layer].dtype), mode="drop")
        return self.replace(k=tuple(ks), v=tuple(vs), **scales)

    def _part(self, layer: int, lengths: jax.Array) -> PagedKVPart:
        scales = (None, None) if not self.spec.quantized else (self.k_scales[layer], self.v_scales[layer])
        return PagedKVPart(self.k[layer], self.v[layer], self.block_tables, lengths.astype(jnp.int32),
                           k_scales=scales[0], v_scales=scales[1], query_offset=0)

    # -- the KVCache protocol ---------------------------------------------------------------------
    def read(self, layer: int, k: jax.Array, v: jax.Array, positions: jax.Array):
        """Parts for one new token per sequence (k, v [B, KVH, D] at `positions` [B]): the pool's
        tokens before it, and the token itself (merged by log-sum-exp in attention)."""
        b = k.shape[0]
        chex.assert_shape(positions, (b,))
        new = KVPart(k[:, :, None, :], v[:, :, None, :], jnp.ones((b,), jnp.int32), query_offset=-1)
        return self._part(layer, positions), new

    def write(self, layer: int, k: jax.Array, v: jax.Array, positions: jax.Array, after=None) -> "PagedKVCache":
        """Store one token per sequence at `positions` [B]. `after` (attention's output over `read`'s
        parts) is tied into the values so XLA orders the write after the read and updates in place."""
        if after is not None:
            tie = 0.0 * after.reshape(-1)[0].astype(jnp.float32)  # a data dependency XLA cannot fold away
            k, v = k + tie.astype(k.dtype), v + tie.astype(v.dtype)
        blocks, offsets = self._where(positions, jnp.ones(positions.shape, bool))
        return self._store(layer, blocks, offsets, k, v)

    def append(self, layer: int, k: jax.Array, v: jax.Array, positions: jax.Array):
        """`read` then `write` in one call (outside a decode loop; the model uses the two halves)."""
        parts = self.read(layer, k, v, positions)
        return self.write(layer, k, v, positions), parts

    def write_prompt(self, layer: int, k: jax.Array, v: jax.Array, lengths=None, start=None) -> "PagedKVCache":
        """Store k, v [B, S, KVH, D] at positions start + 0..S-1 (start [B], default 0); only the
        first `lengths` [B] are real, the padding after them is dropped."""
        b, s = k.shape[:2]
        offset = jnp.zeros((b,), jnp.int32) if start is None else jnp.asarray(start, jnp.int32)
        lengths = jnp.full((b,), s, jnp.int32) if lengths is None else jnp.asarray(lengths, jnp.int32)
        i = jnp.arange(s)[None, :]
        blocks, offsets = self._where(offset[:, None] + i, i < lengths[:, None])
        flat = lambda x: x.reshape(b * s, *x.shape[2:])  # noqa: E731
        return self._store(layer, blocks.reshape(-1), offsets.reshape(-1), flat(k), flat(v))

    def context(self, layer: int, start: jax.Array) -> PagedKVPart:
        """The `start` [B] tokens each sequence already holds, as a part for a chunk's attention."""
        return self._part(layer, jnp.asarray(start, jnp.int32))

    def copy_blocks(self, src: jax.Array, dst: jax.Array) -> "PagedKVCache":
        """Every layer with blocks dst [N] overwritten by blocks src [N] (copy-on-write)."""
        cp = lambda pools: None if pools is None else tuple(p.at[:, dst].set(p[:, src]) for p in pools)  # noqa: E731
        return self.replace(k=cp(self.k), v=cp(self.v), k_scales=cp(self.k_scales), v_scales=cp(self.v_scales))

    def gather(self, layer: int, b: int, length: int) -> tuple[jax.Array, jax.Array]:
        """Sequence b's first `length` keys and values [length, KVH, D] in float32 (host-side reads)."""
        table = self.block_tables[b]
        def read(pools, scales):
            x = pools[layer][:, table].astype(jnp.float32)  # [KVH, W, BS, D]
            if scales is not None:
                x = x * scales[layer][:, table][..., None]
            return x.reshape(x.shape[0], -1, x.shape[-1])[:, :length].transpose(1, 0, 2)
        return read(self.k, self.k_scales), read(self.v, self.v_scales)


@functools.partial(jax.jit, donate_argnames=("cache",))
def _copy_blocks(cache: PagedKVCache, src, dst) -> PagedKVCache:
    return cache.copy_blocks(src, dst)


def apply_copies(cache: PagedKVCache, copies: Sequence[BlockCopy]) -> PagedKVCache:
    """Perform the allocator's copy-on-write copies on device (no-op when there are none)."""
    if not copies:
        return cache
    src = jnp.asarray([c.src for c in copies], jnp.int32)
    dst = jnp.asarray([c.dst for c in copies], jnp.int32)
    return _copy_blocks(cache, src, dst)


def table_array(tables: Sequence[Sequence[int]], width: int, num_blocks: int) -> np.ndarray:
    """Host block tables -> [len(tables), width] int32, unused entries `num_blocks`."""
    out = np.full((len(tables), width), num_blocks, np.int32)
    for i, t in enumerate(tables):
        if len(t) > width:
            raise KvCacheError(f"a block table of {len(t)} blocks does not fit width {width}")
        out[i, : len(t)] = t
    return out


@functools.partial(jax.jit, static_argnames=("layer",), donate_argnames=("cache",))
def _write_tokens(cache: PagedKVCache, k, v, start, count, *, layer: int) -> PagedKVCache:
    return cache.write_prompt(layer, k[None], v[None], count[None], start[None])


class PagedKvCache:
    """RuvLLM's `PagedKvCache`: a block pool per layer, a host allocator and per-sequence tables.

    A facade over `PagedKVCache` (device pools) and `PagedAllocator` (host): `append` reserves
    blocks and writes tokens, `fork` shares a sequence's blocks (copy-on-write on the next write
    into a shared block), `attend` runs `paged_attention` through the sequence's table.
    """

    def __init__(self, spec: PagedSpec, num_layers: int = 1):
        if not isinstance(spec, PagedSpec):
            raise KvCacheError(f"spec must be a PagedSpec, got {type(spec).__name__} {spec!r}")
        if isinstance(num_layers, bool) or not isinstance(num_layers, numbers.Integral) or num_layers <= 0:
            raise KvCacheError(f"num_layers must be an int > 0, got {num_layers!r}")
        self.spec, self.num_layers = spec, int(num_layers)
        self.allocator = PagedAllocator(spec.num_blocks, spec.block_size)
        self.cache = PagedKVCache.init(spec, num_layers=self.num_layers, batch=1, width=1)

    def add_sequence(self, seq_id) -> None:
        self.allocator.add(seq_id, 0)

    def fork(self, parent_id, child_id) -> None:
        """`child_id` starts as `parent_id`'s tokens, sharing its blocks."""
        self.allocator.fork(parent_id, child_id)

    def free(self, seq_id) -> None:
        self.allocator.free(seq_id)

    def length(self, seq_id) -> int:
        return self.allocator.length(seq_id)

    def append(self, seq_id, k, v) -> None:
        """Append tokens k, v [num_layers, T, KVH, D] to the sequence (`OutOfMemoryError` when the
        pool cannot take them; nothing changes then)."""
        k, v = jnp.asarray(k), jnp.asarray(v)
        expected = (self.num_layers, k.shape[1] if k.ndim == 4 else -1, self.spec.num_kv_heads, self.spec.head_dim)
        if k.ndim != 4 or k.shape != expected or v.shape != k.shape:
            raise KvCacheError(f"k, v must be [num_layers, T, KVH, D] = {expected}, got {k.shape} and {v.shape}")
        start = self.allocator.length(seq_id)
        total = start + k.shape[1]
        copies = self.allocator.reserve(seq_id, total)
        self.cache = apply_copies(self.cache, copies)
        self.allocator.set_length(seq_id, total)
        cache = self._view(seq_id)
        for layer in range(self.num_layers):
            cache = _write_tokens(cache, k[layer], v[layer], jnp.int32(start), jnp.int32(k.shape[1]), layer=layer)
        self.cache = cache

    def get_kv(self, seq_id, layer: int = 0) -> tuple[jax.Array, jax.Array]:
        """The sequence's keys and values [T, KVH, D] in `layer`, dequantized."""
        return self._view(seq_id).gather(layer, 0, self.allocator.length(seq_id))

    def attend(self, seq_id, q, layer: int = 0, scale: Optional[float] = None, kernel=None) -> jax.Array:
        """q [H, D] over every token of the sequence in `layer` -> [H, D] (`kernels.paged_attention`)."""
        from ruvllm_jax.kernels import paged_attention

        q = jnp.asarray(q)
        part = self._view(seq_id)._part(layer, jnp.asarray([self.allocator.length(seq_id)]))
        return paged_attention(q[None], part.k_pages, part.v_pages, part.block_tables, part.lengths,
                               k_scales=part.k_scales, v_scales=part.v_scales, scale=scale, kernel=kernel)[0]

    def _view(self, seq_id) -> PagedKVCache:
        """The pools read through this one sequence's table."""
        table = self.allocator.table(seq_id)
        return self.cache.with_tables(table_array([table], max(1, len(table)), self.spec.num_blocks))

    def stats(self) -> dict:
        used = self.spec.num_blocks - self.allocator.num_free
        return {"num_blocks": self.spec.num_blocks, "used_blocks": used, "free_blocks": self.allocator.num_free,
                "block_size": self.spec.block_size, "sequences": len(self.allocator.sequences()),
                "pool_bytes": self.cache.nbytes()}
