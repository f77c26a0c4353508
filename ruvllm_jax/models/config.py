"""Static description of a Llama-family decoder, read from a Hugging Face `config.json`.

`LlamaConfig` is a frozen, hashable dataclass so it can be a static jit argument. It covers the
differences between the supported families: Qwen2's QKV bias, Mistral's and Qwen2's sliding windows,
tied embeddings, explicit `head_dim`, and the RoPE variants (default, linear, llama3).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Mapping, Optional

import numpy as np

from ruvllm_jax.errors import ModelError, NotFoundError
from ruvllm_jax.kernels.config import AttentionConfig

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # RoPE scaling as sorted (key, value) pairs so the dataclass stays hashable.
    rope_scaling: tuple[tuple[str, Any], ...] = ()
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    # One entry per layer: the sliding-window size, or None for full attention.
    sliding_windows: tuple[Optional[int], ...] = ()
    model_type: str = "llama"
    bos_token_id: Optional[int] = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: Optional[int] = None
    torch_dtype: str = "float32"

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ModelError(
                f"num_attention_heads={self.num_heads} is not a multiple of "
                f"num_key_value_heads={self.num_kv_heads}"
            )
        if not self.sliding_windows:
            object.__setattr__(self, "sliding_windows", (None,) * self.num_layers)
        if len(self.sliding_windows) != self.num_layers:
            raise ModelError(
                f"{len(self.sliding_windows)} sliding-window entries for {self.num_layers} layers"
            )
        rope_type = self.rope_type
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ModelError(
                f"rope_type {rope_type!r} is not supported; expected one of {SUPPORTED_ROPE_TYPES}"
            )

    @property
    def rope_type(self) -> str:
        return dict(self.rope_scaling).get("rope_type", "default")

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def gqa_ratio(self) -> int:
        return self.num_heads // self.num_kv_heads

    def attention_config(self) -> AttentionConfig:
        """The attention every layer computes; its `effective_scale()` is 1/sqrt(head_dim), as in
        transformers' Llama, Qwen2 and Mistral."""
        return AttentionConfig(num_heads=self.num_heads, num_kv_heads=self.num_kv_heads, head_dim=self.head_dim)

    def inv_freq(self) -> np.ndarray:
        """RoPE inverse frequencies [head_dim // 2] in float32, computed as transformers does."""
        dim = self.head_dim
        exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim
        inv = (1.0 / (np.float32(self.rope_theta) ** exponents)).astype(np.float32)
        scaling = dict(self.rope_scaling)
        rope_type = self.rope_type
        if rope_type == "linear":
            inv = inv / np.float32(scaling["factor"])
        elif rope_type == "llama3":
            factor = scaling["factor"]
            low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
            old_ctx = scaling["original_max_position_embeddings"]
            low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
            wavelen = 2 * math.pi / inv
            scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
            smooth = (old_ctx / wavelen - low) / (high - low)
            smoothed = (1 - smooth) * scaled / factor + smooth * scaled
            medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
            inv = np.where(medium, smoothed, scaled)
        return inv.astype(np.float32)

    def num_params(self) -> int:
        d, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        attn = d * (self.q_size + 2 * self.kv_size) + self.q_size * d
        if self.attention_bias:
            attn += self.q_size + 2 * self.kv_size
        mlp = 3 * d * i
        per_layer = attn + mlp + 2 * d
        embed = v * d * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * per_layer + embed + d

    @classmethod
    def from_hf_dict(cls, cfg: Mapping[str, Any]) -> "LlamaConfig":
        model_type = cfg.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ModelError(
                f"model_type {model_type!r} is not supported; expected one of {SUPPORTED_MODEL_TYPES}"
            )
        act = cfg.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise ModelError(f"hidden_act {act!r} is not supported; expected 'silu'")
        try:
            num_heads = int(cfg["num_attention_heads"])
            hidden = int(cfg["hidden_size"])
            num_layers = int(cfg["num_hidden_layers"])
            vocab = int(cfg["vocab_size"])
            inter = int(cfg["intermediate_size"])
        except KeyError as e:
            raise ModelError(f"config.json lacks required field {e.args[0]!r}") from None
        head_dim = cfg.get("head_dim") or hidden // num_heads
        rope = dict(cfg.get("rope_parameters") or {})
        legacy = cfg.get("rope_scaling") or {}
        rope.update({k: v for k, v in legacy.items() if k not in rope})
        if "type" in rope and "rope_type" not in rope:
            rope["rope_type"] = rope.pop("type")
        rope_theta = float(rope.pop("rope_theta", cfg.get("rope_theta", 10000.0)))
        rope.setdefault("rope_type", "default")
        if rope["rope_type"] == "llama3":
            rope.setdefault("original_max_position_embeddings", cfg.get("max_position_embeddings"))
        rope = {k: v for k, v in rope.items() if v is not None}

        windows = _sliding_windows(cfg, model_type, num_layers)
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (int(eos),))
        return cls(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=inter,
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or num_heads),
            head_dim=int(head_dim),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=tuple(sorted(rope.items())),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", model_type == "qwen2")),
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            sliding_windows=windows,
            model_type=model_type,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            pad_token_id=cfg.get("pad_token_id"),
            torch_dtype=str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32"),
        )

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "LlamaConfig":
        if not os.path.isfile(path):
            raise NotFoundError(f"config file {os.fspath(path)!r} does not exist")
        try:
            with open(path, encoding="utf-8") as f:
                cfg = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ModelError(f"config file {os.fspath(path)!r} is not valid JSON: {e}") from None
        if not isinstance(cfg, dict):
            raise ModelError(f"config file {os.fspath(path)!r} holds {type(cfg).__name__}, expected an object")
        return cls.from_hf_dict(cfg)


def _sliding_windows(cfg: Mapping[str, Any], model_type: str, num_layers: int) -> tuple[Optional[int], ...]:
    window = cfg.get("sliding_window")
    if model_type == "llama":
        return (None,) * num_layers
    if model_type == "qwen2":
        if not cfg.get("use_sliding_window", False) or window is None:
            return (None,) * num_layers
        layer_types = cfg.get("layer_types")
        if layer_types is None:
            start = int(cfg.get("max_window_layers", num_layers))
            layer_types = ["sliding_attention" if i >= start else "full_attention" for i in range(num_layers)]
        return tuple(int(window) if t == "sliding_attention" else None for t in layer_types)
    # mistral
    return (None if window is None else int(window),) * num_layers
