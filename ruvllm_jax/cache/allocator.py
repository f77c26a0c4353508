"""The host-side block allocator of the paged KV cache: which pool blocks each sequence owns.

The paged KV cache keeps, per layer, a device pool of `num_blocks` blocks of `block_size` tokens;
a sequence reads its keys through a *block table* (entry i holds its tokens [i*bs, (i+1)*bs)).
This module decides those tables on the host, in plain Python (no jax), so that:

- **prefix sharing** is cheap: `fork` gives a child every block of its parent (reference counts
  +1, no copy). Sequences are append-only, so full blocks are never written again and stay shared
  for good; only the block holding the next position can need a private copy. `reserve` makes it
  private (copy-on-write) and returns the `BlockCopy` the caller performs on device, before writing.
- **running sequences never run out mid-flight**: the engine reserves a request's prompt +
  max_tokens at admission (`reserve`, all or nothing: `OutOfMemoryError` leaves every table as it
  was), so decoding never allocates; a finished request gives the unused tail back (`trim`, `free`).

Every failed call validates first and mutates nothing, and every error names the bad value.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections import Counter
from typing import Hashable, Sequence

from ruvllm_jax.errors import ConfigError, KvCacheError, OutOfMemoryError


def _count(name: str, value, error=KvCacheError, minimum: int = 0) -> int:
    """`value` as an int >= minimum; bools, floats and other non-integers raise `error`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise error(f"{name} must be an int >= {minimum}, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise error(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


class BlockAllocator:
    """Free list + reference counts over a pool of num_blocks blocks."""

    def __init__(self, num_blocks: int):
        self._num_blocks = _count("num_blocks", num_blocks, ConfigError, minimum=1)
        self._refs = [0] * self._num_blocks
        self._free = list(range(self._num_blocks - 1, -1, -1))  # a stack: pops hand out 0, 1, 2, ... first

    @property
    def num_blocks(self) -> int:
        return self._num_blocks

    @property
    def num_free(self) -> int:
        return len(self._free)

    def free_blocks(self) -> list[int]:
        """The ids on the free list (a copy)."""
        return list(self._free)

    def _check_block(self, block) -> int:
        if isinstance(block, bool) or not isinstance(block, numbers.Integral) or not 0 <= block < self._num_blocks:
            raise KvCacheError(f"block id must be an int in [0, {self._num_blocks}), got {block!r}")
        return int(block)

    def refcount(self, block: int) -> int:
        """How many block-table entries reference `block` (0: it is free)."""
        return self._refs[self._check_block(block)]

    def allocate(self, n: int) -> list[int]:
        """n fresh blocks, each with refcount 1."""
        n = _count("number of blocks to allocate", n)
        if n > len(self._free):
            raise OutOfMemoryError(f"cannot allocate {n} blocks: only {len(self._free)} of {self._num_blocks} free")
        out = [self._free.pop() for _ in range(n)]
        for b in out:
            self._refs[b] = 1
        return out

    def share(self, blocks: Sequence[int]) -> None:
        """One more reference on each block (each must be allocated)."""
        ids = [self._check_block(b) for b in blocks]
        for b in ids:
            if self._refs[b] == 0:
                raise KvCacheError(f"cannot share block {b}: it is free (share needs an allocated block)")
        for b in ids:
            self._refs[b] += 1

    def free(self, blocks: Sequence[int]) -> None:
        """One reference off each block (a repeated id counts once per occurrence); at 0 it is free again."""
        drops = Counter(self._check_block(b) for b in blocks)
        for b, k in drops.items():
            if k > self._refs[b]:
                raise KvCacheError(f"double free of block {b}: freeing it {k} time(s) but its refcount is "
                                   f"{self._refs[b]}")
        for b, k in drops.items():
            self._refs[b] -= k
            if self._refs[b] == 0:
                self._free.append(b)


@dataclasses.dataclass(frozen=True)
class BlockCopy:
    """A device copy the caller must perform (copy-on-write): pool block `src` into block `dst`."""

    src: int
    dst: int


class PagedAllocator:
    """Per-sequence block tables over one BlockAllocator."""

    def __init__(self, num_blocks: int, block_size: int):
        self._block_size = _count("block_size", block_size, ConfigError, minimum=1)
        self.allocator = BlockAllocator(num_blocks)
        self._tables: dict[Hashable, list[int]] = {}
        self._lengths: dict[Hashable, int] = {}

    @property
    def block_size(self) -> int:
        return self._block_size

    @property
    def num_blocks(self) -> int:
        return self.allocator.num_blocks

    @property
    def num_free(self) -> int:
        return self.allocator.num_free

    def blocks_for(self, num_tokens: int) -> int:
        """ceil(num_tokens / block_size): the blocks that hold num_tokens tokens."""
        return -(-_count("num_tokens", num_tokens) // self._block_size)

    def _get(self, seq_id) -> list[int]:
        try:
            return self._tables[seq_id]
        except (KeyError, TypeError):
            raise KvCacheError(f"unknown sequence {seq_id!r}: expected one of the {len(self._tables)} live "
                               "sequences") from None

    def _check_new(self, seq_id) -> None:
        try:
            hash(seq_id)
        except TypeError:
            raise KvCacheError(f"sequence id must be hashable, got {seq_id!r}") from None
        if seq_id in self._tables:
            raise KvCacheError(f"sequence {seq_id!r} already exists: expected a new id")

    def add(self, seq_id, num_tokens: int = 0) -> list[int]:
        """A new sequence holding num_tokens tokens (blocks allocated for them); returns its table."""
        self._check_new(seq_id)
        need = self.blocks_for(num_tokens)
        self._tables[seq_id] = self.allocator.allocate(need)
        self._lengths[seq_id] = int(num_tokens)
        return list(self._tables[seq_id])

    def fork(self, parent_id, child_id) -> list[int]:
        """A child sharing all of the parent's blocks (refcount +1) and its length; returns its table."""
        parent = self._get(parent_id)
        self._check_new(child_id)
        self.allocator.share(parent)
        self._tables[child_id] = list(parent)
        self._lengths[child_id] = self._lengths[parent_id]
        return list(parent)

    def _plan(self, seq_id, total_tokens: int) -> tuple[list[int], int]:
        """(table indices reserve() must make private, blocks it must append)."""
        table = self._get(seq_id)
        length = self._lengths[seq_id]
        total = _count("total_tokens", total_tokens)
        if total < length:
            raise KvCacheError(f"total_tokens {total} is below the length {length} of sequence {seq_id!r}: "
                               f"expected total_tokens >= {length}")
        if total == length:
            return [], 0
        end = self.blocks_for(total)
        private = [i for i in range(length // self._block_size, min(end, len(table)))
                   if self.allocator.refcount(table[i]) > 1]
        return private, max(0, end - len(table))

    def blocks_needed(self, seq_id, total_tokens: int) -> int:
        """The fresh blocks reserve(seq_id, total_tokens) would take, copy-on-write included."""
        private, extra = self._plan(seq_id, total_tokens)
        return len(private) + extra

    def reserve(self, seq_id, total_tokens: int) -> list[BlockCopy]:
        """Make positions [length, total_tokens) writable by seq_id alone; returns the copies to do on device.

        A shared block covering those positions is replaced by a fresh one (one ref dropped on the
        old); only the block holding already written tokens (the partial one at `length`) needs a
        `BlockCopy`, later ones hold nothing yet. Then fresh blocks are appended up to total_tokens.
        """
        private, extra = self._plan(seq_id, total_tokens)
        need = len(private) + extra
        if need > self.allocator.num_free:
            raise OutOfMemoryError(f"sequence {seq_id!r} needs {need} blocks to reach {total_tokens} tokens "
                                   f"({len(private)} copy-on-write), only {self.allocator.num_free} free")
        table, length = self._tables[seq_id], self._lengths[seq_id]
        fresh = self.allocator.allocate(need)
        copies, old = [], []
        for i, new in zip(private, fresh, strict=False):
            if i * self._block_size < length:
                copies.append(BlockCopy(table[i], new))
            old.append(table[i])
            table[i] = new
        self.allocator.free(old)  # each had refcount > 1: none returns to the free list
        table.extend(fresh[len(private):])
        return copies

    def set_length(self, seq_id, num_tokens: int) -> None:
        """Record the tokens actually written; any new ones must lie in blocks seq_id owns alone (reserve first)."""
        table = self._get(seq_id)
        n = _count("num_tokens", num_tokens)
        cap = len(table) * self._block_size
        if n > cap:
            raise KvCacheError(f"num_tokens {n} exceeds the {cap} positions sequence {seq_id!r} holds: "
                               f"expected <= {cap} (reserve first)")
        old = self._lengths[seq_id]
        for i in range(old // self._block_size, self.blocks_for(n) if n > old else 0):
            if self.allocator.refcount(table[i]) > 1:
                raise KvCacheError(f"sequence {seq_id!r} cannot grow to {n} tokens: block {table[i]} (entry {i}) "
                                   f"is shared (refcount {self.allocator.refcount(table[i])}); reserve first")
        self._lengths[seq_id] = n

    def length(self, seq_id) -> int:
        self._get(seq_id)
        return self._lengths[seq_id]

    def trim(self, seq_id) -> None:
        """Give back the table entries past blocks_for(length) (reserved, never written)."""
        table = self._get(seq_id)
        keep = self.blocks_for(self._lengths[seq_id])
        self.allocator.free(table[keep:])
        del table[keep:]

    def free(self, seq_id) -> None:
        """Drop the sequence: one ref off each of its blocks."""
        self.allocator.free(self._get(seq_id))
        del self._tables[seq_id], self._lengths[seq_id]

    def table(self, seq_id) -> list[int]:
        """The sequence's block table (a copy)."""
        return list(self._get(seq_id))

    def __contains__(self, seq_id) -> bool:
        try:
            return seq_id in self._tables
        except TypeError:
            return False

    def sequences(self) -> list:
        """The live sequence ids, in arrival order."""
        return list(self._tables)
