"""SONA as pure functions over a `SonaState` pytree: the instant step, the merges, EWC++ and the
adapter training step of the background and deep loops. Everything that touches arrays jits.

What the served model applies. The consolidated adapter is a tuple of `members` (one, or the last
`ensemble_size` for `Ensemble`), each a MicroLoRA params tree {"layers": ({key: {"A", "B"}}, ...)};
the instant adapter is a `delta` on the newest ("live") member's params. The model sees the average
of the members' outputs, the live one at `live + delta`:

    ΔW(x) = (scaling / K) · Σ_m (x @ A_m) @ B_m

which is one LoRA of rank K·r (A's concatenated along the rank axis, B's stacked) with scaling s/K:
that is how `served_adapters` hands it to `models.llama`, and how `export_peft` writes it.

The objective of every loop is the advantage-weighted mean log-prob per token of a response given
its request, `adv · mean_t log p(response_t | request, response_<t)`, adv = quality - neutral (see
`ruvllm_jax.sona.config`). The EWC++ penalty is (λ/2)·Σ F·(θ − θ*)² on the live member, with F a
per-token Fisher (an EMA over refreshes) and θ* its anchor; `anchor_kl` is its exact function-space
form, KL(anchor ‖ θ) on sequences the model sampled at the last refresh.
"""

from __future__ import annotations

import functools
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from ruvllm_jax.lora import functional as lora_f
from ruvllm_jax.lora.config import MicroLoraConfig, module_dims
from ruvllm_jax.models import llama
from ruvllm_jax.models.config import LlamaConfig
from ruvllm_jax.sona.config import ConsolidationStrategy

Tree = Any


@struct.dataclass
class SonaState:
    members: tuple  # consolidated adapters, oldest first; the last one is live
    delta: Tree  # the instant adapter: a delta on the live member's params
    scaling: jax.Array  # f32 []: alpha / rank of one member
    instant_opt: Tree  # the instant optimizer's state (over delta)
    fisher: Tree  # per-token Fisher of the live member's params (>= 0)
    anchor: Tree  # θ*: the live member's params at the last refresh
    fisher_updates: jax.Array  # i32 []: refreshes folded into `fisher`
    replay_tokens: jax.Array  # i32 [N, S]: sequences sampled from the model at the last refresh
    replay_weights: jax.Array  # f32 [N, S]: 1 at the positions whose next token was sampled
    instant_optimizer: str = struct.field(pytree_node=False, default="sgd")


def _direction(name: str) -> optax.GradientTransformation:
    return optax.scale_by_adam() if name == "adam" else optax.identity()


def zeros_like(tree: Tree) -> Tree:
    return jax.tree.map(jnp.zeros_like, tree)


def init(key: jax.Array, model_cfg: LlamaConfig, lora_cfg: MicroLoraConfig, *, instant_optimizer: str = "sgd",
         device=None) -> SonaState:
    """One member of fresh MicroLoRA adapters (A seeded, B = 0: the base model), no instant delta,
    zero Fisher anchored there."""
    dims = {m.key: module_dims(model_cfg)[m] for m in lora_cfg.target_modules}
    member = lora_f.init(key, dims, model_cfg.num_layers, lora_cfg.rank, lora_cfg.alpha).params
    zeros = zeros_like(member)
    state = SonaState(members=(member,), delta=zeros, scaling=jnp.float32(lora_cfg.scaling),
                      instant_opt=_direction(instant_optimizer).init(zeros), fisher=zeros, anchor=member,
                      fisher_updates=jnp.int32(0), replay_tokens=jnp.zeros((0, 1), jnp.int32),
                      replay_weights=jnp.zeros((0, 1), jnp.float32), instant_optimizer=instant_optimizer)
    # Commit every leaf to one device, as jitted steps return them (a jit argument's placement is part
    # of its cache key: uncommitted fresh arrays would cost one extra compile after the first step).
    return jax.device_put(state, device or jax.devices()[0])


def add(a: Tree, b: Tree) -> Tree:
    return jax.tree.map(jnp.add, a, b)


def live(state: SonaState) -> Tree:
    """The live member with the instant delta applied."""
    return add(state.members[-1], state.delta)


def compose(frozen: Sequence[Tree], theta: Tree, scaling) -> dict:
    """The adapters tree `models.llama` applies for members `frozen + (theta,)`, outputs averaged."""
    members = (*frozen, theta)
    k = len(members)
    layers = []
    for i in range(len(theta["layers"])):
        layer = {}
        for key in theta["layers"][i]:
            mods = [m["layers"][i][key] for m in members]
            a = mods[0]["A"] if k == 1 else jnp.concatenate([m["A"] for m in mods], axis=1)
            b = mods[0]["B"] if k == 1 else jnp.concatenate([m["B"] for m in mods], axis=0)
            layer[key] = {"A": a, "B": b, "scaling": scaling / k}
        layers.append(layer)
    return {"layers": tuple(layers)}


def served_adapters(state: SonaState) -> dict:
    """What the served model applies now: the members averaged, the live one with the instant delta."""
    return compose(state.members[:-1], live(state), state.scaling)


def adapter_output(state: SonaState, x: jax.Array, module: str, layer: int = 0) -> jax.Array:
    """ΔW(x) of the served adapters for one module: x [..., in] -> [..., out]."""
    m = served_adapters(state)["layers"][layer][module]
    return ((x.astype(jnp.float32) @ m["A"]) @ m["B"]) * m["scaling"]


# -- log-probs ------------------------------------------------------------------------------------------------

def _mean_logprob(logits: jax.Array, tokens: jax.Array, weights: jax.Array) -> jax.Array:
    """Mean log p of the weighted next tokens per row: logits [B, S, V], tokens/weights [B, S] -> [B].

    weights[t] = 1 where tokens[t + 1] is a response token (`lora.objective.pack`)."""
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    tok = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    w = weights[:, :-1]
    return jnp.sum(tok * w, axis=-1) / jnp.maximum(jnp.sum(w, axis=-1), 1.0)


def mean_logprob(model_params, cfg: LlamaConfig, adapters, tokens: jax.Array, weights: jax.Array) -> jax.Array:
    """[B] mean log-prob per response token of each packed row under `adapters`."""
    return _mean_logprob(llama.forward(model_params, cfg, tokens, adapters=adapters), tokens, weights)


def _without_replay(state: SonaState) -> SonaState:
    """The state without its replay set: the serving-side steps never read it, and leaving it out of
    their arguments keeps a new replay shape from recompiling them."""
    return state.replace(replay_tokens=None, replay_weights=None)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _served_logprob(state: SonaState, model_params, tokens, weights, *, cfg: LlamaConfig) -> jax.Array:
    return mean_logprob(model_params, cfg, served_adapters(state), tokens, weights)


def served_logprob(state: SonaState, model_params, tokens, weights, *, cfg: LlamaConfig) -> jax.Array:
    """[B] mean log-prob per response token under the served adapters (jitted)."""
    return _served_logprob(_without_replay(state), model_params, tokens, weights, cfg=cfg)


# -- the instant loop -----------------------------------------------------------------------------------------

def instant_step(state: SonaState, model_params, tokens: jax.Array, weights: jax.Array, advantage, lr, *,
                 cfg: LlamaConfig, first_layer: int = 0):
    """One optax step on the instant delta (jitted; see `_instant_step`)."""
    new, update, before, after = _instant_step(_without_replay(state), model_params, tokens, weights, advantage,
                                               lr, cfg=cfg, first_layer=first_layer)
    return new.replace(replay_tokens=state.replay_tokens, replay_weights=state.replay_weights), update, before, after


@functools.partial(jax.jit, static_argnames=("cfg", "first_layer"))
def _instant_step(state: SonaState, model_params, tokens: jax.Array, weights: jax.Array, advantage, lr, *,
                  cfg: LlamaConfig, first_layer: int = 0):
    """One optax step on the instant delta: ascent on advantage · mean log p(response | request).

    tokens, weights [S] (`lora.objective.pack`). The gradient reaches the delta of layers
    >= `first_layer`; the layers below run once, without a gradient (their delta is kept).
    Returns (state, update, logprob_before, logprob_after): `update` is this sample's change of the
    delta (what `merge_updates` merges) and the log-probs are measured before and after it.
    """
    tokens, weights = tokens[None], weights[None]
    head = state.delta["layers"][:first_layer]
    h = llama.embed(model_params, tokens)
    h = jax.lax.stop_gradient(llama.run_layers(model_params, cfg, h, 0, first_layer,
                                               adapters=served_adapters(state)))

    def logprob(tail):
        ads = served_adapters(state.replace(delta={"layers": head + tail}))
        y = llama.run_layers(model_params, cfg, h, first_layer, cfg.num_layers, adapters=ads)
        return _mean_logprob(llama.head_logits(model_params, cfg, y), tokens, weights)[0]

    tail = state.delta["layers"][first_layer:]
    before, grad = jax.value_and_grad(logprob)(tail)
    loss_grad = {"layers": tuple(zeros_like(head)) + jax.tree.map(lambda g: -advantage * g, grad)}
    direction, opt = _direction(state.instant_optimizer).update(loss_grad, state.instant_opt, state.delta)
    update = jax.tree.map(lambda d: -lr * d, direction)
    delta = add(state.delta, update)
    # An update of zeros (a neutral rating) leaves the delta as it was, so its log-prob is `before`
    # exactly: a second forward, fused apart from value_and_grad's, would differ in the last bits.
    changed = jnp.any(jnp.stack([jnp.any(u != 0) for u in jax.tree.leaves(update)]))
    after = jax.lax.cond(changed, lambda: logprob(delta["layers"][first_layer:]), lambda: before)
    return state.replace(delta=delta, instant_opt=opt), update, before, after


# -- background merges ----------------------------------------------------------------------------------------

def merge_weights(strategy: ConsolidationStrategy, qualities: Sequence[float]) -> np.ndarray:
    """Weights [n] (summing to 1) of the per-sample updates for a merging strategy.

    Average / Ensemble: uniform. QualityWeighted: proportional to quality (uniform if all are 0).
    BestOnly: all on the best-rated sample (the earliest among equals)."""
    q = np.asarray(qualities, np.float64)
    n = len(q)
    if strategy is ConsolidationStrategy.BestOnly:
        w = np.zeros(n)
        w[int(np.argmax(q))] = 1.0
        return w
    if strategy is ConsolidationStrategy.QualityWeighted and q.sum() > 0:
        return q / q.sum()
    return np.full(n, 1.0 / n)


def merge_updates(updates: Sequence[Tree], weights: np.ndarray) -> Tree:
    """Σ_i weights[i] · updates[i]."""
    w = jnp.asarray(weights, jnp.float32)
    return jax.tree.map(lambda *xs: jnp.tensordot(w, jnp.stack(xs), axes=1), *updates)


def consolidate(state: SonaState, merged: Tree, *, new_member: bool, ensemble_size: int = 1) -> SonaState:
    """Fold `merged` into the live member and clear the instant delta (and its optimizer state).

    `new_member` (Ensemble): keep the live member as it was and append `live + merged` as the new
    live one, keeping the last `ensemble_size` members."""
    theta = add(state.members[-1], merged)
    members = (*state.members, theta)[-ensemble_size:] if new_member else (*state.members[:-1], theta)
    zeros = zeros_like(state.delta)
    return state.replace(members=members, delta=zeros, instant_opt=_direction(state.instant_optimizer).init(zeros))


def set_live(state: SonaState, theta: Tree) -> SonaState:
    """The live member becomes `theta`; the instant delta (already inside it) is cleared."""
    zeros = zeros_like(state.delta)
    return state.replace(members=(*state.members[:-1], theta), delta=zeros,
                         instant_opt=_direction(state.instant_optimizer).init(zeros))


# -- EWC++ and the adapter training step ----------------------------------------------------------------------

def ewc_penalty(theta: Tree, fisher: Tree, anchor: Tree, ewc_lambda) -> jax.Array:
    """(λ/2) · Σ F · (θ − θ*)²."""
    terms = jax.tree.map(lambda f, p, a: jnp.sum(f * (p - a) ** 2), fisher, theta, anchor)
    return 0.5 * ewc_lambda * sum(jax.tree.leaves(terms))


def anchor_kl(theta: Tree, cfg: LlamaConfig, model_params, frozen: tuple, scaling, anchor: Tree, tokens, weights):
    """Mean over the weighted positions of KL(p_anchor ‖ p_θ) on replay sequences tokens [R, S].

    The function-space form of the EWC penalty: on sequences sampled from the anchored model, the
    Fisher is this KL's Hessian at θ*, and (1/2)·Σ F·(θ − θ*)² is its diagonal quadratic approximation.
    Here it is exact, at the cost of a forward of the anchor and a forward + backward of the replay."""
    if tokens.shape[0] == 0:
        return jnp.float32(0.0)
    ref = jax.lax.stop_gradient(jax.nn.log_softmax(
        llama.forward(model_params, cfg, tokens, adapters=compose(frozen, anchor, scaling)), axis=-1))
    cur = jax.nn.log_softmax(llama.forward(model_params, cfg, tokens, adapters=compose(frozen, theta, scaling)),
                             axis=-1)
    kl = jnp.sum(jnp.exp(ref) * (ref - cur), axis=-1)
    return jnp.sum(kl * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def adapter_loss(theta: Tree, cfg: LlamaConfig, batch: dict, model_params, frozen: tuple, scaling, reg: dict):
    """−mean over real rows of advantage · mean log-prob, plus the EWC++ penalty and the anchor KL;
    (loss, rows).

    batch: tokens, weights [B, S], advantage [B], mask [B] (0 for padding rows). reg: fisher, anchor,
    ewc_lambda, kl_lambda, replay_tokens / replay_weights [R, S] (R = 0: no KL term). The signature is
    the one `training.train.make_train_step` takes a loss in: (params, cfg, batch, *frozen arguments)."""
    lp = mean_logprob(model_params, cfg, compose(frozen, theta, scaling), batch["tokens"], batch["weights"])
    rows = jnp.maximum(jnp.sum(batch["mask"]), 1.0)
    objective = jnp.sum(batch["advantage"] * batch["mask"] * lp) / rows
    penalty = ewc_penalty(theta, reg["fisher"], reg["anchor"], reg["ewc_lambda"])
    kl = anchor_kl(theta, cfg, model_params, frozen, scaling, reg["anchor"], reg["replay_tokens"],
                   reg["replay_weights"])
    return -objective + penalty + reg["kl_lambda"] * kl, rows


@functools.partial(jax.jit, static_argnames=("cfg",))
def fisher_estimate(theta: Tree, frozen: tuple, scaling, model_params, tokens, weights, *, cfg: LlamaConfig) -> Tree:
    """Per-token diagonal Fisher of the live member's params: mean over rows of (∇ Σ_t log p)² / T.

    On sequences sampled from the model this is the true Fisher (what the model knows); on a dataset,
    the empirical one (what it just learned). tokens, weights [N, S]."""

    def row(t, w):
        def total(th):
            return _mean_logprob(llama.forward(model_params, cfg, t[None], adapters=compose(frozen, th, scaling)),
                                 t[None], w[None])[0]
        n = jnp.maximum(jnp.sum(w[:-1]), 1.0)
        g = jax.grad(total)(theta)  # gradient of the mean; n · g is the gradient of the sum
        return jax.tree.map(lambda x: n * x * x, g)  # (n · g)² / n

    return jax.tree.map(lambda s: jnp.mean(s, axis=0), jax.vmap(row)(tokens, weights))


def refresh_fisher(state: SonaState, fisher_new: Tree, decay: float, replay_tokens=None,
                   replay_weights=None) -> SonaState:
    """EWC++: F <- (1 − decay)·F + decay·F_new (F_new alone the first time); anchor at the live member;
    the replay sequences replaced when given (those the Fisher was measured on, for the anchor KL)."""
    first = state.fisher_updates == 0
    fisher = jax.tree.map(lambda f, n: jnp.where(first, n, (1.0 - decay) * f + decay * n), state.fisher, fisher_new)
    state = state.replace(fisher=fisher, anchor=live(state), fisher_updates=state.fisher_updates + 1)
    if replay_tokens is not None:
        # committed to the state's device, like every other leaf (an uncommitted one recompiles the steps)
        device = list(state.scaling.devices())[0]
        state = state.replace(replay_tokens=jax.device_put(jnp.asarray(replay_tokens, jnp.int32), device),
                              replay_weights=jax.device_put(jnp.asarray(replay_weights, jnp.float32), device))
    return state


def batches(samples: Sequence[tuple[np.ndarray, np.ndarray, float]], batch_size: int,
            order: Optional[np.ndarray] = None) -> list[dict]:
    """Host batches of packed (tokens, weights, advantage) samples, `batch_size` rows each (the last
    padded with masked rows), every row padded to the longest of its batch: one compile per length."""
    order = np.arange(len(samples)) if order is None else order
    out = []
    for i in range(0, len(order), batch_size):
        chunk = [samples[j] for j in order[i:i + batch_size]]
        s = max(len(t) for t, _, _ in chunk)
        tokens = np.zeros((batch_size, s), np.int32)
        weights = np.zeros((batch_size, s), np.float32)
        adv = np.zeros((batch_size,), np.float32)
        mask = np.zeros((batch_size,), np.float32)
        for r, (t, w, a) in enumerate(chunk):
            tokens[r, :len(t)], weights[r, :len(w)], adv[r], mask[r] = t, w, a, 1.0
        out.append({"tokens": tokens, "weights": weights, "advantage": adv, "mask": mask})
    return out
