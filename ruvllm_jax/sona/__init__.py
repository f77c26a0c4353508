"""SONA: a served model that learns from feedback on three time scales, on the real model.

`SonaLlm` is the stateful facade (serving, the three loops, stats, checkpoint, PEFT export);
`functional` holds the pure, jittable layer (`SonaState`, the instant step, the merges, EWC++ and the
adapter loss the background and deep loops train with); `config` the frozen configuration and results.
"""

from ruvllm_jax.sona import functional
from ruvllm_jax.sona.config import (
    AdaptationResult,
    ConsolidationStrategy,
    LearningLoopStats,
    SonaLlmConfig,
    TrainingConfig,
    TrainingSample,
)
from ruvllm_jax.sona.functional import SonaState
from ruvllm_jax.sona.sona_llm import SonaLlm

__all__ = [
    "AdaptationResult", "ConsolidationStrategy", "LearningLoopStats", "SonaLlm", "SonaLlmConfig", "SonaState",
    "TrainingConfig", "TrainingSample", "functional",
]
