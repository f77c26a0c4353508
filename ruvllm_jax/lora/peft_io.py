"""Read and write PEFT LoRA folders (`adapter_config.json` + `adapter_model.safetensors`).

PEFT stores `lora_A.weight` as [r, in] and `lora_B.weight` as [out, r] under
`base_model.model.model.layers.{i}.{self_attn|mlp}.{name}_proj`; we store A [in, r], B [r, out].
Scaling is lora_alpha / r. Options that change the forward in ways we do not implement (rsLoRA,
DoRA, per-module rank/alpha patterns, biases, ...) are rejected by name rather than ignored.

Reading: a missing file, bad JSON, a field of the wrong type (every field PEFT writes has a checked
type), tensors of the wrong shape, rank, dtype or layer, non-finite values, or tensors for modules
the config's target_modules / layers_to_transform do not name raise `AdapterError`; a damaged
safetensors file raises `ModelError`. Fields this module does not know are accepted (PEFT adds
fields each release). Writing: a path that is a file, a folder that already holds an adapter (unless
`overwrite=True`), or a failing file system raise `RuvIoError` naming the path; the two files are
written to temporary names and renamed into place, so a failed save leaves no half-written adapter.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from typing import Any, Optional

import numpy as np

from ruvllm_jax.errors import AdapterError, RuvIoError
from ruvllm_jax.lora.config import TargetModule, module_dims
from ruvllm_jax.models.safetensors_io import SafetensorsFile, save_file

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_KEY = re.compile(
    r"^(?:base_model\.model\.)?model\.layers\.(\d+)\.(self_attn\.[a-z]_proj|mlp\.(?:gate|up|down)_proj)"
    r"\.lora_([AB])(?:\.[A-Za-z0-9_]+)?\.weight$"
)
_BY_PEFT_NAME = {m.peft_name: m for m in TargetModule}

# option -> the value(s) that mean "plain LoRA"; anything else is rejected by name.
_PLAIN = {
    "use_rslora": (False, None), "use_dora": (False, None), "alpha_pattern": ({}, None),
    "rank_pattern": ({}, None), "bias": ("none", None), "lora_bias": (False, None),
    "modules_to_save": (None, []), "fan_in_fan_out": (False, None), "use_qalora": (False, None),
    "use_bdlora": (None, False), "alora_invocation_tokens": (None, []), "target_parameters": (None, []),
    "layer_replication": (None, []), "trainable_token_indices": (None, {}, []), "arrow_config": (None,),
    "kasa_config": (None,), "monteclora_config": (None,), "velora_config": (None,),
}


def _is(v: Any, *types: type) -> bool:
    """isinstance without bool passing for int/float (JSON true is not 1)."""
    if isinstance(v, bool):
        return bool in types
    return isinstance(v, types)


def _finite(v: Any) -> bool:
    try:
        return _is(v, int, float) and math.isfinite(v)
    except OverflowError:  # an int beyond float range
        return False


def _names(v: Any) -> bool:
    return v is None or _is(v, str) or (_is(v, list) and all(_is(x, str) for x in v))


def _layer_ids(v: Any) -> bool:
    def one(x):
        return _is(x, int) and x >= 0
    return v is None or one(v) or (_is(v, list) and all(one(x) for x in v))


# field -> (check, what it must be): every field PEFT writes that could matter, typed.
_TYPES = {
    "peft_type": (lambda v: _is(v, str), "a string"),
    "r": (lambda v: _is(v, int) and v > 0, "a positive integer"),
    "lora_alpha": (_finite, "a finite number"),
    "lora_dropout": (lambda v: _finite(v) and 0.0 <= v < 1.0, "a number in [0, 1)"),
    "target_modules": (_names, "null, a string or a list of strings"),
    "exclude_modules": (_names, "null, a string or a list of strings"),
    "layers_to_transform": (_layer_ids, "null, an integer >= 0 or a list of them"),
    "layers_pattern": (_names, "null, a string or a list of strings"),
    "task_type": (lambda v: v is None or _is(v, str), "null or a string"),
    "base_model_name_or_path": (lambda v: v is None or _is(v, str), "null or a string"),
    "revision": (lambda v: v is None or _is(v, str), "null or a string"),
    "peft_version": (lambda v: v is None or _is(v, str), "null or a string"),
    "inference_mode": (lambda v: _is(v, bool), "a boolean"),
    "init_lora_weights": (lambda v: _is(v, bool, str), "a boolean or a string"),
    "ensure_weight_tying": (lambda v: _is(v, bool), "a boolean"),
    "auto_mapping": (lambda v: v is None or _is(v, dict), "null or an object"),
    "megatron_config": (lambda v: v is None or _is(v, dict), "null or an object"),
    "megatron_core": (lambda v: v is None or _is(v, str), "null or a string"),
    "loftq_config": (lambda v: v is None or _is(v, dict), "null or an object"),
    "eva_config": (lambda v: v is None or _is(v, dict), "null or an object"),
    "corda_config": (lambda v: v is None or _is(v, dict), "null or an object"),
    "lora_ga_config": (lambda v: v is None or _is(v, dict), "null or an object"),
    "qalora_group_size": (lambda v: _is(v, int) and v > 0, "a positive integer"),
}


def check_config(cfg: dict) -> None:
    """Raise `AdapterError` unless `cfg` is a plain-LoRA adapter_config.json with fields of the right type."""
    if not isinstance(cfg, dict):
        raise AdapterError(f"adapter_config.json must hold a JSON object, got {type(cfg).__name__}")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"peft_type {cfg.get('peft_type')!r} is not supported; only LORA is")
    # the value must be a plain one of the same JSON type: 0 is not false, "" is not null
    bad = {k: cfg[k] for k, plain in _PLAIN.items()
           if k in cfg and not any(type(cfg[k]) is type(p) and cfg[k] == p for p in plain)}
    if bad:
        raise AdapterError(
            f"unsupported PEFT LoRA options: {bad}; only plain LoRA (scaling = lora_alpha / r) is supported"
        )
    if "r" not in cfg:
        raise AdapterError("adapter_config.json r must be a positive integer, got None (no r field)")
    for k, (ok, what) in _TYPES.items():
        if k in cfg and not ok(cfg[k]):
            raise AdapterError(f"adapter_config.json {k} must be {what}, got {_show(cfg[k])}")


def _show(v: Any, limit: int = 120) -> str:
    r = repr(v)
    return r if len(r) <= limit else f"{r[:limit]}... ({type(v).__name__})"


def _targeted(module_path: str, targets: Any) -> bool:
    """PEFT's rule: a list names a module by its full path or a dotted suffix; a string is a regex
    matched against the full path (`re.fullmatch`); None, or "all-linear", names every linear."""
    if targets is None or targets == "all-linear":
        return True
    if isinstance(targets, str):
        try:
            return re.fullmatch(targets, module_path) is not None
        except re.error as e:
            raise AdapterError(f"adapter_config.json target_modules {targets!r} is not a valid regex: {e}") from None
    return any(module_path == t or module_path.endswith("." + t) for t in targets)


def _folder(folder: Any, exc: type) -> str:
    if isinstance(folder, bytes) or not isinstance(folder, (str, os.PathLike)) or not os.fspath(folder):
        raise exc(f"a PEFT adapter folder must be a non-empty str or os.PathLike, got {_show(folder)}")
    return os.fspath(folder)


def load(folder: str, model_cfg) -> tuple[dict, float, int, float, tuple[TargetModule, ...], float]:
    """(params {"layers": (...)}, scaling, rank, lora_alpha, targets, lora_dropout) of a PEFT folder for
    `model_cfg`."""
    folder = _folder(folder, AdapterError)
    cfg_path, w_path = os.path.join(folder, CONFIG_NAME), os.path.join(folder, WEIGHTS_NAME)
    for p in (cfg_path, w_path):
        if not os.path.isfile(p):
            raise AdapterError(f"{p!r} does not exist: not a PEFT adapter folder")
    try:
        with open(cfg_path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, over-long ints, deep nests
        raise AdapterError(f"{cfg_path!r} is not valid JSON: {type(e).__name__}: {e}") from None
    except OSError as e:
        raise AdapterError(f"cannot read {cfg_path!r}: {e}") from None
    check_config(cfg)
    alpha = cfg.get("lora_alpha", 8)  # PEFT's default; checked by check_config when present
    rank, alpha = int(cfg["r"]), float(alpha)
    if not math.isfinite(np.float32(alpha / rank)):
        raise AdapterError(f"adapter_config.json lora_alpha / r = {alpha!r} / {rank} overflows float32")
    dropout = float(cfg.get("lora_dropout", 0.0))
    chosen_layers = cfg.get("layers_to_transform")
    if isinstance(chosen_layers, int):
        chosen_layers = [chosen_layers]
    dims = module_dims(model_cfg)
    st = SafetensorsFile(w_path)
    found: dict[tuple[int, TargetModule], dict[str, np.ndarray]] = {}
    for name in st.keys():
        m = _KEY.match(name)
        if m is None:
            raise AdapterError(f"tensor {name!r} adapts a module this model does not support")
        layer, module, which = int(m.group(1)), _BY_PEFT_NAME.get(m.group(2)), m.group(3)
        if module is None:
            raise AdapterError(f"tensor {name!r} adapts a module the model lacks ({m.group(2)!r})")
        if layer >= model_cfg.num_layers:
            raise AdapterError(f"tensor {name!r} is for layer {layer}, the model has {model_cfg.num_layers} layers")
        module_path = f"model.layers.{layer}.{m.group(2)}"
        if not _targeted(module_path, cfg.get("target_modules")):
            raise AdapterError(f"tensor {name!r} adapts {module_path}, which adapter_config.json target_modules "
                               f"{_show(cfg.get('target_modules'))} does not name (PEFT would not load it)")
        if chosen_layers is not None and layer not in chosen_layers:
            raise AdapterError(f"tensor {name!r} is for layer {layer}, which adapter_config.json "
                               f"layers_to_transform {chosen_layers} leaves out (PEFT would not load it)")
        d_in, d_out = dims[module]
        want = (rank, d_in) if which == "A" else (d_out, rank)
        if tuple(st.shape(name)) != want:
            raise AdapterError(f"tensor {name!r} has shape {tuple(st.shape(name))}, the model needs {want} "
                               f"({module.name}, r = {rank})")
        if st.dtype(name) not in ("F16", "BF16", "F32", "F64"):
            raise AdapterError(f"tensor {name!r} has dtype {st.dtype(name)}; LoRA weights are floats "
                               f"(F16, BF16, F32, F64)")
        if which in found.get((layer, module), {}):
            raise AdapterError(f"{w_path!r} holds lora_{which} of layer {layer} {module.peft_name} twice "
                               f"(again as {name!r})")
        arr = np.array(st.get(name), np.float32)
        if not np.all(np.isfinite(arr)):
            raise AdapterError(f"tensor {name!r} holds NaN or infinite values (in float32)")
        found.setdefault((layer, module), {})[which] = arr.T
    targets = tuple(m for m in TargetModule if any(k[1] == m for k in found))
    if not targets:
        raise AdapterError(f"{w_path!r} holds no LoRA tensors")
    layers = []
    for i in range(model_cfg.num_layers):
        layer = {}
        for m in targets:  # a layer PEFT left out (layers_to_transform) gets a zero adapter
            d_in, d_out = dims[m]
            got = found.get((i, m), {})
            if len(got) == 1:
                raise AdapterError(f"layer {i} {m.peft_name} has lora_{next(iter(got))} but not its pair in {w_path!r}")
            layer[m.key] = {"A": got.get("A", np.zeros((d_in, rank), np.float32)),
                            "B": got.get("B", np.zeros((rank, d_out), np.float32))}
        layers.append(layer)
    return {"layers": tuple(layers)}, alpha / rank, rank, alpha, targets, dropout


def save(folder: str, params: dict, scaling: float, *, dropout: float = 0.0,
         base_model_name_or_path: Optional[str] = None, overwrite: bool = False) -> None:
    """Write `params` as a PEFT LoRA folder that `PeftModel.from_pretrained` loads.

    The folder is created if needed and may hold other files (a model, a README). If it already holds
    adapter_config.json or adapter_model.safetensors they are replaced only with `overwrite=True`
    (as PEFT's save_pretrained does); otherwise, or if `folder` (or one of the two names) is not a
    folder / regular file, `RuvIoError` naming the path is raised before anything is written."""
    folder = os.path.abspath(_folder(folder, RuvIoError))
    if not isinstance(overwrite, bool):
        raise AdapterError(f"overwrite must be a bool, got {_show(overwrite)}")
    if os.path.lexists(folder) and not os.path.isdir(folder):
        raise RuvIoError(f"cannot write a PEFT adapter into {folder!r}: it exists and is not a folder")
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        target = os.path.join(folder, name)
        if os.path.lexists(target):
            if not os.path.isfile(target):
                raise RuvIoError(f"cannot write {target!r}: something other than a regular file is there")
            if not overwrite:
                raise RuvIoError(f"{target!r} already exists; pass overwrite=True to replace the adapter in "
                                 f"{folder!r}, or choose another folder")
    keys = tuple(params["layers"][0])
    by_key = {m.key: m for m in TargetModule}
    rank = int(params["layers"][0][keys[0]]["A"].shape[1])
    tensors: dict[str, Any] = {}
    for i, layer in enumerate(params["layers"]):
        for k, mp in layer.items():
            prefix = f"base_model.model.model.layers.{i}.{by_key[k].peft_name}"
            tensors[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(np.asarray(mp["A"], np.float32).T)
            tensors[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(np.asarray(mp["B"], np.float32).T)
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": float(scaling) * rank,
        "lora_dropout": float(dropout), "target_modules": sorted(by_key[k].peft_name.split(".")[-1] for k in keys),
        "bias": "none", "use_rslora": False, "use_dora": False, "fan_in_fan_out": False,
        "init_lora_weights": True, "inference_mode": True, "base_model_name_or_path": base_model_name_or_path,
        "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {},
    }
    temps: list[str] = []
    try:
        os.makedirs(folder, exist_ok=True)
        for name in (WEIGHTS_NAME, CONFIG_NAME):
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=folder)
            os.close(fd)
            temps.append(tmp)
        save_file(tensors, temps[0], metadata={"format": "pt"})
        with open(temps[1], "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2)
        for tmp, name in zip(temps, (WEIGHTS_NAME, CONFIG_NAME), strict=True):
            os.replace(tmp, os.path.join(folder, name))
    except OSError as e:
        raise RuvIoError(f"cannot write a PEFT adapter into {folder!r}: {e}") from None
    finally:
        for tmp in temps:
            if os.path.exists(tmp):
                os.unlink(tmp)
