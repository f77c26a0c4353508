"""EWC++ for LoRA adapters: a Fisher that is an EMA of squared gradients, and an anchor θ*.

One `EwcState` per target module covers that module in every layer. `update_fisher` folds the
per-sample squared gradients accumulated since the last update into the Fisher
(`F <- decay * g^2 + (1 - decay) * F`); `reanchor` moves θ* to the current parameters; `consolidate`
does both (the end of a task). `penalty_grad` is what `apply_updates_with_ewc` adds: λ·F·(θ − θ*).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

DEFAULT_FISHER_DECAY = 0.1


@struct.dataclass
class EwcState:
    fisher: Any  # {"layers": ({"A": [in, r], "B": [r, out]}, ...)} for one module
    anchor: Any  # same structure: θ* of the last consolidation
    fisher_updates: jax.Array  # int32 []: how many times the Fisher was folded


def module_params(params: dict, key: str) -> dict:
    """The {"layers": (...)} slice of a full adapter params tree for one module key ("q", ...)."""
    return {"layers": tuple(layer[key] for layer in params["layers"])}


def init(params: dict, key: str) -> EwcState:
    """Zero Fisher, anchored at the current parameters of module `key`."""
    mp = module_params(params, key)
    return EwcState(fisher=jax.tree.map(jnp.zeros_like, mp), anchor=mp, fisher_updates=jnp.int32(0))


def update_fisher(
    ewc: EwcState, grad_sq: dict, samples: jax.Array, key: str, decay: float = DEFAULT_FISHER_DECAY
) -> EwcState:
    """Fold the mean per-sample squared gradient of module `key` into the Fisher (no-op if samples = 0)."""
    has = samples > 0
    mean_sq = jax.tree.map(lambda s: s / jnp.maximum(samples, 1).astype(s.dtype), module_params(grad_sq, key))
    fisher = jax.tree.map(lambda f, s: jnp.where(has, decay * s + (1.0 - decay) * f, f), ewc.fisher, mean_sq)
    return ewc.replace(fisher=fisher, fisher_updates=ewc.fisher_updates + has.astype(jnp.int32))


def reanchor(ewc: EwcState, params: dict, key: str) -> EwcState:
    return ewc.replace(anchor=module_params(params, key))


def consolidate(ewc: EwcState, params: dict, grad_sq: dict, samples: jax.Array, key: str,
                decay: float = DEFAULT_FISHER_DECAY) -> EwcState:
    """End of a task: fold the pending squared gradients into the Fisher, then anchor at θ."""
    return reanchor(update_fisher(ewc, grad_sq, samples, key, decay), params, key)


def penalty_grad(ewc: EwcState, module_p: dict, ewc_lambda) -> dict:
    """∇ of (λ/2)·Σ F·(θ − θ*)²  =  λ·F·(θ − θ*)."""
    return jax.tree.map(lambda f, p, a: ewc_lambda * f * (p - a), ewc.fisher, module_p, ewc.anchor)


def penalty(ewc: EwcState, module_p: dict, ewc_lambda) -> jax.Array:
    terms = jax.tree.map(lambda f, p, a: jnp.sum(f * (p - a) ** 2), ewc.fisher, module_p, ewc.anchor)
    return 0.5 * ewc_lambda * sum(jax.tree.leaves(terms))


def fisher_mass(ewc: EwcState) -> jax.Array:
    return sum(jnp.sum(f) for f in jax.tree.leaves(ewc.fisher))
