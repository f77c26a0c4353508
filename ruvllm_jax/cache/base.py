"""The small interface every KV cache implements so the model can run on any of them.

A cache is a pytree (so it flows through jit and can be donated) with two pure methods the model's
attention calls once per layer:

- `prefill_attend(layer, q, k, v, ...)`: store the prompt's keys/values and attend over them;
- `decode_attend(layer, q, k, v, positions, ...)`: store one token per sequence at `positions` and
  attend over everything stored so far.

Each returns `(new_cache, attention_output)`. The contiguous cache is the first implementation; the
two-tier and paged caches implement the same two methods.
"""

from __future__ import annotations

from typing import Optional, Protocol

import jax


class KVCache(Protocol):
    def prefill_attend(
        self, layer: int, q: jax.Array, k: jax.Array, v: jax.Array, *,
        sliding_window: Optional[int], impl: str, interpret: bool = False,
    ) -> tuple["KVCache", jax.Array]:
        """q [B, S, H, D], k/v [B, S, KVH, D] -> (cache, out [B, S, H, D])."""
        ...

    def decode_attend(
        self, layer: int, q: jax.Array, k: jax.Array, v: jax.Array, positions: jax.Array, *,
        sliding_window: Optional[int], impl: str, interpret: bool = False,
    ) -> tuple["KVCache", jax.Array]:
        """q [B, H, D], k/v [B, KVH, D], positions [B] -> (cache, out [B, H, D])."""
        ...

    @property
    def max_len(self) -> int:
        ...
