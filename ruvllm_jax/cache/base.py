"""What every KV cache offers the model: pure store functions, and its contents as attention *parts*.

Caches store, attention attends. A cache is a pytree (it flows through jit and can be donated) with
two pure update methods, called once per layer by the model's layer body:

- `write_prompt(layer, k, v, lengths) -> cache`: store a prompt's keys/values k, v [B, S, KVH, D]
  at positions 0..S-1, of which the first `lengths` [B] are real;
- `append(layer, k, v, positions) -> (cache, parts)`: store one new token per sequence (k, v
  [B, KVH, D] at `positions` [B]) and return the parts attention must read to see every stored
  token, the new one included.

A cache whose reads and writes touch the same buffers inside the decode loop offers the step in
two halves instead, `read(layer, k, v, positions) -> parts` and `write(layer, k, v, positions,
after) -> cache`: the model attends over the parts first and hands the attention output as
`after`, which the cache ties into the values it writes. XLA:CPU then sees the write depend on the
read and updates in place; with the two unordered it copies the buffers every step (the two-tier
cache's tail and store; the HLO test in tests/cache checks).

A *part* is a set of keys in one layout with its valid lengths. The model's attention
(`ruvllm_jax.models.attention`) picks the kernel for each part and merges them exactly by
log-sum-exp, so a cache never calls a kernel, knows no softmax scale and picks no path. Returning
the parts from `append` lets a cache hand attention the buffers it read *before* writing (the
contiguous cache does: the update then has one user and XLA:CPU writes it in place).

Parts: `KVPart` (contiguous, head-major), `PagedKVPart` (a float or per-token int8 block pool read
through block tables) and `QuantizedKVPart` (a KIVI-quantized block pool: codes, per-channel key
scales and per-token value scales, the two-tier cache's store).
"""

from __future__ import annotations

from typing import Optional, Protocol, Sequence, Union

import jax
from flax import struct


@struct.dataclass
class KVPart:
    """Keys/values k, v [B, KVH, T, D] (head-major); key t of sequence b is stored iff t < lengths[b].

    `query_offset` (static) places the query among this part's keys, for sliding windows: the query
    sits at index lengths + query_offset of the part (0: right after the stored keys; -1: the query
    is the part's last key). None when that varies per decode step: such a part cannot take a
    sliding window.
    """

    k: jax.Array
    v: jax.Array
    lengths: jax.Array  # [B] int32
    query_offset: Optional[int] = struct.field(pytree_node=False, default=None)


@struct.dataclass
class PagedKVPart:
    """A block pool k_pages, v_pages [KVH, num_blocks, block_size, D] read through block_tables
    [B, max_blocks] with lengths [B] (int8 pools take per-token scales [KVH, num_blocks, block_size])."""

    k_pages: jax.Array
    v_pages: jax.Array
    block_tables: jax.Array
    lengths: jax.Array
    k_scales: Optional[jax.Array] = None
    v_scales: Optional[jax.Array] = None
    query_offset: Optional[int] = struct.field(pytree_node=False, default=None)


@struct.dataclass
class QuantizedKVPart:
    """A KIVI-quantized block pool read through block_tables [B, max_blocks] with lengths [B].

    codes k_codes, v_codes [KVH, num_blocks, block_size, Dc]: int8 (bits 8, Dc = D) or uint8 with two
    4-bit codes per byte (bits 4, Dc = D / 2; byte j: channel j low nibble, j + D/2 high). Keys are
    scaled per channel per block (k_scale, k_zero [KVH, num_blocks, D]), values per token (v_scale,
    v_zero [KVH, num_blocks, block_size]); zero points only for 4 bits. See `cache.kv_quant`.
    """

    k_codes: jax.Array
    v_codes: jax.Array
    k_scale: jax.Array
    v_scale: jax.Array
    block_tables: jax.Array
    lengths: jax.Array
    k_zero: Optional[jax.Array] = None
    v_zero: Optional[jax.Array] = None
    bits: int = struct.field(pytree_node=False, default=8)
    query_offset: Optional[int] = struct.field(pytree_node=False, default=None)


Part = Union[KVPart, PagedKVPart, QuantizedKVPart]


class KVCache(Protocol):
    def write_prompt(self, layer: int, k: jax.Array, v: jax.Array, lengths: Optional[jax.Array] = None) -> "KVCache":
        """k, v [B, S, KVH, D] at positions 0..S-1 -> the cache holding them.

        `lengths` [B]: the real prompt lengths (None: all S); a cache that stores padding as it
        comes (the contiguous one) may ignore it, one that quantizes blocks must not."""
        ...

    def append(
        self, layer: int, k: jax.Array, v: jax.Array, positions: jax.Array,
    ) -> tuple["KVCache", Sequence[Part]]:
        """k, v [B, KVH, D] at positions [B] -> (cache, the parts holding every token up to them)."""
        ...

    @property
    def max_len(self) -> int:
        ...
