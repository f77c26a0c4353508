"""Training and scoring for the params pytree: BPE tokenizer (`bpe`), data, train step/loop, sliding-window
scoring (`scoring`).

The loop is `ruvllm_jax.training.train.train` (not re-exported: the name is its module's).
Everything here runs the same `ruvllm_jax.models.llama.forward` that inference uses.
"""

from ruvllm_jax.training.data import sample_windows, split_train_val
from ruvllm_jax.training.scoring import bits_per_byte, score_text
from ruvllm_jax.training.train import (
    LoopConfig,
    OptimConfig,
    TrainState,
    init_train_state,
    make_optimizer,
    make_train_step,
)

__all__ = [
    "LoopConfig", "OptimConfig", "TrainState", "bits_per_byte", "init_train_state", "make_optimizer",
    "make_train_step", "sample_windows", "score_text", "split_train_val",
]
