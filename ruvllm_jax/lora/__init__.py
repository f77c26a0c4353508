"""MicroLoRA and EWC++: rank-1/2 adapters that learn from feedback and change what the model writes.

`MicroLoRA` is the stateful facade; `functional` (init / forward / adapt / accumulate /
apply_updates / apply_updates_with_ewc) and `ewc` (EwcState, update_fisher, reanchor, consolidate)
are the pure, jittable layer; `objective` gives the model's own gradient estimate for a response;
`peft_io` reads and writes PEFT folders; `checkpoint` saves and restores with orbax.
"""

from ruvllm_jax.lora import checkpoint, ewc, functional, objective, peft_io
from ruvllm_jax.lora.config import (
    ALL_MODULES,
    AdaptFeedback,
    MicroLoraConfig,
    MicroLoraStats,
    TargetModule,
    module_dims,
)
from ruvllm_jax.lora.ewc import EwcState
from ruvllm_jax.lora.functional import LoraState
from ruvllm_jax.lora.micro_lora import MicroLoRA

__all__ = [
    "ALL_MODULES", "AdaptFeedback", "EwcState", "LoraState", "MicroLoRA", "MicroLoraConfig", "MicroLoraStats",
    "TargetModule", "checkpoint", "ewc", "functional", "module_dims", "objective", "peft_io",
]
