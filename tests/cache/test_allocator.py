"""The paged KV cache's host-side block allocator: tables, refcounts, copy-on-write, all-or-nothing failures.

The oracle is an independent model: each sequence's table and length, the refcounts recomputed
from the tables, and a simulated device pool that every write goes through (after applying the
`BlockCopy`s reserve returns), so a sequence that wrote into a block another still reads would
read back someone else's tokens.
"""

from __future__ import annotations

import itertools
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ruvllm_jax.cache.allocator import BlockAllocator, BlockCopy, PagedAllocator
from ruvllm_jax.errors import ConfigError, KvCacheError, OutOfMemoryError


def snapshot(pa: PagedAllocator):
    """Everything observable about the allocator's state, free-list order included."""
    seqs = pa.sequences()
    return (seqs, {s: pa.table(s) for s in seqs}, {s: pa.length(s) for s in seqs},
            [pa.allocator.refcount(b) for b in range(pa.num_blocks)], pa.allocator.free_blocks())


def ceil_div(a: int, b: int) -> int:
    return (a + b - 1) // b


class Program:
    """Random arrivals, forks, reservations, writes, trims and frees, each checked against the model."""

    def __init__(self, num_blocks: int, bs: int):
        self.pa = PagedAllocator(num_blocks, bs)
        self.nb, self.bs = num_blocks, bs
        self.tables: dict[int, list[int]] = {}  # the model's block tables
        self.content: dict[int, list[int]] = {}  # the tokens each sequence has written, in order
        self.pool: dict[int, list] = {}  # simulated device pool: block -> bs token slots
        self.ids = itertools.count()
        self.tokens = itertools.count(1000)

    # --- the model -------------------------------------------------------------------------------

    def refs(self) -> Counter:
        return Counter(b for t in self.tables.values() for b in t)

    def free_count(self) -> int:
        return self.nb - len(self.refs())

    def expect_failure(self, error, call, *args):
        before = snapshot(self.pa)
        with pytest.raises(error):
            call(*args)
        assert snapshot(self.pa) == before

    def slot(self, seq, pos):
        return self.pool.setdefault(self.tables[seq][pos // self.bs], [None] * self.bs), pos % self.bs

    def pick(self, data):
        return data.draw(st.sampled_from(sorted(self.tables)), label="seq")

    # --- steps -----------------------------------------------------------------------------------

    def add(self, data):
        seq, n = next(self.ids), data.draw(st.integers(0, 10), label="num_tokens")
        need = ceil_div(n, self.bs)
        if need > self.free_count():
            self.expect_failure(OutOfMemoryError, self.pa.add, seq, n)
            return
        refs = self.refs()
        table = self.pa.add(seq, n)
        assert len(table) == need and all(refs[b] == 0 for b in table)
        self.tables[seq] = table
        self.content[seq] = []
        for pos in range(n):  # a prompt's prefill writes every position
            block, i = self.slot(seq, pos)
            block[i] = next(self.tokens)
            self.content[seq].append(block[i])

    def fork(self, data):
        parent, child = self.pick(data), next(self.ids)
        assert self.pa.fork(parent, child) == self.tables[parent]
        self.tables[child] = list(self.tables[parent])
        self.content[child] = list(self.content[parent])
        assert self.pa.length(child) == self.pa.length(parent)

    def reserve(self, data):
        seq, extra = self.pick(data), data.draw(st.integers(-2, 10), label="extra")
        length, table = len(self.content[seq]), self.tables[seq]
        total = length + extra
        if total < length:
            self.expect_failure(KvCacheError, self.pa.reserve, seq, total)
            return
        refs = self.refs()
        end = ceil_div(total, self.bs)
        cow = [i for i in range(length // self.bs, min(end, len(table))) if refs[table[i]] > 1] if extra else []
        need = len(cow) + max(0, end - len(table))
        assert self.pa.blocks_needed(seq, total) == need
        if need > self.free_count():
            self.expect_failure(OutOfMemoryError, self.pa.reserve, seq, total)
            return
        copies = self.pa.reserve(seq, total)
        new = self.pa.table(seq)
        assert len(new) == max(len(table), end)
        assert [new[i] != table[i] for i in range(len(table))] == [i in cow for i in range(len(table))]
        fresh = [new[i] for i in cow] + new[len(table):]
        assert all(refs[b] == 0 for b in fresh)  # every replacement and every appended block was free
        assert copies == [BlockCopy(table[i], new[i]) for i in cow if i * self.bs < length]
        for c in copies:  # the caller's device copy
            self.pool[c.dst] = list(self.pool[c.src])
        self.tables[seq] = new
        # No sequence will write a block another still reads.
        for pos in range(length, total):
            assert self.pa.allocator.refcount(new[pos // self.bs]) == 1

    def write(self, data):
        """Write tokens up to a random count in the table's range, then record them (shrinking drops tokens)."""
        seq = self.pick(data)
        length, table = len(self.content[seq]), self.tables[seq]
        n = data.draw(st.integers(0, len(table) * self.bs + 2), label="num_tokens")
        refs = self.refs()
        if n > len(table) * self.bs or any(refs[table[p // self.bs]] > 1 for p in range(length, n)):
            self.expect_failure(KvCacheError, self.pa.set_length, seq, n)
            return
        for pos in range(length, n):
            block, i = self.slot(seq, pos)
            block[i] = next(self.tokens)
            self.content[seq].append(block[i])
        del self.content[seq][n:]
        self.pa.set_length(seq, n)

    def trim(self, data):
        seq = self.pick(data)
        free_before = self.pa.num_free
        self.pa.trim(seq)
        keep = ceil_div(len(self.content[seq]), self.bs)
        assert self.pa.table(seq) == self.tables[seq][:keep]
        dropped = self.tables[seq][keep:]
        self.tables[seq] = self.tables[seq][:keep]
        # The dropped blocks no other table holds went back to the free list.
        assert self.pa.num_free - free_before == len(set(dropped) - set(self.refs()))

    def free(self, data):
        seq = self.pick(data)
        self.pa.free(seq)
        del self.tables[seq], self.content[seq]
        assert seq not in self.pa
        self.expect_failure(KvCacheError, self.pa.free, seq)

    def over_free(self, data):
        """Freeing a block more times than it is referenced fails and changes nothing."""
        block, times = data.draw(st.integers(0, self.nb - 1), label="block"), data.draw(st.integers(1, 3))
        if times > self.refs()[block]:
            self.expect_failure(KvCacheError, self.pa.allocator.free, [block] * times)

    def add_existing(self, data):
        seq = self.pick(data)
        self.expect_failure(KvCacheError, self.pa.add, seq, 0)
        self.expect_failure(KvCacheError, self.pa.fork, seq, seq)

    # --- invariants ------------------------------------------------------------------------------

    def check(self):
        pa, refs = self.pa, self.refs()
        assert pa.sequences() == sorted(self.tables)
        for seq, table in self.tables.items():
            assert pa.table(seq) == table and pa.length(seq) == len(self.content[seq])
            assert len(set(table)) == len(table)  # no block twice in one table
            # Reading the pool through the table gives back exactly what this sequence wrote.
            assert [self.pool[table[p // self.bs]][p % self.bs] for p in range(len(self.content[seq]))] \
                == self.content[seq]
        assert pa.num_free + len(refs) == self.nb  # no leak
        assert [pa.allocator.refcount(b) for b in range(self.nb)] == [refs[b] for b in range(self.nb)]
        free = pa.allocator.free_blocks()
        assert len(set(free)) == len(free) and not set(free) & set(refs)


# Steps that need a live sequence come after `add`; reserve and write are listed twice (weighted).
STEPS = [Program.add, Program.over_free, Program.fork, Program.reserve, Program.reserve, Program.write,
         Program.write, Program.trim, Program.free, Program.add_existing]


@settings(max_examples=80, deadline=None)
@given(num_blocks=st.integers(1, 12), bs=st.integers(1, 4), data=st.data())
def test_random_programs_match_the_model(num_blocks, bs, data):
    prog = Program(num_blocks, bs)
    for _ in range(40):
        steps = STEPS if prog.tables else STEPS[:2]
        step = data.draw(st.sampled_from(steps), label="step")
        step(prog, data)
        prog.check()


# --- unit tests ----------------------------------------------------------------------------------


def test_double_free_raises_and_changes_nothing():
    a = BlockAllocator(4)
    blocks = a.allocate(2)
    a.free([blocks[0]])
    state = ([a.refcount(b) for b in range(4)], a.free_blocks())
    with pytest.raises(KvCacheError, match=rf"double free of block {blocks[0]}"):
        a.free([blocks[1], blocks[0]])
    # Duplicates in one call are several frees, validated as a whole.
    with pytest.raises(KvCacheError, match=rf"block {blocks[1]}: freeing it 2 time"):
        a.free([blocks[1], blocks[1]])
    assert ([a.refcount(b) for b in range(4)], a.free_blocks()) == state
    a.share([blocks[1]])
    a.free([blocks[1], blocks[1]])
    assert a.num_free == 4


def test_allocate_more_than_free_names_both_numbers():
    a = BlockAllocator(5)
    a.allocate(3)
    with pytest.raises(OutOfMemoryError, match=r"cannot allocate 3 blocks: only 2 of 5 free"):
        a.allocate(3)
    assert a.num_free == 2
    assert a.allocate(0) == []


def test_share_of_a_free_block_fails():
    a = BlockAllocator(3)
    (b,) = a.allocate(1)
    with pytest.raises(KvCacheError, match=r"cannot share block 1"):
        a.share([b, 1])
    assert a.refcount(b) == 1


def test_fork_mid_block_copies_the_partial_block_once():
    pa = PagedAllocator(num_blocks=8, block_size=4)
    parent = pa.add("p", 6)  # one full block + a partial one holding 2 tokens
    child = pa.fork("p", "c")
    assert child == parent and [pa.allocator.refcount(b) for b in parent] == [2, 2]
    assert pa.blocks_needed("c", 10) == 2  # one copy-on-write + one new block
    copies = pa.reserve("c", 10)
    table = pa.table("c")
    assert copies == [BlockCopy(src=parent[1], dst=table[1])]
    assert table[0] == parent[0] and table[1] != parent[1] and len(table) == 3
    assert [pa.allocator.refcount(b) for b in table] == [2, 1, 1] and pa.allocator.refcount(parent[1]) == 1
    # The parent now owns its partial block alone: growing it needs no copy.
    assert pa.reserve("p", 8) == [] and pa.table("p") == parent


def test_fork_at_a_block_boundary_copies_nothing():
    pa = PagedAllocator(num_blocks=8, block_size=4)
    parent = pa.add("p", 8)
    pa.fork("p", "c")
    assert pa.blocks_needed("c", 9) == 1
    assert pa.reserve("c", 9) == []
    assert pa.table("c")[:2] == parent and len(pa.table("c")) == 3


def test_fork_after_a_reservation_replaces_the_shared_empty_blocks_without_copies():
    pa = PagedAllocator(num_blocks=8, block_size=4)
    pa.add("p", 4)
    pa.reserve("p", 12)  # blocks 1, 2 reserved, nothing written there
    pa.fork("p", "c")
    with pytest.raises(KvCacheError, match=r"is shared .* reserve first"):
        pa.set_length("c", 5)
    assert pa.reserve("c", 12) == []
    assert [pa.allocator.refcount(b) for b in pa.table("c")] == [2, 1, 1]
    pa.set_length("c", 12)


def test_trim_returns_unused_blocks():
    pa = PagedAllocator(num_blocks=6, block_size=2)
    pa.add(0, 3)
    pa.reserve(0, 11)
    assert pa.num_free == 0 and len(pa.table(0)) == 6
    pa.set_length(0, 5)
    pa.trim(0)
    assert len(pa.table(0)) == 3 and pa.num_free == 3
    pa.free(0)
    assert pa.num_free == 6 and 0 not in pa and pa.sequences() == []


def test_reserve_out_of_memory_leaves_state_unchanged():
    pa = PagedAllocator(num_blocks=3, block_size=2)
    pa.add("a", 3)
    pa.fork("a", "b")
    before = snapshot(pa)
    with pytest.raises(OutOfMemoryError, match=r"sequence 'b' needs 3 blocks .* only 1 free"):
        pa.reserve("b", 7)
    assert snapshot(pa) == before
    with pytest.raises(KvCacheError, match=r"total_tokens 2 is below the length 3"):
        pa.reserve("b", 2)
    assert snapshot(pa) == before


@pytest.mark.parametrize("bad", [-1, True, 2.0, "3", None])
def test_bad_counts_name_the_value(bad):
    pa = PagedAllocator(num_blocks=4, block_size=2)
    pa.add("s", 1)
    before = snapshot(pa)
    for call in (lambda: pa.add("t", bad), lambda: pa.reserve("s", bad), lambda: pa.set_length("s", bad),
                 lambda: pa.blocks_for(bad), lambda: pa.allocator.allocate(bad)):
        with pytest.raises(KvCacheError, match=repr(bad).replace(".", r"\.")):
            call()
    assert snapshot(pa) == before
    with pytest.raises(ConfigError, match=repr(bad).replace(".", r"\.")):
        PagedAllocator(num_blocks=bad, block_size=2)
    with pytest.raises(ConfigError, match=repr(bad).replace(".", r"\.")):
        PagedAllocator(num_blocks=4, block_size=bad)


@pytest.mark.parametrize("bad", [-1, 4, True, 1.0, "0"])
def test_bad_block_ids_name_the_value(bad):
    a = BlockAllocator(4)
    a.allocate(4)
    for call in (a.refcount, lambda b: a.share([b]), lambda b: a.free([0, b])):
        with pytest.raises(KvCacheError, match=rf"block id must be an int in \[0, 4\), got {repr(bad)}"):
            call(bad)
    assert [a.refcount(b) for b in range(4)] == [1, 1, 1, 1]


def test_zero_sizes_are_config_errors():
    with pytest.raises(ConfigError, match=r"num_blocks must be an int >= 1, got 0"):
        BlockAllocator(0)
    with pytest.raises(ConfigError, match=r"block_size must be an int >= 1, got 0"):
        PagedAllocator(4, 0)


def test_unknown_sequences_are_named():
    pa = PagedAllocator(num_blocks=4, block_size=2)
    pa.add("known", 1)
    for call in (pa.length, pa.table, pa.trim, pa.free, lambda s: pa.reserve(s, 3), lambda s: pa.set_length(s, 0),
                 lambda s: pa.blocks_needed(s, 3), lambda s: pa.fork(s, "new")):
        with pytest.raises(KvCacheError, match=r"unknown sequence 'ghost'"):
            call("ghost")
    with pytest.raises(KvCacheError, match=r"unknown sequence \['x'\]"):
        pa.length(["x"])
    with pytest.raises(KvCacheError, match=r"must be hashable"):
        pa.add(["x"])
    assert "ghost" not in pa and ["x"] not in pa and "known" in pa
    with pytest.raises(KvCacheError, match=r"num_tokens 5 exceeds the 2 positions"):
        pa.set_length("known", 5)
