"""Orbax save/restore of a `LoraState` and its EWC++ states, bit for bit.

Layout: `<dir>/meta.json` (static fields and module list, enough to rebuild the tree's structure)
and `<dir>/state` (an orbax StandardCheckpointer pytree). Restore builds a template of the right
structure from the metadata and lets orbax fill it, so shapes, dtypes and values all come back.

Errors: reading back a checkpoint that is missing, partial, corrupt (bad JSON, fields of the wrong
type, arrays that disagree with meta.json, truncated data, non-finite values) raises `StorageError`
naming the path. Writing raises `RuvIoError` (also an `OSError`) naming the path when the target is
a regular file, a folder of other files, a folder that already holds a checkpoint (unless
`overwrite=True`), or the file system refuses.

Saving is all or nothing: the checkpoint is written into a hidden sibling folder and renamed into
place once complete, so an interrupted save leaves no partial checkpoint at `directory`. With
`overwrite=True` an existing checkpoint is replaced only after the new one is complete.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from typing import Any, Mapping, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from ruvllm_jax.errors import RuvIoError, StorageError
from ruvllm_jax.lora import ewc as ewc_lib
from ruvllm_jax.lora import functional as F
from ruvllm_jax.lora.config import TargetModule

_META = "meta.json"
_STATE = "state"
_META_KEYS = {"dims", "rank", "num_layers", "dropout", "baseline_decay", "optimizer", "ewc"}
_MODULE_KEYS = tuple(m.key for m in TargetModule)


def display_path(directory: Any) -> str:
    """The absolute path an error names (the value's repr when it is not a path at all)."""
    try:
        return os.path.abspath(os.fspath(directory))
    except TypeError:
        return repr(directory)


def _path(directory: Any, exc: type) -> str:
    if isinstance(directory, bytes) or not isinstance(directory, (str, os.PathLike)):
        raise exc(f"checkpoint directory must be a str or os.PathLike, got {F.describe(directory)}")
    p = os.fspath(directory)
    if not isinstance(p, str) or not p or "\x00" in p:
        raise exc(f"checkpoint directory must be a non-empty path, got {directory!r}")
    return os.path.abspath(p)


def _tree(state: F.LoraState, ewc_states: Mapping[str, ewc_lib.EwcState]) -> dict:
    return {
        "lora": {k: getattr(state, k) for k in ("params", "scaling", "grad", "grad_sq", "pending", "samples",
                                                "updates", "baseline", "rng", "opt_state")},
        "ewc": {k: {"fisher": e.fisher, "anchor": e.anchor, "fisher_updates": e.fisher_updates}
                for k, e in ewc_states.items()},
    }


def save(directory: str, state: F.LoraState, ewc_states: Optional[Mapping[str, ewc_lib.EwcState]] = None, *,
         overwrite: bool = False) -> None:
    """Write `state` and `ewc_states` {module key: EwcState} as a checkpoint folder at `directory`.

    `directory` must not exist or be an empty folder; one that already holds a MicroLoRA checkpoint
    (a meta.json or state entry) is replaced when `overwrite` is True and refused otherwise. A regular
    file there, or a folder holding anything else, is always refused (`RuvIoError`), so a save never
    deletes what it did not write.
    """
    if not isinstance(overwrite, bool):
        raise StorageError(f"overwrite must be a bool, got {F.describe(overwrite)}")
    directory = os.path.realpath(_path(directory, RuvIoError))
    ewc_states = dict(ewc_states or {})
    replace = False
    if os.path.lexists(directory):
        if not os.path.isdir(directory):
            raise RuvIoError(f"cannot save a checkpoint to {directory!r}: it exists and is not a folder")
        try:
            entries = sorted(os.listdir(directory))
        except OSError as e:
            raise RuvIoError(f"cannot save a checkpoint to {directory!r}: {e}") from None
        if entries:
            if _META not in entries and _STATE not in entries:
                raise RuvIoError(f"cannot save a checkpoint to {directory!r}: the folder holds other files "
                                 f"{entries[:5]}; save into a new or empty folder")
            if not overwrite:
                raise RuvIoError(f"{directory!r} already holds a checkpoint; pass overwrite=True to replace it "
                                 f"or choose a new directory")
        replace = True
    layer0 = state.params["layers"][0]
    meta = {
        "dims": {k: [int(m["A"].shape[0]), int(m["B"].shape[1])] for k, m in layer0.items()},
        "rank": int(layer0[state.keys[0]]["A"].shape[1]), "num_layers": state.num_layers,
        "dropout": state.dropout, "baseline_decay": state.baseline_decay, "optimizer": state.optimizer,
        "ewc": list(ewc_states),
    }
    parent = os.path.dirname(directory)
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.saving-", dir=parent)
    except OSError as e:
        raise RuvIoError(f"cannot save a checkpoint to {directory!r}: {e}") from None
    old = None
    try:
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(os.path.join(tmp, _STATE), _tree(state, ewc_states))
            ckptr.wait_until_finished()
        _write_meta(os.path.join(tmp, _META), meta)
        if replace:
            old = tmp + ".old"
            os.rename(directory, old)
        try:
            os.rename(tmp, directory)
        except OSError:
            if old is not None:
                os.rename(old, directory)
                old = None
            raise
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise RuvIoError(f"cannot save a checkpoint to {directory!r}: {e}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _write_meta(path: str, meta: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(meta, f)


def _shapes(tree) -> list[tuple[tuple[int, ...], str]]:
    return sorted((tuple(x.shape), str(x.dtype)) for x in jax.tree.leaves(tree))


def restore(directory: str) -> tuple[F.LoraState, dict[str, ewc_lib.EwcState]]:
    """The state and EWC states {key: EwcState} saved at `directory`; `StorageError` naming the path
    when it is missing, partial, corrupt, or holds values that are not finite."""
    directory = _path(directory, StorageError)
    if not os.path.isdir(directory):
        what = "does not exist" if not os.path.lexists(directory) else "is not a folder"
        raise StorageError(f"{directory!r} is not a MicroLoRA checkpoint: it {what}")
    meta_path = os.path.join(directory, _META)
    if not os.path.isfile(meta_path):
        raise StorageError(f"{directory!r} is not a MicroLoRA checkpoint (no {_META})")
    try:
        return _restore(directory, meta_path)
    except StorageError:
        raise
    except Exception as e:  # noqa: BLE001 - whatever orbax / json / tensorstore raise on damaged files
        raise StorageError(f"{directory!r} holds a corrupt or partial MicroLoRA checkpoint: "
                           f"{type(e).__name__}: {e}") from e


def _corrupt(directory: str, why: str) -> StorageError:
    return StorageError(f"{directory!r} holds a corrupt or partial MicroLoRA checkpoint: {why}")


def _check_meta(directory: str, meta: Any) -> dict:
    """meta.json's fields, each of the type and range `save` writes."""
    if not isinstance(meta, dict) or set(meta) != _META_KEYS:
        got = sorted(meta) if isinstance(meta, dict) else F.describe(meta)
        raise _corrupt(directory, f"{_META} must be an object with the fields {sorted(_META_KEYS)}, got {got}")

    def pos_int(v):
        return isinstance(v, int) and not isinstance(v, bool) and v > 0

    dims = meta["dims"]
    if not isinstance(dims, dict) or not dims or any(
            k not in _MODULE_KEYS or not isinstance(d, list) or len(d) != 2 or not all(map(pos_int, d))
            for k, d in dims.items()):
        raise _corrupt(directory, f"{_META} dims must map module keys {list(_MODULE_KEYS)} to [in, out] positive "
                                  f"ints, got {F.describe(dims)}")
    for k in ("rank", "num_layers"):
        if not pos_int(meta[k]):
            raise _corrupt(directory, f"{_META} {k} must be a positive integer, got {F.describe(meta[k])}")
    real = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)  # noqa: E731
    if not real(meta["dropout"]) or not 0.0 <= meta["dropout"] < 1.0:
        raise _corrupt(directory, f"{_META} dropout must be a number in [0, 1), got {F.describe(meta['dropout'])}")
    if not real(meta["baseline_decay"]) or not 0.0 <= meta["baseline_decay"] <= 1.0:
        raise _corrupt(directory, f"{_META} baseline_decay must be a number in [0, 1], got "
                                  f"{F.describe(meta['baseline_decay'])}")
    if not isinstance(meta["optimizer"], str) or meta["optimizer"] not in F.OPTIMIZERS:
        raise _corrupt(directory, f"{_META} optimizer must be one of {F.OPTIMIZERS}, got "
                                  f"{F.describe(meta['optimizer'])}")
    ewc = meta["ewc"]
    if not isinstance(ewc, list) or len(set(map(repr, ewc))) != len(ewc) or any(
            not isinstance(k, str) or k not in dims for k in ewc):
        raise _corrupt(directory, f"{_META} ewc must list distinct adapted module keys {sorted(dims)}, got "
                                  f"{F.describe(ewc)}")
    return meta


def _check_values(directory: str, tree: Any) -> None:
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        a = np.asarray(leaf)
        if np.issubdtype(a.dtype, np.floating) and not np.all(np.isfinite(a)):
            raise _corrupt(directory, f"{jax.tree_util.keystr(path)} holds NaN or infinite values")
        if np.issubdtype(a.dtype, np.signedinteger) and np.any(a < 0):
            raise _corrupt(directory, f"{jax.tree_util.keystr(path)} holds a negative count {a.tolist()}")


def _restore(directory: str, meta_path: str) -> tuple[F.LoraState, dict[str, ewc_lib.EwcState]]:
    with open(meta_path, encoding="utf-8") as f:
        meta = _check_meta(directory, json.load(f))
    dims = {k: tuple(v) for k, v in meta["dims"].items()}

    def build():  # shapes only (jax.eval_shape): a meta.json naming huge dims allocates nothing
        st = F.init(jax.random.PRNGKey(0), dims, meta["num_layers"], meta["rank"], float(meta["rank"]),
                    dropout=meta["dropout"], baseline_decay=meta["baseline_decay"], optimizer=meta["optimizer"])
        return st, _tree(st, {k: ewc_lib.init(st.params, k) for k in meta["ewc"]})

    template_state, abstract = jax.eval_shape(build)
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    template = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), abstract)
    path = os.path.join(directory, _STATE)
    if not os.path.isdir(path):
        raise _corrupt(directory, f"its {_STATE!r} folder is missing")
    with ocp.StandardCheckpointer() as ckptr:
        # Check the stored arrays against meta.json first: a failed read in orbax leaves reads in flight.
        if _shapes(ckptr.metadata(path).item_metadata) != _shapes(template):
            raise _corrupt(directory, f"its arrays do not match {_META} {meta}")
        tree = ckptr.restore(path, template)
    _check_values(directory, tree)
    lora = tree["lora"]
    state = template_state.replace(**{k: lora[k] for k in lora})
    ewc_states = {k: ewc_lib.EwcState(fisher=e["fisher"], anchor=e["anchor"], fisher_updates=e["fisher_updates"])
                  for k, e in tree["ewc"].items()}
    return state, ewc_states
