"""The online-softmax pieces every kernel family shares: one KV tile's step, the finish, the merge.

Flash (prefill), decode and paged kernels all keep per-row running statistics m (max score so far),
l (sum of exp(score - m)) and acc (sum of exp(score - m) v), and split-K kernels and multi-part
caches combine partial results by log-sum-exp. Written once here so the families cannot drift apart.

Conventions: a row that has seen no visible key has m = -inf, l = 0, acc = 0; its output is 0 and
its log-sum-exp -inf, so it merges as the identity.
"""

from __future__ import annotations

from typing import Sequence, Tuple

import jax
import jax.numpy as jnp
from jax import lax

from ruvllm_jax.errors import ConfigError
from ruvllm_jax.kernels.config import compute_dtype

NEG_INF = float("-inf")

Residuals = Tuple[jax.Array, jax.Array]  # (max, sum) of one softmax, for `merge_attention`


def qk(q: jax.Array, k: jax.Array, scale: float) -> jax.Array:
    """Scaled scores of q [rows, D] against k [keys, D] -> [rows, keys], accumulated in float32."""
    s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    return s * scale


def online_softmax_step(s, m_prev, l_prev, acc_prev, v):
    """One KV tile: scores s [rows, keys] (-inf where masked), m/l [rows, 1], acc [rows, D], v [keys, D]."""
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    m_safe = jnp.where(m_new == NEG_INF, 0.0, m_new)  # rows with nothing visible yet stay at 0
    alpha = jnp.exp(m_prev - m_safe)
    p = jnp.exp(s - m_safe)
    l_new = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
    pv = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    return m_new, l_new, alpha * acc_prev + pv


def finish(m, l, acc):
    """Normalized output acc / l [rows, D] and log-sum-exp [rows, 1] from the running statistics."""
    out = acc / jnp.where(l == 0.0, 1.0, l)
    lse = jnp.where(l == 0.0, NEG_INF, jnp.where(m == NEG_INF, 0.0, m) + jnp.log(jnp.where(l == 0.0, 1.0, l)))
    return out, lse


def merge_attention(outs: Sequence[jax.Array], residuals: Sequence[Residuals]) -> Tuple[jax.Array, Residuals]:
    """Exact softmax over the union of disjoint key sets from per-set outputs and (max, sum).

    outs[i]: [..., D] normalized attention over key set i; residuals[i] = (max [...], sum [...]).
    Returns (out [..., D] in outs[0]'s dtype, (max, sum)) as if attention had run over all keys.
    """
    if len(outs) != len(residuals) or not outs:
        raise ConfigError(
            f"merge_attention needs as many residuals as outputs (>= 1), got {len(outs)} and {len(residuals)}")
    ct = compute_dtype(*(o.dtype for o in outs))
    maxes = jnp.stack([r[0].astype(ct) for r in residuals])
    sums = jnp.stack([r[1].astype(ct) for r in residuals])
    m = jnp.max(maxes, axis=0)
    m_safe = jnp.where(m == -jnp.inf, 0.0, m)
    weights = sums * jnp.exp(maxes - m_safe)  # exp(-inf) = 0 drops empty sets
    total = jnp.sum(weights, axis=0)
    acc = sum(w[..., None] * o.astype(ct) for w, o in zip(weights, outs, strict=True))
    out = acc / jnp.where(total == 0, 1.0, total)[..., None]
    return out.astype(outs[0].dtype), (m, total)
