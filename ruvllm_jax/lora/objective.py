"""The objective MicroLoRA learns from in a model: log p(response | prompt) through the adapters.

`sequence_gradients` returns J and ∇_θ J for the adapter params θ. Because each adapter's output is
added to its module's output y_t, ∇_θ J = Σ_t ∇_θ <g_t, ΔW(x_t)> with g_t = dJ/dy_t: the batched form
of `adapt` with the model's own gradient estimate at every position, module and layer.

Sequences are padded to a power-of-two bucket (causal attention ignores the padding after them), so
one compilation serves all lengths in a bucket.
"""

from __future__ import annotations

import functools
import numbers
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ruvllm_jax.errors import AdapterError
from ruvllm_jax.models import llama
from ruvllm_jax.models.config import LlamaConfig
from ruvllm_jax.quant.tensor import QuantizedTensor

MIN_BUCKET = 16


def _bucket(n: int) -> int:
    return max(MIN_BUCKET, 1 << max(0, (n - 1).bit_length()))


def check_token_ids(name: str, ids, vocab_size: int) -> list[int]:
    """A non-empty 1-D sequence (list, tuple or integer array) of ints in [0, vocab_size); bools and
    floats (even 3.0) are refused, never truncated. Raises `AdapterError` naming the value."""
    from ruvllm_jax.lora.functional import describe

    if isinstance(ids, (str, bytes)) or not isinstance(ids, (list, tuple, range, np.ndarray, jax.Array)):
        raise AdapterError(f"{name} must be a list or 1-D integer array of token ids, got {describe(ids)}")
    if isinstance(ids, (np.ndarray, jax.Array)):
        if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
            raise AdapterError(f"{name} must be a 1-D integer array of token ids, got {describe(ids)}")
        ids = np.asarray(ids).tolist()
    else:
        bad = [t for t in ids if isinstance(t, (bool, np.bool_)) or not isinstance(t, numbers.Integral)]
        if bad:
            raise AdapterError(f"{name} must hold integer token ids, got {describe(bad[:5])} in {describe(ids)}")
        ids = [int(t) for t in ids]
    if not ids:
        raise AdapterError(f"{name} is empty; a prompt and a response need at least one token each")
    out = [t for t in ids if not 0 <= t < vocab_size]
    if out:
        raise AdapterError(f"{name}: token ids must be in [0, {vocab_size}), got {out[:5]}")
    return ids


def check_model_params(params, cfg: LlamaConfig) -> None:
    """Raise `AdapterError` unless `params` has the structure, shapes and float dtypes that
    `models.llama` reads for `cfg` (what `loader.load_params(folder, cfg)` returns): a model of
    another size or family, or a tree missing or adding keys, is refused before any tracing."""
    from ruvllm_jax.lora.functional import describe

    d, inter, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    qkv = cfg.q_size + 2 * cfg.kv_size
    top = {"embed": (v, d), "final_norm": (d,)}
    if not cfg.tie_word_embeddings:
        top["lm_head"] = (v, d)
    layer_shapes = {"attn_norm": (d,), "wqkv": (qkv, d), "wo": (d, cfg.q_size), "mlp_norm": (d,),
                    "w_gate_up": (2 * inter, d), "w_down": (d, inter)}
    optional = {"bo": (d,)}
    if cfg.attention_bias:
        layer_shapes["bqkv"] = (qkv,)
    if cfg.mlp_bias:
        layer_shapes.update(b_gate_up=(2 * inter,), b_down=(d,))

    def leaf(where, x, shape):
        if isinstance(x, tuple) and len(shape) == 2 and x:  # a fused weight kept as parts (see models.llama)
            for j, part in enumerate(x):
                leaf(f"{where} part {j}", part, (getattr(part, "shape", (None,))[0], shape[1]))
            if sum(int(part.shape[0]) for part in x) != shape[0]:
                raise AdapterError(f"model params {where}: parts of {[tuple(p.shape) for p in x]} do not stack to "
                                   f"{shape}: these params belong to another model")
            return
        if isinstance(x, QuantizedTensor):
            if tuple(x.shape) != shape:
                raise AdapterError(f"model params {where} is {x!r}, the model config needs shape {shape}: these "
                                   f"params belong to another model")
            return
        if not isinstance(x, (np.ndarray, jax.Array)):
            raise AdapterError(f"model params {where} must be an array, got {describe(x)}")
        if tuple(x.shape) != shape or not jnp.issubdtype(x.dtype, jnp.floating):
            raise AdapterError(f"model params {where} is {describe(x)}, the model config needs a float array of "
                               f"shape {shape}: these params belong to another model")

    def keys(where, tree, required, allowed=()):
        if not isinstance(tree, dict):
            raise AdapterError(f"model params{where} must be a dict, got {describe(tree)}")
        missing, extra = set(required) - set(tree), set(tree) - set(required) - set(allowed)
        if missing or extra:
            raise AdapterError(f"model params{where} lack {sorted(missing)} / have unexpected {sorted(extra)} for "
                               f"this model config: these params belong to another model")

    keys("", params, {*top, "layers"})
    for k, shape in top.items():
        leaf(repr(k), params[k], shape)
    layers = params["layers"]
    if not isinstance(layers, (list, tuple)) or len(layers) != cfg.num_layers:
        raise AdapterError(f"model params 'layers' must be a list of {cfg.num_layers} layers, got {describe(layers)}")
    for i, lp in enumerate(layers):
        keys(f" layer {i}", lp, layer_shapes, optional)
        for k, x in lp.items():
            leaf(f"layer {i} {k!r}", x, {**layer_shapes, **optional}[k])


def pack(prompt_ids: Sequence[int], response_ids: Sequence[int], vocab_size: int,
         max_length: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
    """tokens [S] (prompt + response, zero-padded) and weights [S]: 1 where a response token is predicted.

    Both id lists are checked by `check_token_ids`; with `max_length`, prompt + response longer than
    it (the model's max_position_embeddings) raise `AdapterError` rather than being cut."""
    prompt_ids = check_token_ids("prompt_ids", prompt_ids, vocab_size)
    response_ids = check_token_ids("response_ids", response_ids, vocab_size)
    ids = prompt_ids + response_ids
    if max_length is not None and len(ids) > max_length:
        raise AdapterError(f"prompt + response are {len(prompt_ids)} + {len(response_ids)} = {len(ids)} tokens, "
                           f"more than the model's max_position_embeddings {max_length}")
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
