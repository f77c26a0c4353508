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
import numpy as np
from flax import struct

from ruvllm_jax.errors import AdapterError

DEFAULT_FISHER_DECAY = 0.1


@struct.dataclass
class EwcState:
    fisher: Any  # {"layers": ({"A": [in, r], "B": [r, out]}, ...)} for one module
    anchor: Any  # same structure: θ* of the last consolidation
    fisher_updates: jax.Array  # int32 []: how many times the Fisher was folded


def check_state(ewc: Any, like: dict, name: str = "ewc state", exc: type = AdapterError) -> None:
    """Raise `exc` unless `ewc` is an `EwcState` whose Fisher and anchor have the structure and shapes
    of `like` (a module's {"layers": ...} params), float dtypes and finite values, the Fisher >= 0,
    and `fisher_updates` an integer scalar >= 0. Nothing is changed either way."""
    from ruvllm_jax.lora.functional import describe, host_array  # functional imports this module

    if not isinstance(ewc, EwcState):
        raise exc(f"{name} must be an EwcState (MicroLoRA.ewc_states()), got {describe(ewc)}")
    want = jax.tree.structure(like)
    for field in ("fisher", "anchor"):
        tree = getattr(ewc, field)
        try:
            got = jax.tree.structure(tree)
        except Exception:  # noqa: BLE001 - an unflattenable object is just a wrong tree
            got = None
        if got != want:
            raise exc(f"{name}.{field} must have the structure {want} of this MicroLoRA's params, got {got}")
        for path_leaf, ref in zip(jax.tree_util.tree_leaves_with_path(tree), jax.tree.leaves(like), strict=True):
            path, leaf = path_leaf
            where = f"{name}.{field}{jax.tree_util.keystr(path)}"
            a = host_array(where, leaf, floating=True, exc=exc)
            if a.shape != tuple(ref.shape):
                raise exc(f"{where} has shape {a.shape}, this MicroLoRA's params have {tuple(ref.shape)}")
            if field == "fisher" and np.any(a < 0):
                raise exc(f"{where} has negative values (e.g. {a[a < 0].ravel()[:3].tolist()}); a Fisher is >= 0")
    n = ewc.fisher_updates
    if isinstance(n, (np.ndarray, jax.Array)) and n.ndim == 0 and np.issubdtype(n.dtype, np.integer):
        n = np.asarray(n).item()
    if isinstance(n, (bool, np.bool_)) or not isinstance(n, (int, np.integer)) or n < 0:
        raise exc(f"{name}.fisher_updates must be an integer >= 0, got {describe(ewc.fisher_updates)}")


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
    """Fold the mean per-sample squared gradient of module `key` into the Fisher (no-op if samples = 0).

    A concrete `decay` (a Python or NumPy number) must be in (0, 1]: a NaN one would make the Fisher, and
    at the next EWC step every adapter, NaN. (A traced decay, inside jit, cannot be checked here.)"""
    if isinstance(decay, (bool, np.bool_)) or (isinstance(decay, (int, float, np.number))
                                               and not 0.0 < float(decay) <= 1.0):
        raise AdapterError(f"Fisher decay must be in (0, 1], got {decay!r}")
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
