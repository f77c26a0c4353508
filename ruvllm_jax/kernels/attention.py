"""Attention entry points used by the model: prefill (flash) and single-token decode.

The public functions validate shapes and dispatch on `impl`: "xla" is the plain jnp path (the CPU
path), "pallas" the Pallas kernels, "auto" Pallas on GPU/TPU and jnp on CPU.

Layouts: prefill takes q [B, S, H, D] and k, v [B, T, KVH, D] (as `jax.nn.dot_product_attention`);
decode takes q [B, H, D] against a head-major cache k, v [B, KVH, T, D] with `lengths` [B] valid
entries per sequence, the layout that keeps each head's keys contiguous for the decode GEMV.
"""

from __future__ import annotations

import math
from typing import Optional

import chex
import jax
import jax.numpy as jnp

from ruvllm_jax.errors import ConfigError

_IMPLS = ("auto", "pallas", "xla")


def _check_impl(impl: str) -> str:
    if impl not in _IMPLS:
        raise ConfigError(f"impl must be one of {_IMPLS}, got {impl!r}")
    if impl == "auto":
        return "pallas" if jax.default_backend() in ("gpu", "tpu") else "xla"
    return impl


def _scale(scale: Optional[float], head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)


def flash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = True,
    scale: Optional[float] = None,
    sliding_window: Optional[int] = None,
    impl: str = "auto",
    interpret: bool = False,
    return_lse: bool = False,
):
    """Prefill attention: q [B, S, H, D], k/v [B, T, KVH, D] -> [B, S, H, D] (and lse [B, H, S])."""
    b, s, h, d = q.shape
    chex.assert_rank([q, k, v], 4)
    chex.assert_equal_shape([k, v])
    if k.shape[0] != b or k.shape[3] != d or h % k.shape[2]:
        raise ConfigError(f"q {q.shape} and k {k.shape} do not fit: expected k [B, T, KVH, D] with H % KVH == 0")
    impl = _check_impl(impl)
    del interpret  # the Pallas kernels use it
    return _flash_attention_xla(q, k, v, causal, _scale(scale, d), sliding_window, return_lse)


def decode_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    lengths: jax.Array,
    *,
    scale: Optional[float] = None,
    sliding_window: Optional[int] = None,
    impl: str = "auto",
    interpret: bool = False,
    return_residuals: bool = False,
):
    """One query token per sequence: q [B, H, D], cache k/v [B, KVH, T, D], lengths [B] -> [B, H, D]."""
    b, h, d = q.shape
    chex.assert_rank([k, v], 4)
    chex.assert_equal_shape([k, v])
    if k.shape[0] != b or k.shape[3] != d or h % k.shape[1]:
        raise ConfigError(f"q {q.shape} and cache {k.shape} do not fit: expected [B, KVH, T, D] with H % KVH == 0")
    impl = _check_impl(impl)
    del interpret
    return _decode_attention_xla(q, k, v, lengths, _scale(scale, d), sliding_window, return_residuals)


def _flash_attention_xla(q, k, v, causal, scale, sliding_window, return_lse):
    b, s, h, d = q.shape
    t, kvh = k.shape[1], k.shape[2]
    g = h // kvh
    qg = q.reshape(b, s, kvh, g, d).astype(jnp.float32)
    scores = jnp.einsum("bskgd,btkd->bkgst", qg, k.astype(jnp.float32)) * scale
    q_pos = jnp.arange(s)[:, None] + (t - s)  # queries are the last s positions of the keys
    k_pos = jnp.arange(t)[None, :]
    mask = jnp.ones((s, t), dtype=bool)
    if causal:
        mask &= k_pos <= q_pos
    if sliding_window is not None:
        mask &= k_pos > q_pos - sliding_window
    scores = jnp.where(mask, scores, -jnp.inf)
    m = jnp.max(scores, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(scores - m)
    l = jnp.sum(p, axis=-1, keepdims=True)
    out = jnp.einsum("bkgst,btkd->bskgd", p / jnp.where(l == 0, 1.0, l), v.astype(jnp.float32))
    out = out.reshape(b, s, h, d).astype(q.dtype)
    if return_lse:
        lse = (m + jnp.log(l))[..., 0].reshape(b, h, s)
        return out, lse
    return out


def _decode_attention_xla(q, k, v, lengths, scale, sliding_window, return_residuals):
    b, h, d = q.shape
    kvh, t = k.shape[1], k.shape[2]
    g = h // kvh
    qg = q.reshape(b, kvh, g, d).astype(jnp.float32)
    scores = jnp.einsum("bkgd,bktd->bkgt", qg, k.astype(jnp.float32)) * scale
    pos = jnp.arange(t)[None, :]
    lengths = lengths.reshape(b, 1)
    mask = pos < lengths
    if sliding_window is not None:
        mask &= pos >= lengths - sliding_window
    scores = jnp.where(mask[:, None, None, :], scores, -jnp.inf)
    m = jnp.max(scores, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(scores - m)
    l = jnp.sum(p, axis=-1, keepdims=True)
    acc = jnp.einsum("bkgt,bktd->bkgd", p, v.astype(jnp.float32))
    out = (acc / jnp.where(l == 0, 1.0, l)).reshape(b, h, d).astype(q.dtype)
    if return_residuals:
        return out, (m[..., 0].reshape(b, h), l[..., 0].reshape(b, h))
    return out
