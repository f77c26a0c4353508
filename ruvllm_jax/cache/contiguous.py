"""A plain contiguous KV cache: per layer, keys and values [B, KVH, max_len, D].

Head-major so that decode reads each head's keys as one contiguous block. Fixed shapes, updated with
`dynamic_update_slice` inside jit; donate it to the step so XLA updates it in place.

Two layouts of the same contents: a tuple of per-layer arrays (the default), or with
`init(stacked=True)` one [L, B, KVH, max_len, D] array each for keys and values, whose `layer` may be
a traced index: a model with native-quantized layers then runs them as one `lax.scan` (see
`ruvllm_jax.models.llama`). The tuple stays the default because an unrolled layer loop reads a
stacked cache through a per-layer slice that XLA:CPU copies every decode step (the embedded model
decoded ~12% slower on it); inside the scan that copy is the price of one layer body instead of 24,
paid only up to `engine.LAYER_SCAN_MAX_LEN` cached tokens (longer caches unroll).
"""

from __future__ import annotations

from typing import Union

import chex
import jax
import jax.numpy as jnp
from flax import struct

from ruvllm_jax.cache.base import KVPart
from ruvllm_jax.errors import KvCacheError

Layers = Union[tuple[jax.Array, ...], jax.Array]  # per layer [B, KVH, T, D], or stacked [L, B, KVH, T, D]


@struct.dataclass
class ContiguousKVCache:
    k: Layers
    v: Layers

    @classmethod
    def init(
        cls, *, num_layers: int, batch: int, num_kv_heads: int, head_dim: int, max_len: int,
        dtype=jnp.float32, stacked: bool = False,
    ) -> "ContiguousKVCache":
        if min(num_layers, batch, num_kv_heads, head_dim, max_len) <= 0:
            raise KvCacheError(
                f"cache dimensions must be > 0, got layers={num_layers} batch={batch} "
                f"kv_heads={num_kv_heads} head_dim={head_dim} max_len={max_len}"
            )
        shape = (batch, num_kv_heads, max_len, head_dim)
        if stacked:
            return cls(k=jnp.zeros((num_layers, *shape), dtype), v=jnp.zeros((num_layers, *shape), dtype))
        return cls(k=tuple(jnp.zeros(shape, dtype) for _ in range(num_layers)),
                   v=tuple(jnp.zeros(shape, dtype) for _ in range(num_layers)))

    @property
    def stacked(self) -> bool:
        """Whether the layers are one [L, ...] array (a traced `layer` works) rather than a tuple."""
        return not isinstance(self.k, tuple)

    @property
    def num_layers(self) -> int:
        return len(self.k)

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]

    def nbytes(self) -> int:
        return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves((self.k, self.v)))

    def replace_layer(self, layer, k_l: jax.Array, v_l: jax.Array) -> "ContiguousKVCache":
        """The cache with layer `layer`'s arrays replaced by k_l, v_l [B, KVH, max_len, D]."""
        return self.replace(k=_set_layer(self.k, layer, k_l), v=_set_layer(self.v, layer, v_l))

    def write_prompt(self, layer, k: jax.Array, v: jax.Array, lengths=None) -> "ContiguousKVCache":
        """Store k, v [B, S, KVH, D] at positions 0..S-1 (padding too: decode masks by length)."""
        b, s, kvh, d = k.shape
        if s > self.max_len:
            raise KvCacheError(f"prompt of {s} tokens does not fit a cache of {self.max_len}")
        chex.assert_shape(self.k[layer], (b, kvh, self.max_len, d))
        k_l = _write_at(self.k, layer, k.transpose(0, 2, 1, 3), 0)
        v_l = _write_at(self.v, layer, v.transpose(0, 2, 1, 3), 0)
        return self.replace(k=k_l, v=v_l)

    def append(self, layer, k: jax.Array, v: jax.Array, positions: jax.Array):
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
        cache = self.replace(k=write_token(self.k, layer, k, positions), v=write_token(self.v, layer, v, positions))
        return cache, (stored, new)


def _set_layer(layers: Layers, layer, value: jax.Array) -> Layers:
    if isinstance(layers, tuple):
        out = list(layers)
        out[layer] = value.astype(layers[layer].dtype)
        return tuple(out)
    zero = jnp.zeros((), jnp.int32)
    start = (jnp.asarray(layer, jnp.int32),) + (zero,) * value.ndim
    return jax.lax.dynamic_update_slice(layers, value[None].astype(layers.dtype), start)


def _write_at(layers: Layers, layer, block: jax.Array, position) -> Layers:
    """`layers` with block [B, KVH, S, D] written into layer `layer` from token `position` on."""
    zero = jnp.zeros((), jnp.int32)
    position = jnp.asarray(position, jnp.int32)
    if isinstance(layers, tuple):
        updated = jax.lax.dynamic_update_slice(layers[layer], block.astype(layers[layer].dtype),
                                               (zero, zero, position, zero))
        return _set_layer(layers, layer, updated)
    return jax.lax.dynamic_update_slice(layers, block[None].astype(layers.dtype),
                                        (jnp.asarray(layer, jnp.int32), zero, zero, position, zero))


def write_token(layers: Layers, layer, new: jax.Array, positions: jax.Array) -> Layers:
    """`layers` with new [B, KVH, D] written into layer `layer` at per-sequence positions [B].

    Batch 1 (the common serving case) is one dynamic_update_slice (into the whole stack when
    stacked, so XLA updates it in place also under a scan's traced `layer`); a vmapped one becomes
    a scatter that XLA:CPU does not update in place inside the decode loop (three cache copies per
    step).
    """
    new = new[:, :, None, :]
    if new.shape[0] == 1:
        return _write_at(layers, layer, new, positions[0])
    rows = jnp.arange(new.shape[0])
    if isinstance(layers, tuple):
        return _set_layer(layers, layer, layers[layer].at[rows, :, positions].set(new[:, :, 0, :]))
    return layers.at[layer, rows, :, positions].set(new[:, :, 0, :].astype(layers.dtype))
