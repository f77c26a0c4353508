"""Sliding-window scoring of a token stream: total nats and bits per byte.

Windows of `context` tokens start every `stride` tokens; each window scores only the tokens that
no earlier window scored, so every token (but the first, which has no left context) is scored
exactly once, with up to `context - 1` tokens of left context (at least `context - stride`).
All windows are padded to one shape, so the scorer compiles once per (batch, context). Optional
LoRA `adapters` (the pytree `llama.forward` takes) are a jit argument, not a closure constant: the
scorer compiles once per adapter structure, and new adapter values (a learning loop's) reuse it.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from ruvllm_jax.errors import ConfigError
from ruvllm_jax.models import llama
from ruvllm_jax.models.config import LlamaConfig


def sliding_windows(n: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first_scored) per window: tokens [begin, end) go in, targets at
    positions [first_scored, end) are scored. Together the targets cover 1..n-1 exactly once.

    The first window scores its `context - 1` targets; each later one ends `stride` tokens further
    on and scores those `stride` new tokens, each with at least `context - stride` tokens of context.
    """
    if context < 2:
        raise ConfigError(f"context must be >= 2, got {context}")
    if not 0 < stride < context:
        raise ConfigError(f"stride must be in (0, context={context}), got {stride}")
    out, prev_end, end = [], 1, min(context, n)
    while prev_end < n:
        out.append((max(0, end - context), end, prev_end))
        prev_end, end = end, min(end + stride, n)
    return out


def _window_arrays(ids: np.ndarray, context: int, stride: int):
    wins = sliding_windows(len(ids), context, stride)
    inputs = np.zeros((len(wins), context), np.int32)
    targets = np.zeros((len(wins), context), np.int32)
    mask = np.zeros((len(wins), context), np.float32)
    for w, (b, e, first) in enumerate(wins):
        seg = ids[b:e]
        inputs[w, :len(seg)] = seg
        # logits at position p (token b + p) predict token b + p + 1
        targets[w, :len(seg) - 1] = seg[1:]
        lo = first - b - 1
        mask[w, lo:len(seg) - 1] = 1.0
    return inputs, targets, mask


@functools.partial(jax.jit, static_argnames="cfg")
def _score(params, cfg: LlamaConfig, inputs, targets, mask, adapters=None):
    """Summed nats of the masked targets. Module-level and keyed on the (hashable, frozen) cfg, so
    repeated `score_text` calls reuse one compilation per shape and adapter structure."""
    logits = llama.forward(params, cfg, inputs, adapters=adapters)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return jnp.sum(nll * mask)


def score_text(
    params, cfg: LlamaConfig, token_ids: np.ndarray, context: Optional[int] = None, stride: Optional[int] = None,
    *, batch_size: int = 8, byte_lengths: Optional[np.ndarray] = None, adapters=None,
) -> tuple[float, int] | tuple[float, int, int]:
    """(total_nats, n_tokens) over tokens 1..N-1 of `token_ids` [N]; with `byte_lengths` [V] also
    the UTF-8 byte count of the scored tokens (for bits per byte).

    `context` defaults to `cfg.max_position_embeddings`, `stride` to half of it. `adapters` (None, or
    the LoRA pytree `llama.forward` takes, e.g. `MicroLoRA.adapters`) are applied in every window.
    """
    ids = np.asarray(token_ids, np.int32)
    context = cfg.max_position_embeddings if context is None else context
    stride = max(1, context // 2) if stride is None else stride
    inputs, targets, mask = _window_arrays(ids, context, stride)
    pad = (-len(inputs)) % batch_size
    if pad:
        z = lambda a: np.concatenate([a, np.zeros((pad, context), a.dtype)])  # noqa: E731
        inputs, targets, mask = z(inputs), z(targets), z(mask)
    total = 0.0
    for i in range(0, len(inputs), batch_size):
        sl = slice(i, i + batch_size)
        total += float(_score(params, cfg, jnp.asarray(inputs[sl]), jnp.asarray(targets[sl]), jnp.asarray(mask[sl]),
                              adapters))
    n_tokens = int(mask.sum())
    if byte_lengths is None:
        return total, n_tokens
    n_bytes = int(np.asarray(byte_lengths)[ids[1:]].sum())
    return total, n_tokens, n_bytes


def bits_per_byte(total_nats: float, n_bytes: int) -> float:
    return total_nats / n_bytes / math.log(2)
