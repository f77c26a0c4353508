"""Functional training for the Llama params pytree: state, optimizer, one jitted step, a loop.

`TrainState` is a plain pytree (params, optax state, step, rng). `make_train_step(cfg, optimizer)`
returns `train_step(state, batch) -> (state, metrics)`, jitted once per batch shape, with params
passed in (never closed over) and the state donated. The loss runs `llama.forward`, the same forward
inference uses, so there is one model definition. `train` is the loop: seedable batches, tqdm,
orbax checkpoints that resume to the bit-identical state, and a JSON loss curve.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import numbers
import os
import time
from typing import Any, Callable, Optional

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from ruvllm_jax.errors import ConfigError
from ruvllm_jax.models import llama
from ruvllm_jax.models.config import LlamaConfig
from ruvllm_jax.training.data import fixed_windows, sample_windows

Batch = jax.Array  # int32 [B, S + 1]: inputs are [:, :-1], targets [:, 1:]


@struct.dataclass
class TrainState:
    params: Any
    opt_state: Any
    step: jax.Array
    rng: jax.Array

    def as_dict(self) -> dict:
        return {"params": self.params, "opt_state": self.opt_state, "step": self.step, "rng": self.rng}


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    peak_lr: float = 3e-3
    end_lr_fraction: float = 0.1
    warmup_steps: int = 100
    total_steps: int = 1000
    b1: float = 0.9
    b2: float = 0.95
    weight_decay: float = 0.1
    grad_clip: float = 1.0

    def __post_init__(self):
        def number(name: str, ok: Callable[[float], bool], want: str) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or not ok(v):
                raise ConfigError(f"OptimConfig.{name} must be {want}, got {v!r}")

        number("peak_lr", lambda v: v >= 0, "a finite number >= 0")
        number("end_lr_fraction", lambda v: v >= 0, "a finite number >= 0")
        number("weight_decay", lambda v: v >= 0, "a finite number >= 0")
        number("grad_clip", lambda v: v > 0, "a finite number > 0")
        for name in ("b1", "b2"):
            number(name, lambda v: 0 <= v < 1, "in [0, 1)")
        for name in ("warmup_steps", "total_steps"):
            number(name, lambda v: isinstance(v, numbers.Integral) and v >= 0, "an integer >= 0")


def lr_schedule(oc: OptimConfig) -> optax.Schedule:
    """Linear warmup to `peak_lr`, then cosine decay to `end_lr_fraction * peak_lr`."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=oc.peak_lr,
        warmup_steps=max(1, oc.warmup_steps),
        decay_steps=max(oc.total_steps, oc.warmup_steps + 1),
        end_value=oc.peak_lr * oc.end_lr_fraction,
    )


def make_optimizer(oc: OptimConfig) -> optax.GradientTransformation:
    """Global-norm clipping then AdamW; weight decay only on matrices (not norms, not biases)."""
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)  # noqa: E731
    return optax.chain(
        optax.clip_by_global_norm(oc.grad_clip),
        optax.adamw(lr_schedule(oc), b1=oc.b1, b2=oc.b2, weight_decay=oc.weight_decay, mask=decay_mask),
    )


def init_train_state(cfg: LlamaConfig, optimizer: optax.GradientTransformation, seed: int) -> TrainState:
    init_key, rng = jax.random.split(jax.random.PRNGKey(seed))
    params = llama.init_params(cfg, init_key)
    return TrainState(params=params, opt_state=optimizer.init(params), step=jnp.zeros((), jnp.int32), rng=rng)


def next_token_loss(params, cfg: LlamaConfig, batch: Batch) -> tuple[jax.Array, jax.Array]:
    """Mean next-token cross-entropy (nats) and token count of `batch` [B, S + 1]."""
    inputs, targets = batch[:, :-1], batch[:, 1:]
    logits = llama.forward(params, cfg, inputs)
    chex.assert_shape(logits, (*inputs.shape, cfg.vocab_size))
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return nll.mean(), jnp.asarray(nll.size, jnp.float32)


def make_train_step(cfg: LlamaConfig, optimizer: optax.GradientTransformation,
                    loss_fn: Optional[Callable] = None) -> Callable:
    """`train_step(state, batch, *frozen) -> (state, metrics)`, jitted, state donated.

    `loss_fn(params, cfg, batch, *frozen) -> (loss, count)` defaults to `next_token_loss` over the
    model params; SONA's deep loop passes an adapter loss, with the frozen model params (and the EWC++
    state) as the extra, undifferentiated arguments.
    """
    loss_fn = next_token_loss if loss_fn is None else loss_fn

    def train_step(state: TrainState, batch, *frozen):
        (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, cfg, batch, *frozen)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        rng, _ = jax.random.split(state.rng)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
        return TrainState(params=params, opt_state=opt_state, step=state.step + 1, rng=rng), metrics

    return jax.jit(train_step, donate_argnums=0)


def make_eval_step(cfg: LlamaConfig) -> Callable:
    """`eval_step(params, batch) -> mean nats per token` (jitted)."""
    return jax.jit(lambda params, batch: next_token_loss(params, cfg, batch)[0])


@functools.lru_cache(maxsize=8)
def _compiled(cfg: LlamaConfig, oc: OptimConfig):
    """(optimizer, train_step, eval_step), shared by `train` calls with equal configs so repeated
    runs (tests, SONA's deep loop) reuse the compiled step instead of re-tracing it."""
    optimizer = make_optimizer(oc)
    return optimizer, make_train_step(cfg, optimizer), make_eval_step(cfg)


# --- checkpoints --------------------------------------------------------------------------------


def checkpoint_manager(directory: str, *, max_to_keep: int = 2):
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
    return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def save_checkpoint(manager, state: TrainState) -> None:
    import orbax.checkpoint as ocp

    manager.save(int(state.step), args=ocp.args.StandardSave(state.as_dict()), force=True)
    manager.wait_until_finished()


def restore_checkpoint(manager, template: TrainState, step: Optional[int] = None) -> Optional[TrainState]:
    """The checkpoint at `step` (default: latest) shaped like `template`, or None if there is none."""
    import orbax.checkpoint as ocp

    step = manager.latest_step() if step is None else step
    if step is None:
        return None
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template.as_dict())
    d = manager.restore(step, args=ocp.args.StandardRestore(abstract))
    return TrainState(**d)


# --- the loop -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    seed: int = 0
    batch_size: int = 16
    seq_len: int = 512
    steps: int = 1000
    log_every: int = 10
    eval_every: int = 100
    eval_windows: int = 16
    checkpoint_every: int = 200
    stop_after: Optional[int] = None  # stop early at this step (to test resumption); None = `steps`
    progress: bool = True
    # Curriculum: the first `short_fraction` of the steps use windows of `short_seq_len` tokens with
    # the batch scaled up to keep tokens per step (cheaper attention); the rest use `seq_len`.
    short_seq_len: int = 256
    short_fraction: float = 0.0

    def batch_shape(self, step: int) -> tuple[int, int]:
        """(batch_size, seq_len) at `step`."""
        if step < int(self.short_fraction * self.steps) and self.short_seq_len < self.seq_len:
            return self.batch_size * self.seq_len // self.short_seq_len, self.short_seq_len
        return self.batch_size, self.seq_len


def train(
    cfg: LlamaConfig,
    oc: OptimConfig,
    lc: LoopConfig,
    train_tokens: np.ndarray,
    val_tokens: Optional[np.ndarray] = None,
    workdir: Optional[str] = None,
    *,
    state: Optional[TrainState] = None,
) -> tuple[TrainState, list[dict]]:
    """Train from scratch (or from `workdir`'s latest checkpoint, or from `state`) to `lc.steps`.

    Returns the final state and the loss curve: one dict per logged step with the train loss (mean
    over the steps since the last log), the learning rate, and the validation loss when evaluated.
    With a `workdir`, checkpoints go to `workdir/checkpoints` and the curve to `workdir/loss_curve.json`.
    """
    from tqdm.auto import tqdm

    optimizer, train_step, eval_step = _compiled(cfg, oc)
    schedule = lr_schedule(oc)
    val_batch = None
    if val_tokens is not None and lc.eval_windows > 0:
        val_batch = jnp.asarray(fixed_windows(val_tokens, window=lc.seq_len + 1, max_windows=lc.eval_windows))

    manager, history = None, []
    if state is None:
        state = init_train_state(cfg, optimizer, lc.seed)
    if workdir is not None:
        os.makedirs(workdir, exist_ok=True)
        manager = checkpoint_manager(os.path.join(workdir, "checkpoints"))
        restored = restore_checkpoint(manager, state)
        if restored is not None:
            state = restored
            history = [h for h in read_curve(workdir) if h["step"] <= int(state.step)]

    start = int(state.step)
    stop = lc.steps if lc.stop_after is None else min(lc.steps, lc.stop_after)
    window_losses: list[jax.Array] = []
    t0 = time.time() - (history[-1]["elapsed_s"] if history else 0.0)  # wall time accumulates over resumes
    bar = tqdm(range(start, stop), initial=start, total=stop, disable=not lc.progress, desc="train")
    for step in bar:
        bsz, seq = lc.batch_shape(step)
        batch = sample_windows(train_tokens, seed=lc.seed, step=step, batch_size=bsz, window=seq + 1)
        state, metrics = train_step(state, jnp.asarray(batch))
        window_losses.append(metrics["loss"])
        done = step + 1
        if done % lc.log_every == 0 or done == stop:
            rec = {
                "step": done,
                "train_loss": float(np.mean(jax.device_get(window_losses))),
                "lr": float(schedule(step)),
                "grad_norm": float(metrics["grad_norm"]),
                "elapsed_s": round(time.time() - t0, 2),
            }
            window_losses = []
            if val_batch is not None and (done % lc.eval_every == 0 or done == lc.steps):
                rec["val_loss"] = float(eval_step(state.params, val_batch))
            history.append(rec)
            bar.set_postfix({k: round(v, 4) for k, v in rec.items() if k in ("train_loss", "val_loss")})
            if workdir is not None:
                _write_curve(workdir, history)
        if manager is not None and (done % lc.checkpoint_every == 0 or done == stop):
            save_checkpoint(manager, state)
    bar.close()
    if manager is not None:
        manager.close()
    return state, history


def _curve_path(workdir: str) -> str:
    return os.path.join(workdir, "loss_curve.json")


def read_curve(workdir: str) -> list[dict]:
    path = _curve_path(workdir)
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _write_curve(workdir: str, history: list[dict]) -> None:
    tmp = _curve_path(workdir) + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(history, f, indent=1)
    os.replace(tmp, _curve_path(workdir))

