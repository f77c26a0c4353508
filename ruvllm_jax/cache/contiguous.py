"""A plain contiguous KV cache: per layer, keys and values [B, KVH, max_len, D].

Head-major so that decode reads each head's keys as one contiguous block. Fixed shapes, updated with
`dynamic_update_slice` inside jit; donate it to the step so XLA updates it in place.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
from flax import struct

from ruvllm_jax.cache.base import KVPart
from ruvllm_jax.errors import KvCacheError


@struct.dataclass
class ContiguousKVCache:
    k: tuple[jax.Array, ...]  # per layer [B, KVH, max_len, D]
    v: tuple[jax.Array, ...]

    @classmethod
    def init(
        cls, *, num_layers: int, batch: int, num_kv_heads: int, head_dim: int, max_len: int,
        dtype=jnp.float32,
    ) -> "ContiguousKVCache":
        if min(num_layers, batch, num_kv_heads, head_dim, max_len) <= 0:
            raise KvCacheError(
                f"cache dimensions must be > 0, got layers={num_layers} batch={batch} "
                f"kv_heads={num_kv_heads} head_dim={head_dim} max_len={max_len}"
            )
        shape = (batch, num_kv_heads, max_len, head_dim)
        return cls(k=tuple(jnp.zeros(shape, dtype) for _ in range(num_layers)),
                   v=tuple(jnp.zeros(shape, dtype) for _ in range(num_layers)))

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]

    def nbytes(self) -> int:
        return sum(x.size * x.dtype.itemsize for x in (*self.k, *self.v))

    def replace_layer(self, layer: int, k_l: jax.Array, v_l: jax.Array) -> "ContiguousKVCache":
        """The cache with layer `layer`'s arrays replaced by k_l, v_l [B, KVH, max_len, D]."""
        ks, vs = list(self.k), list(self.v)
        ks[layer], vs[layer] = k_l, v_l
        return self.replace(k=tuple(ks), v=tuple(vs))

    def write_prompt(self, layer: int, k: jax.Array, v: jax.Array, lengths=None) -> "ContiguousKVCache":
        """Store k, v [B, S, KVH, D] at positions 0..S-1 (padding too: decode masks by length)."""
        b, s, kvh, d = k.shape
        if s > self.max_len:
            raise KvCacheError(f"prompt of {s} tokens does not fit a cache of {self.max_len}")
        chex.assert_shape(self.k[layer], (b, kvh, self.max_len, d))
        k_l = jax.lax.dynamic_update_slice(self.k[layer], k.transpose(0, 2, 1, 3).astype(self.k[layer].dtype),
                                           (0, 0, 0, 0))
        v_l = jax.lax.dynamic_update_slice(self.v[layer], v.transpose(0, 2, 1, 3).astype(self.v[layer].dtype),
                                           (0, 0, 0, 0))
        return self.replace_layer(layer, k_l, v_l)

    def append(self, layer: int, k: jax.Array, v: jax.Array, positions: jax.Array):
        """Store k, v [B, KVH, D] at `positions` [B] -> (cache, [stored part, new-token part]).

        The stored part is the cache as it was *before* the write (tokens < positions): reading
        the old buffer leaves the update a single user, so XLA:CPU writes it in place; attending
        over the updated cache made XLA duplicate the update into both users and copy the whole
        cache three times per step. The new token is a part of its own, merged by log-sum-exp.
        """
        b, kvh, d = k.shape
        chex.assert_shape(positions, (b,))
        chex.assert_shape(self.k[layer], (b, kvh, self.max_len, d))
        stored = KVPart(self.k[layer], self.v[layer], positions.astype(jnp.int32), query_offset=0)
        new = KVPart(k[:, :, None, :], v[:, :, None, :], jnp.ones((b,), jnp.int32), query_offset=-1)
        cache = self.replace_layer(layer, write_token(self.k[layer], k, positions),
                                   write_token(self.v[layer], v, positions))
        return cache, (stored, new)


def write_token(cache: jax.Array, new: jax.Array, positions: jax.Array) -> jax.Array:
    """cache [B, KVH, T, D] with new [B, KVH, D] written at per-sequence positions [B].

    Batch 1 (the common serving case) is one dynamic_update_slice; a vmapped one becomes a scatter
    that XLA:CPU does not update in place inside the decode loop (three cache copies per step).
    """
    new = new[:, :, None, :].astype(cache.dtype)
    if cache.shape[0] == 1:
        return jax.lax.dynamic_update_slice(cache, new, (0, 0, positions[0], 0))
    return cache.at[jnp.arange(cache.shape[0]), :, positions].set(new[:, :, 0, :])
