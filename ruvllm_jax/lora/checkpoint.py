"""Orbax save/restore of a `LoraState` and its EWC++ states, bit for bit.

Layout: `<dir>/meta.json` (static fields and module list, enough to rebuild the tree's structure)
and `<dir>/state` (an orbax StandardCheckpointer pytree). Restore builds a template of the right
structure from the metadata and lets orbax fill it, so shapes, dtypes and values all come back.
"""

from __future__ import annotations

import json
import os
from typing import Mapping, Optional

import jax
import orbax.checkpoint as ocp

from ruvllm_jax.errors import AdapterError, RuvLLMError
from ruvllm_jax.lora import ewc as ewc_lib
from ruvllm_jax.lora import functional as F

_META = "meta.json"


def _tree(state: F.LoraState, ewc_states: Mapping[str, ewc_lib.EwcState]) -> dict:
    return {
        "lora": {k: getattr(state, k) for k in ("params", "scaling", "grad", "grad_sq", "pending", "samples",
                                                "updates", "baseline", "rng", "opt_state")},
        "ewc": {k: {"fisher": e.fisher, "anchor": e.anchor, "fisher_updates": e.fisher_updates}
                for k, e in ewc_states.items()},
    }


def save(directory: str, state: F.LoraState, ewc_states: Optional[Mapping[str, ewc_lib.EwcState]] = None) -> None:
    directory = os.path.abspath(directory)
    ewc_states = dict(ewc_states or {})
    if os.path.exists(os.path.join(directory, "state")):
        raise AdapterError(f"{directory!r} already holds a checkpoint; choose a new directory")
    os.makedirs(directory, exist_ok=True)
    layer0 = state.params["layers"][0]
    meta = {
        "dims": {k: [int(m["A"].shape[0]), int(m["B"].shape[1])] for k, m in layer0.items()},
        "rank": int(layer0[state.keys[0]]["A"].shape[1]), "num_layers": state.num_layers,
        "dropout": state.dropout, "baseline_decay": state.baseline_decay, "optimizer": state.optimizer,
        "ewc": list(ewc_states),
    }
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(os.path.join(directory, "state"), _tree(state, ewc_states))
    ckptr.wait_until_finished()
    with open(os.path.join(directory, _META), "w") as f:
        json.dump(meta, f)


def _shapes(tree) -> list[tuple[tuple[int, ...], str]]:
    return sorted((tuple(x.shape), str(x.dtype)) for x in jax.tree.leaves(tree))


def restore(directory: str) -> tuple[F.LoraState, dict[str, ewc_lib.EwcState]]:
    directory = os.path.abspath(directory)
    meta_path = os.path.join(directory, _META)
    if not os.path.isfile(meta_path):
        raise AdapterError(f"{directory!r} is not a MicroLoRA checkpoint (no {_META})")
    try:
        return _restore(directory, meta_path)
    except RuvLLMError:
        raise
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:  # bad JSON, missing or corrupt files
        raise AdapterError(f"{directory!r} holds a corrupt or partial MicroLoRA checkpoint: "
                           f"{type(e).__name__}: {e}") from e


def _restore(directory: str, meta_path: str) -> tuple[F.LoraState, dict[str, ewc_lib.EwcState]]:
    with open(meta_path, encoding="utf-8") as f:
        meta = json.load(f)
    dims = {k: tuple(v) for k, v in meta["dims"].items()}
    template_state = F.init(jax.random.PRNGKey(0), dims, meta["num_layers"], meta["rank"], float(meta["rank"]),
                            dropout=meta["dropout"], baseline_decay=meta["baseline_decay"],
                            optimizer=meta["optimizer"])
    template_ewc = {k: ewc_lib.init(template_state.params, k) for k in meta["ewc"]}
    template = jax.tree.map(ocp.utils.to_shape_dtype_struct, _tree(template_state, template_ewc))
    path = os.path.join(directory, "state")
    with ocp.StandardCheckpointer() as ckptr:
        # Check the stored arrays against meta.json first: a failed read in orbax leaves reads in flight.
        if _shapes(ckptr.metadata(path).item_metadata) != _shapes(template):
            raise AdapterError(f"{directory!r} holds a corrupt or partial MicroLoRA checkpoint: its arrays do not "
                               f"match {_META} {meta}")
        tree = ckptr.restore(path, template)
    lora = tree["lora"]
    state = template_state.replace(**{k: lora[k] for k in lora})
    ewc_states = {k: ewc_lib.EwcState(fisher=e["fisher"], anchor=e["anchor"], fisher_updates=e["fisher_updates"])
                  for k, e in tree["ewc"].items()}
    return state, ewc_states
