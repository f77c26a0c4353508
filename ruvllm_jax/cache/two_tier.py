"""The two-tier KV cache: recent tokens in a high-precision tail, older ones quantized once (KIVI).

Memory per token is what bounds long contexts. Following KIVI, the newest `tail_length` tokens stay
in `tail_precision` (attention is most sensitive to them), and when the tail is full its oldest
`migration_batch` tokens leave it as one *block*, quantized once into the store: keys per channel
over the block, values per token (`cache.kv_quant`). A stored block is never re-quantized. Past
`max_tokens` the oldest store blocks are evicted; `num_sink_tokens` first tokens stay forever
(StreamingLLM's attention sinks), in tail precision.

Layout (fixed shapes, so every step jits once). Per layer, for B sequences:

- sinks [B, KVH, num_sink_tokens, D] in tail precision (a contiguous `KVPart`);
- the tail: a ring of `tail_length / migration_batch` blocks, a pool [KVH, B * tail_blocks, BS, D]
  read through a block table (a `PagedKVPart`): migrating a block frees its slot, nothing shifts;
- the store: one or more `StoreSegment`s (one per precision `update_policy` chose; the newest takes
  migrations), each a ring of `store_blocks + 1` block slots, read as a `QuantizedKVPart` (or a
  float `PagedKVPart` for an FP32/FP16/BF16 store). The spare slot lets every step, without a
  branch, stage the tail's oldest block (complete, its values fixed) quantized into the next free
  slot; the slot joins the store when the block migrates, and a held block is never written again.

Which block lives where follows from one number per sequence, the tokens appended so far (`_Counts`):
the cache never keeps a second copy of that bookkeeping per layer.

Caches store, attention attends: `parts` hands sinks, store segments and tail to the model's one
attention path (`models.attention.attend_parts`), which runs each part's kernel and merges them by
log-sum-exp. `TwoTierKVCache` is the model's cache (all layers, `write_prompt` / `append` of the
`KVCache` protocol); `TwoTierState` and the functions below are the one-layer, one-sequence cache
of RuvLLM's API, and `TwoTierKvCache` its stateful facade.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from ruvllm_jax.cache import kv_quant
from ruvllm_jax.cache.base import KVPart, PagedKVPart, Part, QuantizedKVPart
from ruvllm_jax.errors import KvCacheError
from ruvllm_jax.types import KvCacheConfig, Precision

OPEN_END = np.iinfo(np.int32).max  # `StoreSegment.end` of the segment that still takes migrations


# --------------------------------------------------------------------------------------------------
# Static layout.


@dataclasses.dataclass(frozen=True)
class TwoTierSpec:
    """The static layout of a two-tier cache (hashable, a jit static): a `KvCacheConfig` whose
    `num_kv_heads`/`head_dim` the model may have replaced, and the sizes that follow from it."""

    config: KvCacheConfig

    @classmethod
    def from_config(cls, config: KvCacheConfig, *, num_kv_heads: Optional[int] = None,
                    head_dim: Optional[int] = None) -> "TwoTierSpec":
        if not isinstance(config, KvCacheConfig):
            raise KvCacheError(f"expected a KvCacheConfig, got {type(config).__name__} {config!r}")
        changes = {k: v for k, v in (("num_kv_heads", num_kv_heads), ("head_dim", head_dim)) if v is not None}
        return cls(config.replace(**changes) if changes else config)

    @property
    def block(self) -> int:
        return self.config.migration_batch

    @property
    def sinks(self) -> int:
        return self.config.num_sink_tokens

    @property
    def tail_blocks(self) -> int:
        return self.config.tail_length // self.block

    @property
    def store_blocks(self) -> int:
        """Most blocks the store holds: what `max_tokens` leaves after sinks and tail, rounded up."""
        c = self.config
        return -(-(c.max_tokens - c.num_sink_tokens - c.tail_length) // self.block)

    @property
    def slots(self) -> int:
        return self.store_blocks + 1

    @property
    def capacity(self) -> int:
        """Tokens held before the first eviction (>= max_tokens; equal when the store is whole blocks)."""
        return self.sinks + self.config.tail_length + self.store_blocks * self.block

    @property
    def tail_dtype(self):
        return kv_quant.float_dtype(self.config.tail_precision)


class _Counts(NamedTuple):
    """Where the tokens of sequences that appended `length` [B] tokens live."""

    sinks: jax.Array  # tokens in the sink buffer
    region: jax.Array  # tokens after the sinks (store + tail + evicted)
    committed: jax.Array  # blocks migrated so far: store ids [0, committed)
    oldest: jax.Array  # the oldest store id still held (earlier ones are evicted)

    @classmethod
    def of(cls, length, spec: TwoTierSpec) -> "_Counts":
        length = jnp.asarray(length, jnp.int32)
        region = jnp.maximum(length - spec.sinks, 0)
        blocks = (region + spec.block - 1) // spec.block
        committed = jnp.maximum(blocks - spec.tail_blocks, 0)
        return cls(jnp.minimum(length, spec.sinks), region, committed, jnp.maximum(committed - spec.store_blocks, 0))

    def tail(self, spec: TwoTierSpec):
        """Tokens in the tail (the last, possibly partial, blocks after the committed ones)."""
        return self.region - self.committed * spec.block


# --------------------------------------------------------------------------------------------------
# Arrays.


def _nbytes(x) -> int:
    """Bytes of an array or of a `jax.ShapeDtypeStruct`."""
    return int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize


def _set_block(arr: jax.Array, slot: jax.Array, value: jax.Array) -> jax.Array:
    """arr [KVH, N, ...] with block `slot[b]` set to value[b] ([B, KVH, ...]) for each sequence b.

    One sequence is a dynamic_update_slice (in place inside the decode loop); several a scatter.
    """
    value = value.astype(arr.dtype)
    if slot.shape[0] == 1:
        return jax.lax.dynamic_update_slice(arr, value[0][:, None], (0, slot[0]) + (0,) * (arr.ndim - 2))
    return arr.at[:, slot].set(jnp.moveaxis(value, 0, 1))


def _get_block(arr: jax.Array, slot: jax.Array) -> jax.Array:
    """Block slot[b] of arr [KVH, N, ...] for each sequence -> [B, KVH, ...]."""
    if slot.shape[0] == 1:
        sizes = (arr.shape[0], 1) + arr.shape[2:]
        return jnp.moveaxis(jax.lax.dynamic_slice(arr, (0, slot[0]) + (0,) * (arr.ndim - 2), sizes), 1, 0)
    return jnp.moveaxis(arr[:, slot], 1, 0)


@struct.dataclass
class StoreSegment:
    """Store blocks of one precision: codes [KVH, B * slots, BS, Dc] (or floats), their scales, and
    the store ids [start, end) [B] it may hold (end = OPEN_END while it takes migrations)."""

    k: jax.Array
    v: jax.Array
    k_scale: Optional[jax.Array]  # [KVH, B * slots, D] per channel
    v_scale: Optional[jax.Array]  # [KVH, B * slots, BS] per token
    k_zero: Optional[jax.Array]
    v_zero: Optional[jax.Array]
    start: jax.Array
    end: jax.Array
    precision: Precision = struct.field(pytree_node=False, default=Precision.Q4)

    @classmethod
    def empty(cls, spec: TwoTierSpec, precision: Precision, batch: int, start) -> "StoreSegment":
        bits = kv_quant.bits_of(precision)
        kvh, d, bs, n = spec.config.num_kv_heads, spec.config.head_dim, spec.block, batch * spec.slots
        start = jnp.array(jnp.broadcast_to(jnp.asarray(start, jnp.int32), (batch,)), copy=True)  # its own buffer
        end = jnp.full((batch,), OPEN_END, jnp.int32)
        # Every field its own buffer (never one array twice): the caches are donated.
        if bits is None:
            dtype = kv_quant.float_dtype(precision)
            return cls(jnp.zeros((kvh, n, bs, d), dtype), jnp.zeros((kvh, n, bs, d), dtype), None, None, None, None,
                       start, end, precision)
        code_shape, code_dtype = (kvh, n, bs, d if bits == 8 else d // 2), jnp.int8 if bits == 8 else jnp.uint8
        k_scale, v_scale = (kvh, n, d), (kvh, n, bs)

        def scales(shape):
            return jnp.zeros(shape, kv_quant.SCALE_DTYPE)

        return cls(jnp.zeros(code_shape, code_dtype), jnp.zeros(code_shape, code_dtype), scales(k_scale),
                   scales(v_scale), scales(k_scale) if bits == 4 else None, scales(v_scale) if bits == 4 else None,
                   start, end, precision)

    @property
    def bits(self) -> Optional[int]:
        return kv_quant.bits_of(self.precision)

    def arrays(self) -> list[jax.Array]:
        """The block arrays (codes, scales, zero points), each with the block axis 1."""
        return [a for a in (self.k, self.v, self.k_scale, self.v_scale, self.k_zero, self.v_zero) if a is not None]

    def block_nbytes(self) -> int:
        """Bytes one block of one sequence takes, codes and scales together."""
        return sum(_nbytes(a) // a.shape[1] for a in self.arrays())

    def encode(self, k: jax.Array, v: jax.Array) -> dict:
        """Blocks k, v [..., BS, D] in this segment's precision, as its fields."""
        bits = self.bits
        if bits is None:
            return {"k": k, "v": v}
        qk, qv = kv_quant.quantize_keys(k, bits), kv_quant.quantize_values(v, bits)
        out = {"k": qk.codes, "v": qv.codes, "k_scale": qk.scale, "v_scale": qv.scale}
        if bits == 4:
            out.update(k_zero=qk.zero, v_zero=qv.zero)
        return out

    def write(self, slot: jax.Array, k: jax.Array, v: jax.Array) -> "StoreSegment":
        """Quantize blocks k, v [B, KVH, BS, D] once and write them into ring slots `slot` [B]."""
        fields = self.encode(k.astype(jnp.float32), v.astype(jnp.float32))
        return self.replace(**{name: _set_block(getattr(self, name), slot, x) for name, x in fields.items()})

    def part(self, table: jax.Array, lengths: jax.Array) -> Part:
        if self.bits is None:
            return PagedKVPart(self.k, self.v, table, lengths)
        return QuantizedKVPart(self.k, self.v, self.k_scale, self.v_scale, table, lengths, k_zero=self.k_zero,
                               v_zero=self.v_zero, bits=self.bits)

    def dequantized(self, table: jax.Array) -> tuple[jax.Array, jax.Array]:
        """The blocks of `table` [B, n] as float32 k, v [B, KVH, n * BS, D] (for `get_all_kv`)."""
        def gather(x):
            return None if x is None else jnp.moveaxis(x[:, table], 1, 0)  # [B, KVH, n, ...]

        k, v = gather(self.k), gather(self.v)
        if self.bits is not None:
            k = kv_quant.dequantize(kv_quant.Quantized(k, gather(self.k_scale), gather(self.k_zero)), self.bits, -2)
            v = kv_quant.dequantize(kv_quant.Quantized(v, gather(self.v_scale), gather(self.v_zero)), self.bits, -1)
        b, kvh, n, bs, d = k.shape
        return (k.astype(jnp.float32).reshape(b, kvh, n * bs, d), v.astype(jnp.float32).reshape(b, kvh, n * bs, d))


@struct.dataclass
class Tiers:
    """One layer's arrays for B sequences: sinks, the tail ring and the store segments (oldest first)."""

    sink_k: jax.Array  # [B, KVH, sinks, D]
    sink_v: jax.Array
    tail_k: jax.Array  # [KVH, B * tail_blocks, BS, D]
    tail_v: jax.Array
    stores: tuple[StoreSegment, ...]

    @classmethod
    def empty(cls, spec: TwoTierSpec, batch: int) -> "Tiers":
        c = spec.config
        sink = (batch, c.num_kv_heads, spec.sinks, c.head_dim)
        tail = (c.num_kv_heads, batch * spec.tail_blocks, spec.block, c.head_dim)
        zeros = functools.partial(jnp.zeros, dtype=spec.tail_dtype)
        return cls(zeros(sink), zeros(sink), zeros(tail), zeros(tail),
                   (StoreSegment.empty(spec, c.store_precision, batch, 0),))

    @property
    def batch(self) -> int:
        return self.sink_k.shape[0]

    def arrays(self) -> list[jax.Array]:
        return [self.sink_k, self.sink_v, self.tail_k, self.tail_v, *(a for s in self.stores for a in s.arrays())]

    def nbytes(self) -> int:
        """Every array's bytes, the segments' int32 bookkeeping included."""
        return sum(map(_nbytes, jax.tree_util.tree_leaves(self)))


def _ring_table(first, base, ring: int, batch: int) -> jax.Array:
    """[B, ring] slot table: sequence b's blocks from ring position `first - base`, in order."""
    b = jnp.arange(batch, dtype=jnp.int32)[:, None]
    return b * ring + ((first - base)[:, None] + jnp.arange(ring, dtype=jnp.int32)[None, :]) % ring


def tier_parts(tiers: Tiers, length: jax.Array, spec: TwoTierSpec) -> list[Part]:
    """The parts holding every token of sequences that appended `length` [B] tokens."""
    n = _Counts.of(length, spec)
    batch = tiers.batch
    parts: list[Part] = []
    if spec.sinks:
        parts.append(KVPart(tiers.sink_k, tiers.sink_v, n.sinks))
    for seg in tiers.stores:
        first = jnp.maximum(seg.start, n.oldest)
        held = jnp.maximum(jnp.minimum(seg.end, n.committed) - first, 0)
        parts.append(seg.part(_ring_table(first, seg.start, spec.slots, batch), held * spec.block))
    tail_table = _ring_table(n.committed, 0, spec.tail_blocks, batch)
    parts.append(PagedKVPart(tiers.tail_k, tiers.tail_v, tail_table, n.tail(spec)))
    return parts


def append_token(tiers: Tiers, length: jax.Array, k: jax.Array, v: jax.Array, spec: TwoTierSpec) -> Tiers:
    """Tiers after each sequence appends one token k, v [B, KVH, D] to its `length` [B] tokens.

    After the write, the tail's oldest block is quantized into the newest segment's next free slot
    (`_stage`); it joins the store, unchanged, when a later token needs its tail slot. Reading the
    tail only after writing it (and the old tail only in attention, before) keeps both updates in
    place: quantizing the block out of the old tail made XLA copy the whole tail every step.
    """
    length = jnp.asarray(length, jnp.int32)
    batch = tiers.batch
    b = jnp.arange(batch, dtype=jnp.int32)
    n = _Counts.of(length, spec)
    sink_k, sink_v = tiers.sink_k, tiers.sink_v
    if spec.sinks:
        at = jnp.minimum(length, spec.sinks - 1)
        is_sink = (length < spec.sinks)[:, None, None]

        def put(buf, new):  # buf [B, KVH, sinks, D]; only sequences still filling their sinks write
            old = buf[b, :, at] if batch > 1 else jax.lax.dynamic_index_in_dim(buf[0], at[0], 1, False)[None]
            row = jnp.where(is_sink, new.astype(buf.dtype), old)
            if batch == 1:
                return jax.lax.dynamic_update_slice(buf, row[:, :, None], (0, 0, at[0], 0))
            return buf.at[b, :, at].set(row)

        sink_k, sink_v = put(sink_k, k), put(sink_v, v)
    block, offset = n.region // spec.block, n.region % spec.block
    slot = b * spec.tail_blocks + block % spec.tail_blocks

    def put_row(pool, row):  # pool [KVH, N, BS, D], row [B, KVH, D] at (slot, offset)
        row = row.astype(pool.dtype)
        if batch == 1:
            return jax.lax.dynamic_update_slice(pool, row[0][:, None, None, :], (0, slot[0], offset[0], 0))
        return pool.at[:, slot, offset].set(jnp.moveaxis(row, 0, 1))

    tiers = tiers.replace(sink_k=sink_k, sink_v=sink_v, tail_k=put_row(tiers.tail_k, k),
                          tail_v=put_row(tiers.tail_v, v))
    return _stage(tiers, length + 1, spec)


def _stage(tiers: Tiers, length: jax.Array, spec: TwoTierSpec) -> Tiers:
    """Quantize each sequence's oldest tail block into the next free store slot.

    The slot is outside the held store (ids [committed - store_blocks, committed) fill at most
    `store_blocks` of the `store_blocks + 1` slots), so this never touches a stored block; staging
    the same unchanged block again writes the same codes.
    """
    b = jnp.arange(tiers.batch, dtype=jnp.int32)
    n = _Counts.of(length, spec)
    src = b * spec.tail_blocks + n.committed % spec.tail_blocks
    seg = tiers.stores[-1]
    dst = b * spec.slots + (n.committed - seg.start) % spec.slots
    seg = seg.write(dst, _get_block(tiers.tail_k, src), _get_block(tiers.tail_v, src))
    return tiers.replace(stores=(*tiers.stores[:-1], seg))


def fill(tiers: Tiers, k: jax.Array, v: jax.Array, lengths: jax.Array, spec: TwoTierSpec) -> Tiers:
    """Empty tiers holding the first `lengths` [B] of k, v [B, S, KVH, D] (a prompt), as if appended
    token by token: the same blocks migrate, quantized from the same tail-precision values."""
    if len(tiers.stores) != 1:
        raise KvCacheError(f"fill writes a prompt into a fresh cache of one store segment, got {len(tiers.stores)}")
    batch, s = k.shape[:2]
    b = jnp.arange(batch, dtype=jnp.int32)[:, None]
    k, v = k.astype(spec.tail_dtype), v.astype(spec.tail_dtype)
    sink_k, sink_v = tiers.sink_k, tiers.sink_v
    if spec.sinks:
        take = min(s, spec.sinks)
        sink_k = jax.lax.dynamic_update_slice(sink_k, k[:, :take].transpose(0, 2, 1, 3), (0, 0, 0, 0))
        sink_v = jax.lax.dynamic_update_slice(sink_v, v[:, :take].transpose(0, 2, 1, 3), (0, 0, 0, 0))
    tiers = tiers.replace(sink_k=sink_k, sink_v=sink_v)
    rest = s - spec.sinks
    if rest <= 0:
        return tiers
    nb = -(-rest // spec.block)

    def blocks(x):  # [B, S, KVH, D] -> [KVH, B, nb, BS, D] after the sinks
        x = x[:, spec.sinks:]
        x = jnp.pad(x, ((0, 0), (0, nb * spec.block - rest), (0, 0), (0, 0)))
        return x.reshape(batch, nb, spec.block, *x.shape[2:]).transpose(3, 0, 1, 2, 4)

    kb, vb = blocks(k), blocks(v)
    n = _Counts.of(lengths, spec)
    filled = ((n.region + spec.block - 1) // spec.block)[:, None]
    j = jnp.arange(nb, dtype=jnp.int32)[None, :]
    in_tail = (j >= n.committed[:, None]) & (j < filled)
    tail_slot = jnp.where(in_tail, b * spec.tail_blocks + j % spec.tail_blocks, batch * spec.tail_blocks)
    in_store = (j >= n.oldest[:, None]) & (j < n.committed[:, None])
    store_slot = jnp.where(in_store, b * spec.slots + j % spec.slots, batch * spec.slots)
    seg = tiers.stores[0]
    fields = seg.encode(kb.astype(jnp.float32), vb.astype(jnp.float32))
    seg = seg.replace(**{name: getattr(seg, name).at[:, store_slot].set(x.astype(getattr(seg, name).dtype), mode="drop")
                         for name, x in fields.items()})
    tiers = tiers.replace(tail_k=tiers.tail_k.at[:, tail_slot].set(kb, mode="drop"),
                          tail_v=tiers.tail_v.at[:, tail_slot].set(vb, mode="drop"), stores=(seg,))
    return _stage(tiers, lengths, spec)


def with_store_precision(tiers: Tiers, length: jax.Array, precision: Precision, spec: TwoTierSpec) -> Tiers:
    """Tiers whose later migrations go to a new segment in `precision`; stored blocks keep theirs."""
    kv_quant.bits_of(precision)
    if precision is tiers.stores[-1].precision:
        return tiers
    n = _Counts.of(length, spec)
    closed = tiers.stores[-1].replace(end=jnp.array(n.committed, copy=True))
    fresh = StoreSegment.empty(spec, precision, tiers.batch, n.committed)
    # The tail's oldest block was staged into the closed segment: stage it into the new one too.
    return _stage(tiers.replace(stores=(*tiers.stores[:-1], closed, fresh)), length, spec)


def without_drained(tiers: Tiers, length, spec: TwoTierSpec) -> Tiers:
    """Tiers without the old segments whose blocks have all been evicted (host-side: reads counts)."""
    oldest = np.asarray(_Counts.of(length, spec).oldest)
    keep = [s for s in tiers.stores[:-1] if np.any(np.asarray(s.end) > oldest)] + [tiers.stores[-1]]
    return tiers if len(keep) == len(tiers.stores) else tiers.replace(stores=tuple(keep))


# --------------------------------------------------------------------------------------------------
# The model's cache: every layer, B sequences, the `KVCache` protocol.


@struct.dataclass
class TwoTierKVCache:
    """A two-tier cache for every layer of a model; `length` [B] tokens appended per sequence."""

    layers: tuple[Tiers, ...]
    length: jax.Array
    spec: TwoTierSpec = struct.field(pytree_node=False)

    @classmethod
    def init(cls, spec: TwoTierSpec, *, num_layers: int, batch: int) -> "TwoTierKVCache":
        if num_layers <= 0 or batch <= 0:
            raise KvCacheError(f"cache dimensions must be > 0, got layers={num_layers} batch={batch}")
        layers = tuple(Tiers.empty(spec, batch) for _ in range(num_layers))
        return cls(layers=layers, length=jnp.zeros((batch,), jnp.int32), spec=spec)

    @property
    def max_len(self) -> int:
        return self.spec.capacity

    def nbytes(self) -> int:
        """Bytes of every array (also of a `jax.eval_shape` of the cache: nothing allocated)."""
        return sum(map(_nbytes, jax.tree_util.tree_leaves(self)))

    def sequence(self, layer: int, b: int = 0) -> "TwoTierState":
        """Sequence b's cache in layer `layer` as a one-layer `TwoTierState` (for `stats`, `get_all_kv`)."""
        spec, tiers = self.spec, self.layers[layer]

        def rows(x, per):  # x [KVH, B * per, ...] -> sequence b's [KVH, per, ...]
            return None if x is None else x[:, b * per:(b + 1) * per]

        stores = tuple(seg.replace(**{name: rows(getattr(seg, name), spec.slots) for name in
                                      ("k", "v", "k_scale", "v_scale", "k_zero", "v_zero")},
                                   start=seg.start[b:b + 1], end=seg.end[b:b + 1]) for seg in tiers.stores)
        one = Tiers(tiers.sink_k[b:b + 1], tiers.sink_v[b:b + 1], rows(tiers.tail_k, spec.tail_blocks),
                    rows(tiers.tail_v, spec.tail_blocks), stores)
        return TwoTierState(one, self.length[b], spec)

    def stats(self, b: int = 0) -> "KvCacheStats":
        """Sequence b's statistics summed over layers (tokens are per layer, as in one layer)."""
        per_layer = [stats(self.sequence(i, b)) for i in range(len(self.layers))]
        summed = {f.name: sum(getattr(s, f.name) for s in per_layer) for f in dataclasses.fields(KvCacheStats)
                  if f.name.endswith("_bytes")}
        return dataclasses.replace(per_layer[0], **summed)

    def _replace_layer(self, layer: int, tiers: Tiers, length) -> "TwoTierKVCache":
        layers = list(self.layers)
        layers[layer] = tiers
        return self.replace(layers=tuple(layers), length=jnp.asarray(length, jnp.int32))

    def _check(self, k: jax.Array) -> None:
        c = self.spec.config
        if k.shape[-2:] != (c.num_kv_heads, c.head_dim) or k.shape[0] != self.layers[0].batch:
            raise KvCacheError(f"keys {k.shape} do not fit a two-tier cache of batch {self.layers[0].batch}, "
                               f"{c.num_kv_heads} KV heads of head_dim {c.head_dim}")

    def write_prompt(self, layer: int, k: jax.Array, v: jax.Array, lengths=None) -> "TwoTierKVCache":
        """Fill the fresh cache's layer with the first `lengths` [B] of k, v [B, S, KVH, D]."""
        self._check(k)
        lengths = jnp.full((k.shape[0],), k.shape[1], jnp.int32) if lengths is None else lengths
        return self._replace_layer(layer, fill(self.layers[layer], k, v, lengths, self.spec), lengths)

    def append(self, layer: int, k: jax.Array, v: jax.Array, positions: jax.Array):
        """Append k, v [B, KVH, D] at `positions` [B] (= tokens already held) -> (cache, parts).

        The `KVCache` protocol in one call; the model uses `read` and `write` instead, which order
        the write after attention (see `write`).
        """
        parts = self.read(layer, k, v, positions)
        return self.write(layer, k, v, positions), parts

    def read(self, layer: int, k: jax.Array, v: jax.Array, positions: jax.Array) -> tuple[Part, ...]:
        """The parts attention reads for the token k, v [B, KVH, D] at `positions` [B]: the tiers as
        they are (a block migrating now is read from the tail once more) plus the token itself."""
        self._check(k)
        positions = positions.astype(jnp.int32)
        new = KVPart(k[:, :, None, :], v[:, :, None, :], jnp.ones_like(positions), query_offset=-1)
        return (*tier_parts(self.layers[layer], positions, self.spec), new)

    def write(self, layer: int, k: jax.Array, v: jax.Array, positions: jax.Array, after=None) -> "TwoTierKVCache":
        """The cache with the token appended. `after` (attention's output over `read`'s parts) goes
        through an optimization barrier with the layer's arrays: the writes then depend on the reads
        and XLA updates the buffers in place; with no such order it copies tail and store every step.
        """
        self._check(k)
        positions = positions.astype(jnp.int32)
        tiers = self.layers[layer]
        if after is not None:
            tie = 0.0 * after.reshape(-1)[0].astype(jnp.float32)  # a data dependency XLA cannot fold away
            k, v = k + tie.astype(k.dtype), v + tie.astype(v.dtype)
        return self._replace_layer(layer, append_token(tiers, positions, k, v, self.spec), positions + 1)


# --------------------------------------------------------------------------------------------------
# RuvLLM's cache: one layer, one sequence, as pure functions.


@struct.dataclass
class TwoTierState:
    """One layer's two-tier cache for one sequence: its tiers (batch 1) and the tokens appended."""

    tiers: Tiers
    length: jax.Array  # [] int32
    spec: TwoTierSpec = struct.field(pytree_node=False)


@dataclasses.dataclass(frozen=True)
class KvCacheStats:
    """RuvLLM's statistics, counted from the arrays: tokens and real bytes per tier, scales included.

    `compression_ratio` compares every held token's bytes with the same tokens in FP16 (keys and
    values); `store_compression_ratio` the store's alone. `allocated_bytes` is what the fixed-size
    arrays take whatever they hold; `evicted_tokens` counts tokens dropped past `max_tokens`.
    """

    total_tokens: int
    tail_tokens: int
    store_tokens: int
    tail_bytes: int
    store_bytes: int
    compression_ratio: float
    sink_tokens: int = 0
    sink_bytes: int = 0
    evicted_tokens: int = 0
    store_compression_ratio: float = 1.0
    allocated_bytes: int = 0


def init(spec: Union[TwoTierSpec, KvCacheConfig]) -> TwoTierState:
    """An empty one-layer, one-sequence cache."""
    spec = spec if isinstance(spec, TwoTierSpec) else TwoTierSpec.from_config(spec)
    return TwoTierState(Tiers.empty(spec, 1), jnp.zeros((), jnp.int32), spec)


def clear(state: TwoTierState) -> TwoTierState:
    """Empty, with one store segment in the precision migrations currently use."""
    tiers = Tiers.empty(state.spec, 1)
    seg = StoreSegment.empty(state.spec, state.tiers.stores[-1].precision, 1, 0)
    return TwoTierState(tiers.replace(stores=(seg,)), jnp.zeros((), jnp.int32), state.spec)


@functools.partial(jax.jit, donate_argnames=("state",))
def append(state: TwoTierState, keys: jax.Array, values: jax.Array, count=None) -> TwoTierState:
    """Append the first `count` (default all n) tokens of keys, values [n, KVH, D], one by one.

    `count` is traced: pad n to a bucket and pass the real count to compile once per bucket.
    Eviction-off capacity is checked by the facade (the host knows the counts); here past
    `capacity` the oldest store blocks are evicted.
    """
    count = keys.shape[0] if count is None else count

    def body(i, carry):
        tiers, length = carry
        return append_token(tiers, length[None], keys[i][None], values[i][None], state.spec), length + 1

    tiers, length = jax.lax.fori_loop(0, count, body, (state.tiers, state.length))
    return state.replace(tiers=tiers, length=length)


def parts(state: TwoTierState) -> list[Part]:
    """Sinks, store segments and tail as attention parts (batch 1)."""
    return tier_parts(state.tiers, state.length[None], state.spec)


@functools.partial(jax.jit, static_argnames=("scale", "kernel"))
def attend(state: TwoTierState, query: jax.Array, scale: float, kernel=None) -> jax.Array:
    """Attention of query [H, D] over every held token -> [H, D] (zeros for an empty cache).

    Through the model's attention path: each tier's kernel (the quantized store's reads codes and
    scales block by block), merged by log-sum-exp.
    """
    from ruvllm_jax.kernels import KernelOptions
    from ruvllm_jax.models import attention

    return attention.attend_parts(query[None], parts(state), scale=scale, sliding_window=None,
                                  kernel=KernelOptions() if kernel is None else kernel)[0]


@jax.jit
def get_all_kv(state: TwoTierState) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Every held token's keys, values [capacity, KVH, D] in float32, oldest first (sinks, store,
    tail), the store dequantized; rows past `count` are zero."""
    spec, tiers = state.spec, state.tiers
    ks, vs, valid = [], [], []
    for part, source in zip(parts(state), ([None] if spec.sinks else []) + list(tiers.stores) + [None], strict=True):
        if isinstance(part, KVPart):  # sinks
            k, v = part.k.astype(jnp.float32), part.v.astype(jnp.float32)
        elif source is not None:
            k, v = source.dequantized(part.block_tables)
        else:  # the tail
            k, v = (jnp.moveaxis(x[:, part.block_tables], 1, 0) for x in (tiers.tail_k, tiers.tail_v))
            k, v = (x.astype(jnp.float32).reshape(1, x.shape[1], -1, x.shape[-1]) for x in (k, v))
        ks.append(k[0].transpose(1, 0, 2))
        vs.append(v[0].transpose(1, 0, 2))
        valid.append(jnp.arange(k.shape[2]) < part.lengths[0])
    k, v, valid = jnp.concatenate(ks), jnp.concatenate(vs), jnp.concatenate(valid)
    index = jnp.where(valid, jnp.cumsum(valid) - 1, k.shape[0])
    rows = spec.capacity + spec.block  # what `parts` can hold at most, with slack for a migrating block
    out_k = jnp.zeros((rows,) + k.shape[1:], jnp.float32).at[index].set(k, mode="drop")
    out_v = jnp.zeros((rows,) + v.shape[1:], jnp.float32).at[index].set(v, mode="drop")
    return out_k, out_v, jnp.sum(valid).astype(jnp.int32)


def stats(state: TwoTierState) -> KvCacheStats:
    """Tokens and bytes per tier, from the arrays and the counts (host-side)."""
    spec, tiers = state.spec, state.tiers
    n = _Counts.of(int(state.length), spec)
    sinks, committed, oldest = int(n.sinks), int(n.committed), int(n.oldest)
    tail_tokens = int(n.tail(spec))
    row = 2 * spec.config.num_kv_heads * spec.config.head_dim  # keys and values of one token
    float_bytes = row * np.dtype(spec.tail_dtype).itemsize
    store_bytes = 0
    for seg in tiers.stores:
        start, end = int(seg.start[0]), int(seg.end[0])
        held = max(0, min(end, committed) - max(start, oldest))
        store_bytes += held * seg.block_nbytes()
    store_tokens = (committed - oldest) * spec.block
    total = sinks + tail_tokens + store_tokens
    held_bytes = (sinks + tail_tokens) * float_bytes + store_bytes
    return KvCacheStats(
        total_tokens=total, tail_tokens=tail_tokens, store_tokens=store_tokens, tail_bytes=tail_tokens * float_bytes,
        store_bytes=store_bytes, compression_ratio=(total * row * 2) / held_bytes if held_bytes else 1.0,
        sink_tokens=sinks, sink_bytes=sinks * float_bytes, evicted_tokens=oldest * spec.block,
        store_compression_ratio=(store_tokens * row * 2) / store_bytes if store_bytes else 1.0,
        allocated_bytes=tiers.nbytes() + state.length.nbytes,
    )


def update_policy(state: TwoTierState, precision: Precision) -> TwoTierState:
    """Later migrations quantize to `precision`; blocks already stored keep theirs (and are read)."""
    tiers = with_store_precision(state.tiers, state.length[None], precision, state.spec)
    return state.replace(tiers=without_drained(tiers, state.length[None], state.spec))


# --------------------------------------------------------------------------------------------------
# RuvLLM's policy type and the stateful facade.


@dataclasses.dataclass(frozen=True)
class CacheQuantization:
    """RuvLLM's quantization policy: `HighPrecisionTail(tail_length, precision)` (no quantized
    store: later blocks are kept in `precision`), `QuantizedStore(precision, compression_ratio)`
    (`compression_ratio` is descriptive, as in RuvLLM) or `Hybrid(tail_length, tail_precision,
    store_precision)`. A live cache can change its store precision, not its tail."""

    kind: str
    store_precision: Precision
    tail_length: Optional[int] = None
    tail_precision: Optional[Precision] = None
    compression_ratio: Optional[float] = None

    _KINDS = ("high_precision_tail", "quantized_store", "hybrid")

    def __post_init__(self):
        if self.kind not in self._KINDS:
            raise KvCacheError(f"CacheQuantization kind must be one of {self._KINDS}, got {self.kind!r}")
        if not isinstance(self.store_precision, Precision) or self.store_precision not in kv_quant.STORE_PRECISIONS:
            raise KvCacheError(f"{self.store_precision!r} is not a cache precision; expected one of "
                               f"{[p.name for p in kv_quant.STORE_PRECISIONS]}")
        if self.tail_precision is not None and self.tail_precision not in kv_quant.TAIL_PRECISIONS:
            raise KvCacheError(f"tail precision must be one of {[p.name for p in kv_quant.TAIL_PRECISIONS]}, "
                               f"got {self.tail_precision!r}")
        if self.tail_length is not None and (isinstance(self.tail_length, bool) or not isinstance(self.tail_length, int)
                                             or self.tail_length <= 0):
            raise KvCacheError(f"tail_length must be an int > 0, got {self.tail_length!r}")
        if self.compression_ratio is not None and not (isinstance(self.compression_ratio, (int, float))
                                                       and math.isfinite(self.compression_ratio)
                                                       and self.compression_ratio > 0):
            raise KvCacheError(f"compression_ratio must be a finite number > 0, got {self.compression_ratio!r}")

    @staticmethod
    def HighPrecisionTail(tail_length: int, precision: Precision) -> "CacheQuantization":  # noqa: N802
        if precision not in kv_quant.TAIL_PRECISIONS:
            raise KvCacheError(f"HighPrecisionTail takes a float precision, got {precision!r}")
        return CacheQuantization("high_precision_tail", precision, tail_length, precision)

    @staticmethod
    def QuantizedStore(precision: Precision, compression_ratio: Optional[float] = None) -> "CacheQuantization":  # noqa: N802
        return CacheQuantization("quantized_store", precision, compression_ratio=compression_ratio)

    @staticmethod
    def Hybrid(tail_length: int = 256, tail_precision: Precision = Precision.FP16,  # noqa: N802
               store_precision: Precision = Precision.Q4) -> "CacheQuantization":
        return CacheQuantization("hybrid", store_precision, tail_length, tail_precision)


class TwoTierKvCache:
    """RuvLLM's `TwoTierKvCache`: a facade over `TwoTierState` and the functions of this module.

    `append(keys, values)` takes [n, KVH, D] (or RuvLLM's flat n * KVH * D floats); `attend(query,
    scale)` a query [H, D] (or flat H * D) with H a multiple of KVH. A rejected call raises
    `KvCacheError` and leaves the cache as it was.
    """

    def __init__(self, config: Optional[KvCacheConfig] = None, *, kernel=None):
        self._spec = TwoTierSpec.from_config(KvCacheConfig() if config is None else config)
        self._kernel = kernel
        self._state = init(self._spec)

    @classmethod
    def new(cls, config: Optional[KvCacheConfig] = None) -> "TwoTierKvCache":
        return cls(config)

    @property
    def config(self) -> KvCacheConfig:
        return self._spec.config

    @property
    def state(self) -> TwoTierState:
        """The functional state (a pytree); the facade replaces it, never mutates it."""
        return self._state

    @property
    def store_precision(self) -> Precision:
        """The precision later migrations quantize to."""
        return self._state.tiers.stores[-1].precision

    def __len__(self) -> int:
        return self.stats().total_tokens

    @staticmethod
    def _floats(x, name: str) -> np.ndarray:
        """x as a float32 array of finite real numbers, else `KvCacheError`."""
        try:
            arr = np.asarray(x)
        except Exception as e:  # noqa: BLE001 - any unconvertible object
            raise KvCacheError(f"{name} must be an array of floats, got {type(x).__name__}: {e}") from None
        if arr.dtype.kind not in "fiu":
            raise KvCacheError(f"{name} must hold real numbers, got dtype {arr.dtype}")
        if not np.all(np.isfinite(arr)):
            raise KvCacheError(f"{name} holds NaN or infinite values; the cache stores finite numbers only")
        return arr.astype(np.float32)

    def _limit(self) -> float:
        """The largest magnitude the tiers can hold: float16's, when an FP16 tail or float16 scales
        (a quantized or FP16 store) take the values; none for FP32/BF16 tail and store."""
        halves = (Precision.FP16, Precision.Q8, Precision.Q4)
        uses_f16 = self.config.tail_precision is Precision.FP16 or self.store_precision in halves
        return kv_quant.F16_MAX if uses_f16 else np.inf

    def _rows(self, x, name: str) -> np.ndarray:
        c = self.config
        arr = self._floats(x, name)
        stride = c.num_kv_heads * c.head_dim
        if arr.ndim == 1 and arr.size and arr.size % stride == 0:
            arr = arr.reshape(-1, c.num_kv_heads, c.head_dim)
        if arr.ndim != 3 or arr.shape[1:] != (c.num_kv_heads, c.head_dim) or arr.shape[0] < 1:
            raise KvCacheError(f"{name} of shape {arr.shape} does not fit the cache: expected [n >= 1, "
                               f"num_kv_heads={c.num_kv_heads}, head_dim={c.head_dim}] or n * {stride} floats")
        peak = float(np.max(np.abs(arr)))
        if peak > self._limit():
            raise KvCacheError(
                f"{name} hold a value of magnitude {peak:g}, beyond float16's {kv_quant.F16_MAX:g}: the "
                f"{self.config.tail_precision.name} tail / {self.store_precision.name} store cannot represent it")
        return arr

    def append(self, keys, values) -> None:
        k, v = self._rows(keys, "keys"), self._rows(values, "values")
        if k.shape != v.shape:
            raise KvCacheError(f"keys {k.shape} and values {v.shape} must have the same shape")
        n, length = k.shape[0], int(self._state.length)
        if not self.config.eviction and length + n > self._spec.capacity:
            raise KvCacheError(f"appending {n} tokens to a cache holding {length} of its {self._spec.capacity} "
                               "with eviction off (KvCacheConfig.eviction=False)")
        bucket = 1 << max(0, (n - 1).bit_length())
        pad = ((0, bucket - n), (0, 0), (0, 0))
        state = append(self._state, jnp.asarray(np.pad(k, pad)), jnp.asarray(np.pad(v, pad)), jnp.int32(n))
        if len(state.tiers.stores) > 1:
            state = state.replace(tiers=without_drained(state.tiers, state.length[None], self._spec))
        self._state = state

    def attend(self, query, scale: float) -> jax.Array:
        c = self.config
        q = self._floats(query, "query")
        if q.ndim == 1 and q.size % c.head_dim == 0:
            q = q.reshape(-1, c.head_dim)
        if q.ndim != 2 or q.shape[1] != c.head_dim or q.shape[0] == 0 or q.shape[0] % c.num_kv_heads:
            raise KvCacheError(f"query of shape {np.shape(query)} does not fit: expected [H, head_dim={c.head_dim}] "
                               f"with H a multiple of num_kv_heads={c.num_kv_heads}")
        if isinstance(scale, bool) or not isinstance(scale, (int, float, np.floating)) or not math.isfinite(scale):
            raise KvCacheError(f"scale must be a finite number, got {scale!r}")
        return attend(self._state, jnp.asarray(q), float(scale), self._kernel)

    def get_all_kv(self) -> tuple[jax.Array, jax.Array]:
        """Keys, values [total_tokens, KVH, D] in float32, oldest first, the store dequantized."""
        k, v, count = get_all_kv(self._state)
        count = int(count)
        return k[:count], v[:count]

    def stats(self) -> KvCacheStats:
        return stats(self._state)

    def clear(self) -> None:
        self._state = clear(self._state)

    def update_policy(self, policy: Union[CacheQuantization, Precision]) -> None:
        """Quantize later migrations as `policy` says; stored blocks keep their precision."""
        if isinstance(policy, Precision):
            policy = CacheQuantization.QuantizedStore(policy)
        if not isinstance(policy, CacheQuantization):
            raise KvCacheError(f"policy must be a CacheQuantization or a Precision, got {policy!r}")
        c = self.config
        for name, current in (("tail_length", c.tail_length), ("tail_precision", c.tail_precision)):
            wanted = getattr(policy, name)
            if wanted is not None and wanted != current:
                raise KvCacheError(f"a live cache cannot change its tail: policy {name}={wanted!r}, "
                                   f"the cache's is {current!r}")
        self._state = update_policy(self._state, policy.store_precision)


__all__ = [
    "CacheQuantization", "KvCacheStats", "StoreSegment", "Tiers", "TwoTierKVCache", "TwoTierKvCache", "TwoTierSpec",
    "TwoTierState", "append", "append_token", "attend", "clear", "fill", "get_all_kv", "init", "parts", "stats",
    "tier_parts", "update_policy",
]
