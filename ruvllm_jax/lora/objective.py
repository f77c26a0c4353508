"""The objective MicroLoRA learns from in a model: log p(response | prompt) through the adapters.

`sequence_gradients` returns J and ∇_θ J for the adapter params θ. Because each adapter's output is
added to its module's output y_t, ∇_θ J = Σ_t ∇_θ <g_t, ΔW(x_t)> with g_t = dJ/dy_t: the batched form
of `adapt` with the model's own gradient estimate at every position, module and layer.

Sequences are padded to a power-of-two bucket (causal attention ignores the padding after them), so
one compilation serves all lengths in a bucket.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ruvllm_jax.errors import AdapterError
from ruvllm_jax.models import llama
from ruvllm_jax.models.config import LlamaConfig

MIN_BUCKET = 16


def _bucket(n: int) -> int:
    return max(MIN_BUCKET, 1 << max(0, (n - 1).bit_length()))


def pack(prompt_ids: Sequence[int], response_ids: Sequence[int], vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """tokens [S] (prompt + response, zero-padded) and weights [S]: 1 where a response token is predicted."""
    prompt_ids, response_ids = list(prompt_ids), list(response_ids)
    if not prompt_ids or not response_ids:
        raise AdapterError(
            f"need a non-empty prompt and response, got {len(prompt_ids)} and {len(response_ids)} tokens"
        )
    ids = prompt_ids + response_ids
    bad = [t for t in ids if not 0 <= int(t) < vocab_size]
    if bad:
        raise AdapterError(f"token ids must be in [0, {vocab_size}), got {bad[:5]}")
    s = _bucket(len(ids))
    tokens = np.zeros((s,), np.int32)
    tokens[: len(ids)] = ids
    weights = np.zeros((s,), np.float32)  # weights[t] = 1 if tokens[t + 1] is a response token
    weights[len(prompt_ids) - 1 : len(ids) - 1] = 1.0
    return tokens, weights


def log_likelihood(lora_params: dict, scaling, model_params: dict, cfg: LlamaConfig, tokens, weights) -> jax.Array:
    """Σ_t weights[t] · log p(tokens[t+1] | tokens[:t+1]) with the adapters applied."""
    ads = {"layers": tuple({k: {**m, "scaling": scaling} for k, m in layer.items()} for layer in lora_params["layers"])}
    logits = llama.forward(model_params, cfg, tokens[None], adapters=ads)[0]
    logp = jax.nn.log_softmax(logits[:-1], axis=-1)
    token_logp = jnp.take_along_axis(logp, tokens[1:, None], axis=-1)[:, 0]
    return jnp.sum(token_logp * weights[:-1])


@functools.partial(jax.jit, static_argnames=("cfg", "remat"))
def sequence_gradients(lora_params: dict, scaling, model_params: dict, tokens, weights, *, cfg: LlamaConfig,
                       remat: bool = False):
    """(J, ∇_θ J) for the packed sequence; θ = the adapters' A and B (`LoraState.params`).

    `remat` (MicroLoraConfig.gradient_checkpointing) recomputes the forward's activations in the
    backward pass instead of keeping them: less memory for long sequences, one more forward.
    """
    fn = jax.checkpoint(log_likelihood, static_argnums=(3,)) if remat else log_likelihood
    return jax.value_and_grad(fn)(lora_params, scaling, model_params, cfg, tokens, weights)


@functools.partial(jax.jit, static_argnames=("cfg",))
def sequence_log_likelihood(lora_params: dict, scaling, model_params: dict, tokens, weights, *, cfg: LlamaConfig):
    return log_likelihood(lora_params, scaling, model_params, cfg, tokens, weights)
