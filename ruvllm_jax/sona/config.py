"""SONA's static configuration and result types (RuvLLM's names), all frozen and checked on creation.

The quality rule: a rating q in [0, 1] is turned into the advantage `q - neutral_quality` (0.5 by
default), with no running baseline. A rating above the neutral point raises the response's
log-likelihood, one below lowers it, one at it teaches nothing. A stream rated 0.9 keeps teaching for
as long as it lasts (a baseline that converges to the ratings would silence it), and a stream rated
0.1 keeps pushing away.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import numbers
from typing import Optional

from ruvllm_jax.errors import ConfigError
from ruvllm_jax.lora.config import MicroLoraConfig


class ConsolidationStrategy(enum.Enum):
    """How `background_consolidate` merges the pending instant updates into the consolidated adapter."""

    EwcMerge = "ewc_merge"  # the instant updates, then optax steps on the pending samples with the EWC++ penalty
    Average = "average"  # the mean of the per-sample instant updates
    QualityWeighted = "quality_weighted"  # their mean weighted by each sample's quality
    BestOnly = "best_only"  # the update of the best-rated sample alone
    Ensemble = "ensemble"  # a new member = the averaged update; outputs of the last members averaged

    @classmethod
    def parse(cls, v) -> "ConsolidationStrategy":
        if isinstance(v, cls):
            return v
        for s in cls:
            if v in (s.name, s.value):
                return s
        raise ConfigError(f"consolidation_strategy must be one of {[s.name for s in cls]}, got {v!r}")


def _number(owner: str, name: str, v, *, lo: float = -math.inf, hi: float = math.inf, lo_open: bool = False,
            integer: bool = False) -> None:
    kind = numbers.Integral if integer else numbers.Real
    ok = not isinstance(v, bool) and isinstance(v, kind) and math.isfinite(float(v))
    ok = ok and (v > lo if lo_open else v >= lo) and v <= hi
    if not ok:
        want = "an integer" if integer else "a finite number"
        bounds = f"{'>' if lo_open else '>='} {lo}" + ("" if hi == math.inf else f" and <= {hi}")
        raise ConfigError(f"{owner}.{name} must be {want} {bounds}, got {v!r}")


@dataclasses.dataclass(frozen=True)
class TrainingConfig:
    """The deep loop's optimizer (the project's training step: clip + AdamW, warmup then cosine decay)."""

    learning_rate: float = 1e-3
    warmup_steps: int = 5
    decay_to: float = 0.1  # cosine decay from learning_rate to decay_to * learning_rate over the run
    grad_clip: float = 1.0
    weight_decay: float = 0.0
    batch_size: int = 8
    epochs: int = 1
    ewc_lambda: float = 1000.0  # weight of the EWC++ penalty (lambda / 2) * sum F (theta - theta*)^2; 0 = off
    # ours: weight of the anchor KL, EWC's exact function-space form (KL(anchor || theta) on sequences the
    # model sampled at the last refresh; `functional.anchor_kl`), and its replay rows per step; 0 = off
    kl_lambda: float = 10.0
    replay_batch: int = 4

    def __post_init__(self):
        o = "TrainingConfig"
        _number(o, "learning_rate", self.learning_rate, lo=0)
        _number(o, "warmup_steps", self.warmup_steps, lo=0, integer=True)
        _number(o, "decay_to", self.decay_to, lo=0, hi=1)
        _number(o, "grad_clip", self.grad_clip, lo=0, lo_open=True)
        _number(o, "weight_decay", self.weight_decay, lo=0)
        _number(o, "batch_size", self.batch_size, lo=1, integer=True)
        _number(o, "epochs", self.epochs, lo=1, integer=True)
        _number(o, "ewc_lambda", self.ewc_lambda, lo=0)
        _number(o, "kl_lambda", self.kl_lambda, lo=0)
        _number(o, "replay_batch", self.replay_batch, lo=1, integer=True)


@dataclasses.dataclass(frozen=True)
class SonaLlmConfig:
    """RuvLLM's SONA fields and defaults, plus what a real model needs (marked "ours").

    `micro_lora` None: rank-2 Q/V adapters (alpha 4) for the backend's model.
    """

    micro_lora: Optional[MicroLoraConfig] = None
    training: TrainingConfig = TrainingConfig()
    instant_lr: float = 0.01
    background_interval_ms: int = 100
    background_min_samples: int = 10
    deep_trigger_threshold: float = 100.0
    max_pending_samples: int = 1000
    consolidation_strategy: ConsolidationStrategy = ConsolidationStrategy.EwcMerge
    # -- ours ---------------------------------------------------------------------------------------
    neutral_quality: float = 0.5  # advantage = quality - neutral_quality (see the module docstring)
    instant_layers: Optional[int] = None  # the instant gradient reaches the adapters of the last n layers
    instant_optimizer: str = "sgd"  # "sgd" or "adam", before the -instant_lr step
    background_lr: float = 1e-3  # EwcMerge's Adam steps
    background_epochs: int = 1  # EwcMerge's passes over the pending samples
    ensemble_size: int = 4  # Ensemble: members kept
    fisher_decay: float = 0.5  # EWC++: F <- (1 - decay) F + decay F_new at each refresh
    fisher_samples: int = 8  # sequences sampled from the model to estimate what it knows (0: none)
    fisher_sample_tokens: int = 64
    fisher_prompt: str = "\n"  # what the Fisher's samples continue (a BOS is added if the tokenizer adds one)
    seed: int = 0

    def __post_init__(self):
        o = "SonaLlmConfig"
        if self.micro_lora is not None and not isinstance(self.micro_lora, MicroLoraConfig):
            raise ConfigError(f"{o}.micro_lora must be a MicroLoraConfig or None, got {self.micro_lora!r}")
        if not isinstance(self.training, TrainingConfig):
            raise ConfigError(f"{o}.training must be a TrainingConfig, got {self.training!r}")
        object.__setattr__(self, "consolidation_strategy", ConsolidationStrategy.parse(self.consolidation_strategy))
        _number(o, "instant_lr", self.instant_lr, lo=0)
        _number(o, "background_interval_ms", self.background_interval_ms, lo=0, integer=True)
        _number(o, "background_min_samples", self.background_min_samples, lo=1, integer=True)
        _number(o, "deep_trigger_threshold", self.deep_trigger_threshold, lo=0)
        _number(o, "max_pending_samples", self.max_pending_samples, lo=1, integer=True)
        _number(o, "neutral_quality", self.neutral_quality, lo=0, hi=1)
        if self.instant_layers is not None:
            _number(o, "instant_layers", self.instant_layers, lo=1, integer=True)
        if self.instant_optimizer not in ("sgd", "adam"):
            raise ConfigError(f"{o}.instant_optimizer must be 'sgd' or 'adam', got {self.instant_optimizer!r}")
        _number(o, "background_lr", self.background_lr, lo=0)
        _number(o, "background_epochs", self.background_epochs, lo=1, integer=True)
        _number(o, "ensemble_size", self.ensemble_size, lo=1, integer=True)
        _number(o, "fisher_decay", self.fisher_decay, lo=0, lo_open=True, hi=1)
        _number(o, "fisher_samples", self.fisher_samples, lo=0, integer=True)
        _number(o, "fisher_sample_tokens", self.fisher_sample_tokens, lo=1, integer=True)
        if not isinstance(self.fisher_prompt, str) or not self.fisher_prompt:
            raise ConfigError(f"{o}.fisher_prompt must be a non-empty str, got {self.fisher_prompt!r}")
        _number(o, "seed", self.seed, lo=0, hi=2 ** 32 - 1, integer=True)


@dataclasses.dataclass(frozen=True)
class TrainingSample:
    """One served exchange with its rating in [0, 1]."""

    request: str
    response: str
    quality: float


@dataclasses.dataclass(frozen=True)
class AdaptationResult:
    """What one loop did. `quality_delta` is measured: the change of the mean log-prob per token of the
    responses it learned from (instant: that response; background: the pending ones; deep: the dataset)."""

    applied: bool
    latency_us: int
    quality_delta: float = 0.0
    samples_used: int = 0
    loop: str = "instant"
    logprob_before: float = 0.0
    logprob_after: float = 0.0
    message: str = ""


@dataclasses.dataclass(frozen=True)
class LearningLoopStats:
    """Counters of the three loops and the state of the learned adapters (measured from the arrays)."""

    instant_updates: int
    background_runs: int
    deep_runs: int
    samples_seen: int
    pending_samples: int
    dropped_samples: int
    accumulated_quality: float
    mean_instant_latency_us: float
    ensemble_members: int
    consolidated_norm: float
    instant_norm: float
    fisher_mass: float
    strategy: str
