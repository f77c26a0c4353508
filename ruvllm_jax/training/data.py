"""Text data for training: the train/validation split and a seedable random-window sampler.

Batches are a pure function of (seed, step), so a resumed run draws exactly the batches the
uninterrupted run would have drawn, with no sampler state to checkpoint.
"""

from __future__ import annotations

import numpy as np

from ruvllm_jax.errors import ConfigError


def read_text(path: str) -> str:
    with open(path, encoding="utf-8", newline="") as f:
        return f.read()


def split_train_val(text: str, train_fraction: float = 0.9) -> tuple[str, str]:
    """First `train_fraction` of the text (cut just after a newline) and the rest."""
    if not 0.0 < train_fraction < 1.0:
        raise ConfigError(f"train_fraction must be in (0, 1), got {train_fraction}")
    cut = int(len(text) * train_fraction)
    nl = text.rfind("\n", 0, cut)
    cut = cut if nl < 0 else nl + 1
    return text[:cut], text[cut:]


def sample_windows(tokens: np.ndarray, *, seed: int, step: int, batch_size: int, window: int) -> np.ndarray:
    """`batch_size` random windows of `window` consecutive tokens, int32 [B, window].

    The draw depends only on (seed, step).
    """
    n = tokens.shape[0]
    if n < window:
        raise ConfigError(f"{n} tokens cannot fill a window of {window}")
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, n - window + 1, size=batch_size)
    return np.stack([tokens[s:s + window] for s in starts]).astype(np.int32)


def fixed_windows(tokens: np.ndarray, *, window: int, max_windows: int) -> np.ndarray:
    """Up to `max_windows` evenly spaced windows [W, window] (a cheap, fixed validation batch)."""
    n = tokens.shape[0]
    if n < window:
        raise ConfigError(f"{n} tokens cannot fill a window of {window}")
    count = min(max_windows, n // window)
    starts = np.linspace(0, n - window, count).astype(np.int64)
    return np.stack([tokens[s:s + window] for s in starts]).astype(np.int32)
