"""A decode-time view of a contiguous cache: a read-only base plus a short append segment.

Inside a decode loop, writing each new token into the big cache and attending over it makes
XLA:CPU copy the whole cache every step (the updated buffer has two users, or is read and written
by the same step). Following MaxText's prefill/autoregressive split, the loop instead appends to a
segment of `length` tokens and hands attention two parts, the base (loop-invariant, never copied)
and the segment, which attention merges by log-sum-exp; `close` writes the segment back once per
loop.

The base's end moves against the query every step, so its part has no fixed `query_offset` and
cannot take a sliding window: models with sliding-window layers decode on `ContiguousKVCache`
directly (see `supports`).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
from flax import struct

from ruvllm_jax.cache.base import KVPart
from ruvllm_jax.cache.contiguous import ContiguousKVCache, write_token
from ruvllm_jax.errors import KvCacheError


@struct.dataclass
class SegmentedKVCache:
    base: ContiguousKVCache
    base_len: jax.Array  # [B] tokens stored in `base`
    segment: ContiguousKVCache

    @staticmethod
    def supports(sliding_windows) -> bool:
        return all(w is None for w in sliding_windows)

    @classmethod
    def open(cls, base: ContiguousKVCache, base_len: jax.Array, length: int) -> "SegmentedKVCache":
        """Start a segment of up to `length` tokens after the `base_len` [B] stored ones."""
        b, kvh, t, d = base.k[0].shape
        if length > t:
            raise KvCacheError(f"a segment of {length} tokens does not fit a cache of {t}")
        segment = ContiguousKVCache.init(num_layers=base.num_layers, batch=b, num_kv_heads=kvh, head_dim=d,
                                         max_len=length, dtype=base.k[0].dtype, stacked=base.stacked)
        return cls(base=base, base_len=base_len.astype(jnp.int32), segment=segment)

    @property
    def max_len(self) -> int:
        return self.base.max_len

    def append(self, layer: int, k: jax.Array, v: jax.Array, positions: jax.Array):
        """Write k, v [B, KVH, D] into the segment at `positions` [B] -> (cache, [base, segment])."""
        chex.assert_shape(positions, (k.shape[0],))
        index = positions - self.base_len
        seg_k = write_token(self.segment.k, layer, k, index)
        seg_v = write_token(self.segment.v, layer, v, index)
        base = KVPart(self.base.k[layer], self.base.v[layer], self.base_len)
        seg = KVPart(seg_k[layer], seg_v[layer], index + 1, query_offset=-1)
        return self.replace(segment=self.segment.replace(k=seg_k, v=seg_v)), (base, seg)

    def close(self) -> ContiguousKVCache:
        """The base with the segment written at `base_len`.

        Entries past the tokens actually decoded are garbage that later tokens overwrite before
        any read (attention masks by length); those that would fall past the end of the base are
        dropped rather than clamped back onto stored tokens.
        """
        b, _, seg_len, _ = self.segment.k[0].shape
        rows = jnp.arange(b)[:, None]
        cols = self.base_len[:, None] + jnp.arange(seg_len)[None, :]  # [B, seg_len]

        def write(base_l, seg_l):  # base_l [B, KVH, T, D], seg_l [B, KVH, seg_len, D]
            return base_l.at[rows, :, cols].set(seg_l.transpose(0, 2, 1, 3), mode="drop")

        def write_all(base, seg):
            if isinstance(base, tuple):
                return tuple(write(b_, s_) for b_, s_ in zip(base, seg, strict=True))
            return base.at[:, rows, :, cols].set(seg.transpose(1, 3, 0, 2, 4), mode="drop")  # [L, B, ...]

        return self.base.replace(k=write_all(self.base.k, self.segment.k), v=write_all(self.base.v, self.segment.v))
