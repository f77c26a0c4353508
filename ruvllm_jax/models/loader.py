"""Load Llama-family checkpoints (HF folder or hub id) into the params pytree, and save them back.

A folder holds `config.json`, `model.safetensors` (or a sharded index) and `tokenizer.json`. Tensor
names are transformers'; Q/K/V and gate/up are fused on load. Every tensor's shape is checked
against the config so a mismatched checkpoint fails here, naming the tensor, not inside jit.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ruvllm_jax.errors import ModelError, NotFoundError
from ruvllm_jax.models import json_io, weights_io
from ruvllm_jax.models.config import LlamaConfig, token_ids
from ruvllm_jax.models.safetensors_io import FLOAT_DTYPES, open_checkpoint, save_file

_HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.txt"]
_HF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}


def resolve_model_path(model_id: str, *, hf_token: Optional[str] = None, cache_dir: Optional[str] = None) -> str:
    """A local folder as is, or a hub id downloaded (or taken from the HF cache when offline)."""
    expanded = os.path.expanduser(os.fspath(model_id))
    if os.path.isdir(expanded):
        return os.path.abspath(expanded)
    if os.path.isfile(expanded):
        if expanded.endswith(".gguf"):
            return os.path.abspath(expanded)
        raise ModelError(f"{model_id!r} is a file; expected a model folder, a .gguf file or a hub id")
    looks_like_path = (
        expanded.startswith((os.sep, ".", "~")) or expanded.count("/") > 1 or expanded.endswith(".gguf")
    )
    if looks_like_path:
        raise NotFoundError(f"model folder {model_id!r} does not exist")
    return _snapshot(model_id, hf_token=hf_token, cache_dir=cache_dir)


def _snapshot(repo_id: str, *, hf_token: Optional[str], cache_dir: Optional[str]) -> str:
    from huggingface_hub import snapshot_download

    kwargs = dict(repo_id=repo_id, allow_patterns=_HUB_PATTERNS, token=hf_token, cache_dir=cache_dir)
    try:
        return snapshot_download(**kwargs, local_files_only=True)
    except Exception:  # not cached: try the network below
        pass
    try:
        return snapshot_download(**kwargs)
    except Exception as e:
        raise NotFoundError(
            f"hub model {repo_id!r} is neither in the local Hugging Face cache nor reachable "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from None


def _hf_names(i: int) -> dict[str, str]:
    p = f"model.layers.{i}."
    return {
        "attn_norm": p + "input_layernorm.weight",
        "q": p + "self_attn.q_proj",
        "k": p + "self_attn.k_proj",
        "v": p + "self_attn.v_proj",
        "o": p + "self_attn.o_proj",
        "mlp_norm": p + "post_attention_layernorm.weight",
        "gate": p + "mlp.gate_proj",
        "up": p + "mlp.up_proj",
        "down": p + "mlp.down_proj",
    }


def load_params(
    folder: str, cfg: LlamaConfig, *, dtype=jnp.float32, device=None, quantization=None, layout=None,
) -> dict[str, Any]:
    """Read a checkpoint folder into the params pytree (fused layout), with one copy of the weights.

    Every tensor is kept as `dtype` (float32 by default); when `quantization` (a quantized
    `Precision`) is given, 2-D weights are kept in its block format instead
    (`ruvllm_jax.quant.convert.format_for`). Each weight is read chunk by chunk into the buffer it is kept in
    (`weights_io.materialize`), never through the file's memory map. With `layout` (a
    `ruvllm_jax.sharding.ModelSharding`) each tensor goes straight onto its shards of the mesh, and
    q/k/v and gate/up stay one part per module (the split layout); `device` is then ignored.
    """
    tensors = open_checkpoint(folder)
    float_kind = weights_io.kind_of_dtype(dtype)

    def source(name: str, shape: tuple[int, ...]) -> weights_io.RowSource:
        if name not in tensors:
            raise ModelError(f"tensor {name!r} is missing from the checkpoint in {folder!r}")
        file = tensors[name]
        if file.dtype(name) not in FLOAT_DTYPES:
            raise ModelError(
                f"tensor {name!r} in {file.path!r} has dtype {file.dtype(name)}, expected one of {FLOAT_DTYPES}"
            )
        stored = file.shape(name)
        if len(stored) not in (1, 2):
            raise ModelError(f"tensor {name!r} has shape {list(stored)}, expected {list(shape)} for this config")
        rows_cols = (1, stored[0]) if len(stored) == 1 else tuple(stored)
        src = weights_io.file_rows(file.path, file.data_offset(name), name, file.dtype(name), rows_cols)
        weights_io.check_shape(src, shape, file.path)
        return src

    def vector(*parts: tuple[str, int]) -> jax.Array:
        where = device if layout is None else layout.replicated
        return weights_io.materialize_vector([source(n, (size,)) for n, size in parts], where, float_kind)

    def matrix(role: str, *parts: tuple[str, tuple[int, int]]) -> Any:
        srcs = [source(n, shape) for n, shape in parts]
        kind = weights_io.weight_kind(quantization, float_kind, srcs[0].shape[1])
        return weights_io.materialize(srcs, kind, device if layout is None else layout.placer(role))

    def fused(roles: tuple[str, ...], *parts: tuple[str, tuple[int, int]]) -> Any:
        if layout is None:
            return matrix(roles[0], *parts)
        return tuple(matrix(role, part) for role, part in zip(roles, parts, strict=True))

    d, inter = cfg.hidden_size, cfg.intermediate_size
    layers = []
    for i in range(cfg.num_layers):
        n = _hf_names(i)
        lp = {
            "attn_norm": vector((n["attn_norm"], d)),
            "wqkv": fused(("q", "k", "v"), (n["q"] + ".weight", (cfg.q_size, d)),
                          (n["k"] + ".weight", (cfg.kv_size, d)), (n["v"] + ".weight", (cfg.kv_size, d))),
            "wo": matrix("o", (n["o"] + ".weight", (d, cfg.q_size))),
            "mlp_norm": vector((n["mlp_norm"], d)),
            "w_gate_up": fused(("gate", "up"), (n["gate"] + ".weight", (inter, d)), (n["up"] + ".weight", (inter, d))),
            "w_down": matrix("down", (n["down"] + ".weight", (d, inter))),
        }
        if cfg.attention_bias:
            lp["bqkv"] = vector((n["q"] + ".bias", cfg.q_size), (n["k"] + ".bias", cfg.kv_size),
                                (n["v"] + ".bias", cfg.kv_size))
            if n["o"] + ".bias" in tensors:  # Llama's attention_bias covers o_proj; Qwen2's does not
                lp["bo"] = vector((n["o"] + ".bias", d))
        if cfg.mlp_bias:
            lp["b_gate_up"] = vector((n["gate"] + ".bias", inter), (n["up"] + ".bias", inter))
            lp["b_down"] = vector((n["down"] + ".bias", d))
        layers.append(lp)
    params = {
        "embed": matrix("embed", ("model.embed_tokens.weight", (cfg.vocab_size, d))),
        "final_norm": vector(("model.norm.weight", d)),
        "layers": tuple(layers),
    }
    if not cfg.tie_word_embeddings:
        params["lm_head"] = matrix("lm_head", ("lm_head.weight", (cfg.vocab_size, d)))
    return params


def to_hf_tensors(params: dict[str, Any], cfg: LlamaConfig, dtype=np.float32) -> dict[str, np.ndarray]:
    """The inverse of `load_params`: transformers' tensor names, un-fused."""
    def a(x):  # a tuple of parts (the split layout of a mesh) joins along rows
        if isinstance(x, tuple):
            return np.concatenate([a(p) for p in x])
        return np.asarray(jax.device_get(x), dtype=np.float32).astype(dtype)

    out = {"model.embed_tokens.weight": a(params["embed"]), "model.norm.weight": a(params["final_norm"])}
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = a(params["lm_head"])
    split_qkv = [cfg.q_size, cfg.q_size + cfg.kv_size]
    for i, lp in enumerate(params["layers"]):
        n = _hf_names(i)
        q, k, v = np.split(a(lp["wqkv"]), split_qkv)
        gate, up = np.split(a(lp["w_gate_up"]), 2)
        out.update({
            n["attn_norm"]: a(lp["attn_norm"]), n["q"] + ".weight": q, n["k"] + ".weight": k,
            n["v"] + ".weight": v, n["o"] + ".weight": a(lp["wo"]), n["mlp_norm"]: a(lp["mlp_norm"]),
            n["gate"] + ".weight": gate, n["up"] + ".weight": up, n["down"] + ".weight": a(lp["w_down"]),
        })
        if "bqkv" in lp:
            bq, bk, bv = np.split(a(lp["bqkv"]), split_qkv)
            out.update({n["q"] + ".bias": bq, n["k"] + ".bias": bk, n["v"] + ".bias": bv})
        if "bo" in lp:
            out[n["o"] + ".bias"] = a(lp["bo"])
        if "b_gate_up" in lp:
            bg, bu = np.split(a(lp["b_gate_up"]), 2)
            out.update({n["gate"] + ".bias": bg, n["up"] + ".bias": bu, n["down"] + ".bias": a(lp["b_down"])})
    return out


def hf_config_dict(cfg: LlamaConfig, dtype=np.float32) -> dict[str, Any]:
    """A transformers `config.json` for this config (model_type as given), stating the stored dtype."""
    rope = dict(cfg.rope_scaling)
    d = {
        "architectures": [_HF_ARCHITECTURES[cfg.model_type]],
        "model_type": cfg.model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None if rope.get("rope_type", "default") == "default" else rope,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "attention_bias": cfg.attention_bias,
        "mlp_bias": cfg.mlp_bias,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": list(cfg.eos_token_ids) if len(cfg.eos_token_ids) != 1 else cfg.eos_token_ids[0],
        "pad_token_id": cfg.pad_token_id,
        "torch_dtype": np.dtype(dtype).name,
    }
    return d


def save_hf_folder(params: dict[str, Any], cfg: LlamaConfig, folder: str, *, dtype=np.float32) -> None:
    """Write `config.json` + `model.safetensors` that transformers and `load_params` both read."""
    os.makedirs(folder, exist_ok=True)
    if cfg.model_type != "llama" and any(w is not None for w in cfg.sliding_windows):
        raise ModelError("saving sliding-window configs is only supported for model_type 'llama' (none)")
    with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as f:
        json.dump(hf_config_dict(cfg, dtype), f, indent=2)
    save_file(to_hf_tensors(params, cfg, dtype), os.path.join(folder, "model.safetensors"), {"format": "pt"})


def read_json(path: str) -> Optional[dict]:
    """A JSON file's object, None if the file is absent; `ModelError` if it is not valid JSON."""
    if not os.path.isfile(path):
        return None
    return json_io.read_json(path)


def load_config(folder: str) -> LlamaConfig:
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise NotFoundError(f"no config.json in model folder {folder!r}")
    return LlamaConfig.from_json_file(path)


def load_generation_config(folder: str, cfg: LlamaConfig) -> dict[str, Any]:
    """`generation_config.json` as an object ({} when absent), its `eos_token_id` (null, a token id or a
    list of them, each in [0, vocab_size)) checked; a bad file or field raises `ModelError` naming both."""
    path = os.path.join(folder, "generation_config.json")
    gen = read_json(path)
    if gen is None:
        return {}
    if not isinstance(gen, dict):
        raise ModelError(f"{path!r} holds {type(gen).__name__}, expected an object")
    if "eos_token_id" in gen:
        token_ids(gen["eos_token_id"], cfg.vocab_size, path, "eos_token_id")
    return gen
