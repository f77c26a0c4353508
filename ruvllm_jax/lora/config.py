"""Static description of MicroLoRA adapters: which modules, what dims, rank and scaling; feedback.

`MicroLoraConfig` keeps RuvLLM's fields (one `in_features`/`out_features` pair, as in RuvLLM's
single-vector API); `module_dims` gives the real per-module dims of a Llama-family model, which is
what an adapter attached to a model uses (K/V are narrower under GQA; gate/up/down use the MLP width).
"""

from __future__ import annotations

import dataclasses
import enum
import math
from typing import Any, Optional, Sequence

import numpy as np

from ruvllm_jax.errors import AdapterError, ConfigError


class TargetModule(enum.Enum):
    """A projection of a decoder layer that an adapter can modify. Value = the model's module key."""

    QProj = "q"
    KProj = "k"
    VProj = "v"
    OProj = "o"
    GateProj = "gate"
    UpProj = "up"
    DownProj = "down"

    @property
    def key(self) -> str:
        """Name in the adapters pytree that `models.llama` reads ("q", "k", ...)."""
        return self.value

    @property
    def peft_name(self) -> str:
        """The transformers submodule path, e.g. "self_attn.q_proj" or "mlp.down_proj"."""
        return _PEFT_NAMES[self]

    @classmethod
    def parse(cls, name: Any) -> "TargetModule":
        """A TargetModule from itself, its enum name ("QProj"), key ("q") or HF name ("q_proj")."""
        if isinstance(name, TargetModule):
            return name
        if isinstance(name, str):
            for m in cls:
                if name in (m.name, m.value, m.peft_name, m.peft_name.split(".")[-1]):
                    return m
        raise AdapterError(
            f"the model has no adaptable module {name!r}; supported: "
            f"{[m.peft_name.split('.')[-1] for m in cls]}"
        )


_PEFT_NAMES = {
    TargetModule.QProj: "self_attn.q_proj",
    TargetModule.KProj: "self_attn.k_proj",
    TargetModule.VProj: "self_attn.v_proj",
    TargetModule.OProj: "self_attn.o_proj",
    TargetModule.GateProj: "mlp.gate_proj",
    TargetModule.UpProj: "mlp.up_proj",
    TargetModule.DownProj: "mlp.down_proj",
}

ALL_MODULES: tuple[TargetModule, ...] = tuple(TargetModule)


def module_dims(model_cfg) -> dict[TargetModule, tuple[int, int]]:
    """(in, out) of each adaptable module of a `LlamaConfig`: what the module sees and produces."""
    d, i = model_cfg.hidden_size, model_cfg.intermediate_size
    return {
        TargetModule.QProj: (d, model_cfg.q_size),
        TargetModule.KProj: (d, model_cfg.kv_size),
        TargetModule.VProj: (d, model_cfg.kv_size),
        TargetModule.OProj: (model_cfg.q_size, d),
        TargetModule.GateProj: (d, i),
        TargetModule.UpProj: (d, i),
        TargetModule.DownProj: (i, d),
    }


def _module_list(targets: Any) -> tuple:
    """One module (a name or TargetModule) or an iterable of them, as a tuple."""
    if isinstance(targets, (str, TargetModule)):
        return (targets,)
    if isinstance(targets, (bytes, dict)) or not hasattr(targets, "__iter__"):
        raise ConfigError(f"target_modules must be a module name, a TargetModule or a list of them, got {targets!r}")
    return tuple(targets)


@dataclasses.dataclass(frozen=True)
class MicroLoraConfig:
    """RuvLLM's MicroLoRA configuration. Rank 1-2 is MicroLoRA proper; larger ranks are allowed."""

    in_features: int
    out_features: int
    rank: int = 2
    alpha: float = 4.0
    dropout: float = 0.0
    target_modules: tuple[TargetModule, ...] = (TargetModule.QProj, TargetModule.VProj)
    # Recompute the model's activations in the backward pass of `adapt_sequence` (jax.checkpoint)
    # instead of storing them: the gradient runs back through the whole frozen model.
    gradient_checkpointing: bool = False

    def __post_init__(self):
        for name in ("in_features", "out_features", "rank"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
                raise ConfigError(f"MicroLoraConfig.{name} must be a positive integer, got {v!r}")
        try:
            alpha_ok = not isinstance(self.alpha, bool) \
                and isinstance(self.alpha, (int, float, np.integer, np.floating)) and math.isfinite(self.alpha) \
                and abs(self.alpha / self.rank) <= float(np.finfo(np.float32).max)
        except OverflowError:  # an int beyond float range
            alpha_ok = False
        if not alpha_ok:
            raise ConfigError(f"MicroLoraConfig.alpha must be a finite number (alpha / rank finite in float32), "
                              f"got {self.alpha!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float, np.floating)) \
                or not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"MicroLoraConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if not isinstance(self.gradient_checkpointing, bool):
            raise ConfigError(
                f"MicroLoraConfig.gradient_checkpointing must be a bool, got {self.gradient_checkpointing!r}")
        targets = _module_list(self.target_modules)
        targets = tuple(dict.fromkeys(TargetModule.parse(t) for t in targets))
        if not targets:
            raise ConfigError("MicroLoraConfig.target_modules is empty; name at least one module")
        object.__setattr__(self, "target_modules", targets)

    @property
    def scaling(self) -> float:
        return float(self.alpha) / self.rank

    @classmethod
    def for_hidden_dim(cls, hidden_dim: int) -> "MicroLoraConfig":
        """RuvLLM's default: rank 2, alpha 4.0, Q and V, hidden_dim -> hidden_dim."""
        return cls(in_features=hidden_dim, out_features=hidden_dim)

    @classmethod
    def for_model(
        cls, model_cfg, *, rank: int = 2, alpha: float = 4.0, dropout: float = 0.0,
        target_modules: Sequence[Any] = (TargetModule.QProj, TargetModule.VProj),
    ) -> "MicroLoraConfig":
        """A config for a `LlamaConfig`; per-module dims come from `module_dims(model_cfg)`."""
        d = getattr(model_cfg, "hidden_size", None)
        if d is None:
            raise ConfigError(f"model_cfg must be a LlamaConfig, got {model_cfg!r}")
        return cls(in_features=d, out_features=d, rank=rank, alpha=alpha, dropout=dropout,
                   target_modules=_module_list(target_modules))


@dataclasses.dataclass(frozen=True)
class AdaptFeedback:
    """Feedback for one `adapt` call (RuvLLM's fields).

    `gradient_estimate` is the objective's gradient at the adapted module's output (len = out dim);
    `reward`, when given, is the advantage itself; otherwise quality minus a running baseline is.
    """

    quality: float
    gradient_estimate: Optional[Any] = None
    reward: Optional[float] = None
    latency_us: int = 0
    source_module: Optional[TargetModule] = None
    session_id: Optional[str] = None

    @classmethod
    def from_quality(cls, quality: float) -> "AdaptFeedback":
        return cls(quality=quality)


@dataclasses.dataclass(frozen=True)
class MicroLoraStats:
    """Counters and norms of a MicroLoRA's state (all measured from the arrays, nothing assumed)."""

    updates_applied: int
    samples_accumulated: int
    pending_samples: int
    baseline: float
    a_norm: float
    b_norm: float
    grad_norm: float
    fisher_mass: float
    num_parameters: int
