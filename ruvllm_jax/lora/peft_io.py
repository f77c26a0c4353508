"""Read and write PEFT LoRA folders (`adapter_config.json` + `adapter_model.safetensors`).

PEFT stores `lora_A.weight` as [r, in] and `lora_B.weight` as [out, r] under
`base_model.model.model.layers.{i}.{self_attn|mlp}.{name}_proj`; we store A [in, r], B [r, out].
Scaling is lora_alpha / r. Options that change the forward in ways we do not implement (rsLoRA,
DoRA, per-module rank/alpha patterns, biases, ...) are rejected by name rather than ignored.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Optional

import numpy as np

from ruvllm_jax.errors import AdapterError
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


def check_config(cfg: dict) -> None:
    if not isinstance(cfg, dict):
        raise AdapterError(f"adapter_config.json must hold a JSON object, got {type(cfg).__name__}")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"peft_type {cfg.get('peft_type')!r} is not supported; only LORA is")
    bad = {k: cfg[k] for k, plain in _PLAIN.items() if k in cfg and cfg[k] not in plain}
    if bad:
        raise AdapterError(
            f"unsupported PEFT LoRA options: {bad}; only plain LoRA (scaling = lora_alpha / r) is supported"
        )
    r = cfg.get("r")
    if not isinstance(r, int) or r <= 0:
        raise AdapterError(f"adapter_config.json r must be a positive integer, got {r!r}")


def load(folder: str, model_cfg) -> tuple[dict, float, int, float, tuple[TargetModule, ...]]:
    """(params {"layers": (...)}, scaling, rank, lora_alpha, targets) of a PEFT folder for `model_cfg`."""
    cfg_path, w_path = os.path.join(folder, CONFIG_NAME), os.path.join(folder, WEIGHTS_NAME)
    for p in (cfg_path, w_path):
        if not os.path.isfile(p):
            raise AdapterError(f"{p!r} does not exist: not a PEFT adapter folder")
    try:
        with open(cfg_path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterError(f"{cfg_path!r} is not valid JSON: {e}") from None
    check_config(cfg)
    alpha = cfg.get("lora_alpha", 8)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not np.isfinite(alpha):
        raise AdapterError(f"adapter_config.json lora_alpha must be a finite number, got {alpha!r}")
    rank, alpha = int(cfg["r"]), float(alpha)
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
        d_in, d_out = dims[module]
        want = (rank, d_in) if which == "A" else (d_out, rank)
        arr = st.get(name)
        if tuple(arr.shape) != want:
            raise AdapterError(f"tensor {name!r} has shape {tuple(arr.shape)}, the model needs {want} ({module.name})")
        found.setdefault((layer, module), {})[which] = np.array(arr, np.float32).T
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
    return {"layers": tuple(layers)}, alpha / rank, rank, alpha, targets


def save(folder: str, params: dict, scaling: float, *, dropout: float = 0.0,
         base_model_name_or_path: Optional[str] = None) -> None:
    """Write `params` as a PEFT LoRA folder that `PeftModel.from_pretrained` loads."""
    os.makedirs(folder, exist_ok=True)
    keys = tuple(params["layers"][0])
    by_key = {m.key: m for m in TargetModule}
    rank = int(params["layers"][0][keys[0]]["A"].shape[1])
    tensors: dict[str, Any] = {}
    for i, layer in enumerate(params["layers"]):
        for k, mp in layer.items():
            prefix = f"base_model.model.model.layers.{i}.{by_key[k].peft_name}"
            tensors[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(np.asarray(mp["A"], np.float32).T)
            tensors[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(np.asarray(mp["B"], np.float32).T)
    save_file(tensors, os.path.join(folder, WEIGHTS_NAME), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": float(scaling) * rank,
        "lora_dropout": float(dropout), "target_modules": sorted(by_key[k].peft_name.split(".")[-1] for k in keys),
        "bias": "none", "use_rslora": False, "use_dora": False, "fan_in_fan_out": False,
        "init_lora_weights": True, "inference_mode": True, "base_model_name_or_path": base_model_name_or_path,
        "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {},
    }
    with open(os.path.join(folder, CONFIG_NAME), "w") as f:
        json.dump(config, f, indent=2)
