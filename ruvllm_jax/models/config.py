"""Static description of a Llama-family decoder, read from a Hugging Face `config.json`.

`LlamaConfig` is a frozen, hashable dataclass so it can be a static jit argument. It covers the
differences between the supported families: Qwen2's QKV bias, Mistral's and Qwen2's sliding windows,
tied embeddings, explicit `head_dim`, and the RoPE variants (default, linear, llama3).
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Mapping, Optional

import numpy as np

from ruvllm_jax.errors import ModelError, NotFoundError
from ruvllm_jax.kernels.config import AttentionConfig
from ruvllm_jax.models.json_io import read_json

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
    def from_hf_dict(cls, cfg: Mapping[str, Any], source: str = "config.json") -> "LlamaConfig":
        """Read a transformers `config.json` object; every field read is type- and range-checked, and
        each bad one raises `ModelError` naming `source`, the field and the value."""
        if not isinstance(cfg, Mapping):
            raise ModelError(f"{source} holds {_show(cfg)}, expected an object")
        model_type = cfg.get("model_type")
        if not isinstance(model_type, str) or model_type not in SUPPORTED_MODEL_TYPES:
            raise ModelError(
                f"{source}: model_type {_show(model_type)} is not supported; expected one of {SUPPORTED_MODEL_TYPES}"
            )
        act = cfg.get("hidden_act", "silu")
        if not isinstance(act, str) or act not in ("silu", "swish"):
            raise ModelError(f"{source}: hidden_act {_show(act)} is not supported; expected 'silu'")
        f = _Fields(cfg, source)
        num_heads = f.pos_int("num_attention_heads", required=True)
        hidden = f.pos_int("hidden_size", required=True)
        num_layers = f.pos_int("num_hidden_layers", required=True)
        vocab = f.pos_int("vocab_size", required=True)
        inter = f.pos_int("intermediate_size", required=True)
        num_kv_heads = f.pos_int("num_key_value_heads", default=num_heads)
        if num_heads % num_kv_heads:
            raise ModelError(
                f"{source}: num_attention_heads={num_heads} is not a multiple of num_key_value_heads={num_kv_heads}"
            )
        head_dim = f.pos_int("head_dim", default=None)
        if head_dim is None:
            if hidden % num_heads:
                raise ModelError(
                    f"{source}: hidden_size={hidden} is not a multiple of num_attention_heads={num_heads} "
                    f"and head_dim is not given"
                )
            head_dim = hidden // num_heads
            derived = f" (hidden_size={hidden} / num_attention_heads={num_heads})"
        else:
            derived = ""
        if head_dim % 2:
            raise ModelError(f"{source}: head_dim {head_dim}{derived} is odd; RoPE rotates pairs, so it must be even")
        max_pos = f.pos_int("max_position_embeddings", default=2048, allow_none=False)
        rope_theta, rope = _rope(cfg, source, max_pos)
        windows = _sliding_windows(cfg, model_type, num_layers, source)
        eos = cfg.get("eos_token_id")
        eos_ids = token_ids(eos, vocab, source, "eos_token_id")
        dtype_field = "dtype" if cfg.get("dtype") is not None else "torch_dtype"
        torch_dtype = cfg.get(dtype_field)
        if torch_dtype is not None and not isinstance(torch_dtype, str):
            raise ModelError(f"{source}: field {dtype_field!r} is {_show(torch_dtype)}, expected a dtype name")
        return cls(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=inter,
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            rms_norm_eps=f.pos_float("rms_norm_eps", default=1e-6),
            rope_theta=rope_theta,
            rope_scaling=tuple(sorted(rope.items())),
            max_position_embeddings=max_pos,
            tie_word_embeddings=f.boolean("tie_word_embeddings", False),
            attention_bias=f.boolean("attention_bias", model_type == "qwen2"),
            mlp_bias=f.boolean("mlp_bias", False),
            sliding_windows=windows,
            model_type=model_type,
            bos_token_id=f.token_id("bos_token_id", vocab),
            eos_token_ids=eos_ids,
            pad_token_id=f.token_id("pad_token_id", vocab),
            torch_dtype=torch_dtype or "float32",
        )

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "LlamaConfig":
        if not os.path.isfile(path):
            raise NotFoundError(f"config file {os.fspath(path)!r} does not exist")
        cfg = read_json(path, "config file")
        if not isinstance(cfg, dict):
            raise ModelError(f"config file {os.fspath(path)!r} holds {type(cfg).__name__}, expected an object")
        return cls.from_hf_dict(cfg, source=os.fspath(path))


# Dimensions, layer counts and token ids index int32 arrays in XLA.
INT_LIMIT = 1 << 31
# eps, rope_theta and the RoPE factors are used as float32.
_FLOAT32_MAX = float(np.finfo(np.float32).max)
_FLOAT32_TINY = float(np.finfo(np.float32).tiny)  # 2**-126; below it float32 loses precision, then rounds to 0
_POSITIVE = "a positive finite number in [2**-126, 3.4e38] (used as float32)"
_ROPE_KEYS = {
    "default": (),
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


def _show(value: Any, limit: int = 80) -> str:
    r = repr(value)
    return r if len(r) <= limit else r[: limit - 3] + "..."


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _positive_float(v: Any) -> Optional[float]:
    """`v` as a float if it is a positive number that float32 holds as a normal number, else None."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    try:
        x = float(v)
    except OverflowError:
        return None
    return x if _FLOAT32_TINY <= x <= _FLOAT32_MAX else None  # NaN fails both comparisons


def token_ids(value: Any, vocab_size: int, source: str, field: str) -> tuple[int, ...]:
    """An `eos_token_id`-style field (None, an int, or a list of ints, each in [0, vocab_size)) as a tuple."""
    ids = () if value is None else value if isinstance(value, (list, tuple)) else [value]
    if not all(_is_int(t) and 0 <= t < vocab_size for t in ids):
        raise ModelError(
            f"{source}: field {field!r} is {_show(value)}, expected a token id or a list of token ids "
            f"in [0, vocab_size={vocab_size})"
        )
    return tuple(ids)


class _Fields:
    """Typed reads of one config object's fields; a bad value raises `ModelError` naming source, field, value."""

    def __init__(self, cfg: Mapping[str, Any], source: str):
        self.cfg, self.source = cfg, source

    def bad(self, field: str, value: Any, expected: str) -> ModelError:
        return ModelError(f"{self.source}: field {field!r} is {_show(value)}, expected {expected}")

    def pos_int(self, field: str, *, required: bool = False, default: Any = None, allow_none: bool = True) -> Any:
        """A positive int below 2**31; absent (or null when `allow_none`) gives `default`."""
        if field not in self.cfg:
            if required:
                raise ModelError(f"{self.source} lacks required field {field!r}")
            return default
        v = self.cfg[field]
        if v is None and allow_none and not required:
            return default
        if not _is_int(v) or not 0 < v < INT_LIMIT:
            raise self.bad(field, v, "a positive int below 2**31")
        return v

    def pos_float(self, field: str, *, default: float) -> float:
        v = self.cfg.get(field, default)
        x = _positive_float(v)
        if x is None:
            raise self.bad(field, v, _POSITIVE)
        return x

    def boolean(self, field: str, default: bool) -> bool:
        v = self.cfg.get(field, default)
        if not isinstance(v, bool):
            raise self.bad(field, v, "true or false")
        return v

    def token_id(self, field: str, vocab_size: int) -> Optional[int]:
        v = self.cfg.get(field)
        if v is not None and (not _is_int(v) or not 0 <= v < vocab_size):
            raise self.bad(field, v, f"null or a token id in [0, vocab_size={vocab_size})")
        return v


def _rope(cfg: Mapping[str, Any], source: str, max_pos: int) -> tuple[float, dict[str, Any]]:
    """(rope_theta, RoPE scaling dict) from `rope_parameters` (transformers >= 5) over legacy `rope_scaling`."""
    where: dict[str, str] = {}  # key -> the field it came from, for messages
    rope: dict[str, Any] = {}
    for field in ("rope_parameters", "rope_scaling"):
        d = cfg.get(field)
        if d is None:
            continue
        if not isinstance(d, Mapping):
            raise ModelError(f"{source}: field {field!r} is {_show(d)}, expected an object or null")
        for k, v in d.items():
            if k not in rope:
                rope[k], where[k] = v, field
    if "type" in rope and "rope_type" not in rope:
        rope["rope_type"], where["rope_type"] = rope.pop("type"), where["type"]

    def name(key: str) -> str:
        return f"{where[key]}.{key}" if key in where else key

    theta = rope.pop("rope_theta", cfg.get("rope_theta", 10000.0))
    rope_theta = _positive_float(theta)
    if rope_theta is None:
        raise ModelError(f"{source}: field {name('rope_theta')!r} is {_show(theta)}, expected {_POSITIVE}")
    rope = {k: v for k, v in rope.items() if v is not None}
    rope.setdefault("rope_type", "default")
    rope_type = rope["rope_type"]
    if not isinstance(rope_type, str) or rope_type not in SUPPORTED_ROPE_TYPES:
        raise ModelError(
            f"{source}: field {name('rope_type')!r}: rope_type {_show(rope_type)} is not supported; "
            f"expected one of {SUPPORTED_ROPE_TYPES}"
        )
    if rope_type == "llama3":
        rope.setdefault("original_max_position_embeddings", max_pos)
    for key in _ROPE_KEYS[rope_type]:
        if key not in rope:
            field = where.get("rope_type", "rope_scaling")
            raise ModelError(f"{source}: rope_type {rope_type!r} needs {key!r} in {field}, which lacks it")
        v = rope[key]
        if key == "original_max_position_embeddings":
            ok = _is_int(v) and 0 < v < INT_LIMIT
            expected = "a positive int below 2**31"
        else:
            ok = _positive_float(v) is not None
            expected = _POSITIVE
        if not ok:
            raise ModelError(f"{source}: field {name(key)!r} is {_show(v)}, expected {expected}")
    if rope_type == "llama3" and not rope["high_freq_factor"] > rope["low_freq_factor"]:
        raise ModelError(
            f"{source}: llama3 RoPE needs high_freq_factor > low_freq_factor, got "
            f"high_freq_factor={rope['high_freq_factor']!r} and low_freq_factor={rope['low_freq_factor']!r}"
        )
    for k, v in rope.items():  # kept in the (hashable, jit-static) config: scalars only
        if not isinstance(k, str) or not (
            isinstance(v, (str, bool)) or _is_int(v) or (isinstance(v, float) and math.isfinite(v))
        ):
            raise ModelError(
                f"{source}: field {name(k)!r} is {_show(v)}, expected a string, a bool or a finite number"
            )
    return rope_theta, rope


def _sliding_windows(
    cfg: Mapping[str, Any], model_type: str, num_layers: int, source: str = "config.json"
) -> tuple[Optional[int], ...]:
    f = _Fields(cfg, source)
    window = f.pos_int("sliding_window", default=None)
    if model_type == "llama":
        return (None,) * num_layers
    if model_type == "qwen2":
        if not f.boolean("use_sliding_window", False) or window is None:
            return (None,) * num_layers
        layer_types = cfg.get("layer_types")
        if layer_types is None:
            start = cfg.get("max_window_layers", num_layers)
            if not _is_int(start) or not 0 <= start < INT_LIMIT:
                raise f.bad("max_window_layers", start, "a non-negative int below 2**31")
            layer_types = ["sliding_attention" if i >= start else "full_attention" for i in range(num_layers)]
        kinds = ("sliding_attention", "full_attention")
        if (
            not isinstance(layer_types, list) or len(layer_types) != num_layers
            or not all(isinstance(t, str) and t in kinds for t in layer_types)
        ):
            raise f.bad("layer_types", layer_types, f"a list of {num_layers} entries, each one of {kinds}")
        return tuple(window if t == "sliding_attention" else None for t in layer_types)
    # mistral
    return (window,) * num_layers
