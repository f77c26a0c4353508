"""A plain contiguous KV cache: per layer, keys and values [B, KVH, max_len, D].

Head-major so that decode reads each head's keys as one contiguous block. Fixed shapes, updated with
`dynamic_update_slice` inside jit; donate it to the step so XLA updates it in place.
"""

from __future__ import annotations

from typing import Optional

import chex
import jax
import jax.numpy as jnp
from flax import struct

from ruvllm_jax.errors import KvCacheError
from ruvllm_jax.kernels import decode_attention, flash_attention, merge_attention


@struct.dataclass
class ContiguousKVCache:
    k: tuple[jax.Array, ...]
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
        zeros = lambda: tuple(jnp.zeros(shape, dtype) for _ in range(num_layers))  # noqa: E731
        return cls(k=zeros(), v=zeros())

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]

    def nbytes(self) -> int:
        return sum(x.size * x.dtype.itemsize for x in (*self.k, *self.v))

    def _replace_layer(self, layer: int, k_l, v_l) -> "ContiguousKVCache":
        ks, vs = list(self.k), list(self.v)
        ks[layer], vs[layer] = k_l, v_l
        return self.replace(k=tuple(ks), v=tuple(vs))

    def prefill_attend(self, layer, q, k, v, *, sliding_window: Optional[int], impl: str, interpret: bool = False):
        b, s, kvh, d = k.shape
        if s > self.max_len:
            raise KvCacheError(f"prompt of {s} tokens does not fit a cache of {self.max_len}")
        chex.assert_shape(self.k[layer], (b, kvh, self.max_len, d))
        k_l = jax.lax.dynamic_update_slice(self.k[layer], k.transpose(0, 2, 1, 3).astype(self.k[layer].dtype), (0, 0, 0, 0))
        v_l = jax.lax.dynamic_update_slice(self.v[layer], v.transpose(0, 2, 1, 3).astype(self.v[layer].dtype), (0, 0, 0, 0))
        out = flash_attention(q, k, v, causal=True, sliding_window=sliding_window, impl=impl, interpret=interpret)
        return self._replace_layer(layer, k_l, v_l), out

    def decode_attend(
        self, layer, q, k, v, positions, *, sliding_window: Optional[int], impl: str, interpret: bool = False,
    ):
        """Attend over the stored tokens plus the new one, then store it.

        The stored part (positions < `positions`) and the new token are attended separately and
        merged by log-sum-exp. Reading the cache *before* the update leaves the update a single
        user, so XLA:CPU writes it in place; attending over the updated cache made XLA duplicate
        the update into both users and copy the whole cache three times per step.
        """
        b, kvh, d = k.shape
        chex.assert_shape(positions, (b,))
        chex.assert_shape(self.k[layer], (b, kvh, self.max_len, d))
        h = q.shape[1]
        stored_window = None if sliding_window is None else sliding_window - 1  # the new token is the last
        scale = d ** -0.5
        if stored_window == 0:
            out = jnp.repeat(v, h // kvh, axis=1)  # a window of 1: only the new token
        else:
            out_old, res_old = decode_attention(
                q, self.k[layer], self.v[layer], positions, scale=scale, sliding_window=stored_window,
                impl=impl, interpret=interpret, return_residuals=True)
            qg = q.reshape(b, kvh, h // kvh, d).astype(jnp.float32)
            s_new = (jnp.einsum("bkgd,bkd->bkg", qg, k.astype(jnp.float32)) * scale).reshape(b, h)
            v_new = jnp.repeat(v, h // kvh, axis=1)  # [B, H, D]
            out, _ = merge_attention([out_old, v_new], [res_old, (s_new, jnp.ones_like(s_new))])
        k_l = _write_token(self.k[layer], k, positions)
        v_l = _write_token(self.v[layer], v, positions)
        return self._replace_layer(layer, k_l, v_l), out.astype(q.dtype)

def _write_token(cache: jax.Array, new: jax.Array, positions: jax.Array) -> jax.Array:
    """cache [B, KVH, T, D] with new [B, KVH, D] written at per-sequence positions [B].

    Batch 1 (the common serving case) is one dynamic_update_slice; a vmapped one becomes a scatter
    that XLA:CPU does not update in place inside the decode loop (three cache copies per step).
    """
    new = new[:, :, None, :].astype(cache.dtype)
    if cache.shape[0] == 1:
        return jax.lax.dynamic_update_slice(cache, new, (0, 0, positions[0], 0))
    return cache.at[jnp.arange(cache.shape[0]), :, positions].set(new[:, :, 0, :])
