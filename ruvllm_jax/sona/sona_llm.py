"""`SonaLlm`: the stateful RuvLLM facade over `ruvllm_jax.sona.functional`, serving while it learns.

It owns a `SonaState` (the adapters), the pending samples of the instant loop and the loop counters,
and attaches itself to its `JaxBackend`, which reads `SonaLlm.adapters` at every generation: what the
loops learn changes what the model writes. Every argument is checked on the host before any state
changes (a rejected call raises `SonaError` and leaves everything as it was). One lock serialises
serving and learning, so the optional background thread never races a generation.

Loops (see the functional module for the maths):
* instant: `instant_adapt(request, response, quality)`, one jitted optax step on the instant delta.
* background: `background_consolidate()` merges the pending instant updates by the strategy;
  `maybe_background()` runs it when `background_interval_ms` passed and enough samples wait;
  `start_background()` runs `maybe_background` on a thread.
* deep: `deep_optimize(dataset)`, the project's train step (clip + AdamW, warmup + cosine) on the live
  adapter with the EWC++ penalty, then the Fisher and anchor are refreshed on what it learned.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import shutil
import tempfile
import threading
import time
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ruvllm_jax.errors import AdapterError, RuvIoError, SonaError, StorageError
from ruvllm_jax.lora import functional as lora_f
from ruvllm_jax.lora import objective, peft_io
from ruvllm_jax.lora.config import MicroLoraConfig, TargetModule
from ruvllm_jax.sona import functional as F
from ruvllm_jax.sona.config import (
    AdaptationResult,
    ConsolidationStrategy,
    LearningLoopStats,
    SonaLlmConfig,
    TrainingSample,
)
from ruvllm_jax.training import train as train_lib

BUCKET_STEP = 32  # packed lengths beyond it are multiples of it (see `SonaLlm.encode`)


@dataclasses.dataclass
class PendingSample:
    """One instant-loop sample waiting for the background loop: packed tokens, its rating, its update."""

    tokens: np.ndarray  # int32 [S]
    weights: np.ndarray  # f32 [S]
    quality: float
    advantage: float
    update: Any  # the instant step's change of the delta


def check_quality(quality: Any, name: str = "quality") -> float:
    """A finite real in [0, 1] (ints, floats, 0-d numeric arrays; not bools)."""
    q = lora_f.check_real(name, quality, SonaError)
    if not 0.0 <= q <= 1.0:
        raise SonaError(f"{name} must be a rating in [0, 1], got {quality!r}")
    return q


class SonaLlm:
    """A model that learns from feedback on what it served, on three time scales."""

    def __init__(self, config: Optional[SonaLlmConfig] = None, backend=None):
        from ruvllm_jax.backend.jax_backend import JaxBackend

        config = SonaLlmConfig() if config is None else config
        if not isinstance(config, SonaLlmConfig):
            raise SonaError(f"config must be a SonaLlmConfig, got {lora_f.describe(config)}")
        if backend is None:
            backend = JaxBackend()
            backend.load_model()  # the embedded model
        if not isinstance(backend, JaxBackend):
            raise SonaError(f"backend must be a JaxBackend with a model loaded, got {lora_f.describe(backend)}")
        cfg = backend.config  # InvalidOperationError when no model is loaded
        if backend.tokenizer() is None:
            raise SonaError("the backend's model has no tokenizer; SONA learns from request/response text")
        lora_cfg = config.micro_lora or MicroLoraConfig.for_model(cfg)
        if (lora_cfg.in_features, lora_cfg.out_features) != (cfg.hidden_size, cfg.hidden_size):
            raise SonaError(f"micro_lora in/out features ({lora_cfg.in_features}, {lora_cfg.out_features}) do not "
                            f"match the model's hidden size {cfg.hidden_size}; use MicroLoraConfig.for_model")
        if lora_cfg.dropout > 0 or lora_cfg.gradient_checkpointing:
            raise SonaError(f"micro_lora dropout {lora_cfg.dropout} / gradient_checkpointing "
                            f"{lora_cfg.gradient_checkpointing}: SONA's steps do not apply them yet; use 0 / False")
        if config.instant_layers is not None and config.instant_layers > cfg.num_layers:
            raise SonaError(f"instant_layers {config.instant_layers} exceeds the model's {cfg.num_layers} layers")
        self.config, self.backend, self.model_config, self.lora_config = config, backend, cfg, lora_cfg
        self._lock = threading.RLock()
        self._thread: Optional[threading.Thread] = None
        self._stop = threading.Event()
        self.last_training_history: list[dict] = []  # per step of the last EwcMerge / deep run: loss, lr
        self._fresh()
        backend.attach_adapters(self)

    # -- state -------------------------------------------------------------------------------------------
    def _placed(self, state: F.SonaState) -> F.SonaState:
        """The state on the backend's devices: one device, or its mesh by the adapter rules (B of
        q/k/v/gate/up and A of o/down split over `model` like their weights, the rest replicated)."""
        layout = self.backend.layout
        if layout is None:
            return jax.device_put(state, jax.devices()[0])
        return jax.device_put(state, layout.adapter_shardings(state))

    def _fresh(self) -> None:
        c = self.config
        self.state = self._placed(F.init(jax.random.PRNGKey(c.seed), self.model_config, self.lora_config,
                                         instant_optimizer=c.instant_optimizer))
        self.pending: list[PendingSample] = []
        self.counters = {"instant_updates": 0, "background_runs": 0, "deep_runs": 0, "samples_seen": 0,
                         "dropped_samples": 0, "accumulated_quality": 0.0, "instant_latency_us_total": 0}
        self._last_background = time.monotonic()

    @property
    def adapters(self) -> dict:
        """The adapters tree the served model applies now (what the backend reads at each generation)."""
        return F.served_adapters(self.state)

    @property
    def first_instant_layer(self) -> int:
        n = self.config.instant_layers
        return 0 if n is None else self.model_config.num_layers - n

    # -- serving -------------------------------------------------------------------------------------------
    def generate(self, prompt: str, params=None) -> str:
        """The backend's generation with the learned adapters (serialised with learning)."""
        with self._lock:
            return self.backend.generate(prompt, params)

    # -- packing ---------------------------------------------------------------------------------------------
    def encode(self, request: Any, response: Any) -> tuple[np.ndarray, np.ndarray]:
        """(tokens, weights) of a request/response pair: the request as a generation prompt (with the
        tokenizer's special tokens), the response's tokens after it (weights 1 where predicted)."""
        for name, v in (("request", request), ("response", response)):
            if not isinstance(v, str):
                raise SonaError(f"{name} must be a str, got {lora_f.describe(v)}")
        tok = self.backend.tokenizer()
        req = tok.encode(request)
        resp = tok.encode(response, add_special_tokens=False)
        if not resp:
            raise SonaError(f"response {response!r} is empty: there is nothing to learn from")
        if not req:
            raise SonaError("request is empty and the tokenizer adds no BOS: a response needs a context")
        try:
            tokens, weights = objective.pack(req, resp, self.model_config.vocab_size,
                                             self.model_config.max_position_embeddings)
        except AdapterError as e:
            raise SonaError(e.message) from None
        # Past 32 tokens, pad to a multiple of 32 instead of the next power of two: the instant step's
        # cost is its length (80 tokens run as 96, not 128), at the price of more (bounded) shapes.
        n = len(req) + len(resp)
        keep = len(tokens) if n <= BUCKET_STEP else -(-n // BUCKET_STEP) * BUCKET_STEP
        return tokens[:keep], weights[:keep]

    def _advantage(self, quality: float) -> float:
        return quality - self.config.neutral_quality

    # -- the instant loop ------------------------------------------------------------------------------------
    def instant_adapt(self, request: str, response: str, quality: float) -> AdaptationResult:
        """One optax step on the instant adapter from the gradient of log p(response | request) through
        the model, weighted by the advantage; the sample then waits for the background loop."""
        q = check_quality(quality)
        with self._lock:
            tokens, weights = self.encode(request, response)  # checked before anything changes
            self._ensure_fisher()
            t0 = time.perf_counter()
            adv = self._advantage(q)
            state, update, before, after = F.instant_step(
                self.state, self.backend.params, jnp.asarray(tokens), jnp.asarray(weights), jnp.float32(adv),
                jnp.float32(self.config.instant_lr), cfg=self.model_config, first_layer=self.first_instant_layer)
            before, after = float(before), float(after)  # waits for the step
            latency = int((time.perf_counter() - t0) * 1e6)
            self.state = state
            self.pending.append(PendingSample(tokens, weights, q, adv, update))
            if len(self.pending) > self.config.max_pending_samples:
                del self.pending[0]
                self.counters["dropped_samples"] += 1
            c = self.counters
            c["instant_updates"] += 1
            c["samples_seen"] += 1
            c["accumulated_quality"] += q
            c["instant_latency_us_total"] += latency
        return AdaptationResult(applied=adv != 0.0 and self.config.instant_lr > 0, latency_us=latency,
                                quality_delta=after - before, samples_used=1, loop="instant",
                                logprob_before=before, logprob_after=after)

    def logprob(self, request: str, response: str) -> float:
        """The served model's mean log-prob per token of `response` given `request`."""
        tokens, weights = self.encode(request, response)
        with self._lock:
            return float(F.served_logprob(self.state, self.backend.params, jnp.asarray(tokens)[None],
                                          jnp.asarray(weights)[None], cfg=self.model_config)[0])

    # -- the background loop -----------------------------------------------------------------------------------
    def _served_logprob(self, samples: Sequence[tuple[np.ndarray, np.ndarray, float]]) -> float:
        """Mean over samples of the served model's mean log-prob per response token."""
        total, n = 0.0, 0
        for b in F.batches(samples, self.config.training.batch_size):
            lp = F.served_logprob(self.state, self.backend.params, jnp.asarray(b["tokens"]),
                                  jnp.asarray(b["weights"]), cfg=self.model_config)
            total += float(jnp.sum(lp * b["mask"]))
            n += int(b["mask"].sum())
        return total / max(n, 1)

    def background_consolidate(self) -> AdaptationResult:
        """Merge the pending instant updates into the consolidated adapter by the configured strategy."""
        with self._lock:
            t0 = time.perf_counter()
            if not self.pending:
                return AdaptationResult(applied=False, latency_us=0, loop="background",
                                        message="no pending samples")
            strategy = self.config.consolidation_strategy
            samples = [(p.tokens, p.weights, p.advantage) for p in self.pending]
            before = self._served_logprob(samples)
            if strategy is ConsolidationStrategy.EwcMerge:
                self._ensure_fisher()
                state = F.set_live(self.state, F.live(self.state))
                state = self._train(state, samples, self._background_step(), self.config.background_epochs,
                                    seed=self.counters["background_runs"])
            else:
                w = F.merge_weights(strategy, [p.quality for p in self.pending])
                merged = F.merge_updates([p.update for p in self.pending], w)
                ensemble = strategy is ConsolidationStrategy.Ensemble
                # An Ensemble's first consolidation replaces the untrained initial member.
                state = F.consolidate(self.state, merged, new_member=ensemble and self.counters["background_runs"] > 0,
                                      ensemble_size=self.config.ensemble_size)
            old, self.state = self.state, state
            try:
                after = self._served_logprob(samples)
            except BaseException:
                self.state = old
                raise
            used = len(self.pending)
            self.pending = []
            self.counters["background_runs"] += 1
            self._last_background = time.monotonic()
        return AdaptationResult(applied=True, latency_us=int((time.perf_counter() - t0) * 1e6),
                                quality_delta=after - before, samples_used=used, loop="background",
                                logprob_before=before, logprob_after=after, message=strategy.name)

    def maybe_background(self) -> Optional[AdaptationResult]:
        """`background_consolidate()` when the interval has passed and enough samples wait, else None."""
        with self._lock:
            due = (time.monotonic() - self._last_background) * 1000.0 >= self.config.background_interval_ms
            if due and len(self.pending) >= self.config.background_min_samples:
                return self.background_consolidate()
            return None

    def start_background(self) -> None:
        """Run `maybe_background` every interval on a daemon thread (stop with `stop_background`)."""
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return
            self._stop.clear()
            period = max(self.config.background_interval_ms, 1) / 1000.0

            def loop():
                while not self._stop.wait(period):
                    self.maybe_background()

            self._thread = threading.Thread(target=loop, name="sona-background", daemon=True)
            self._thread.start()

    def stop_background(self) -> None:
        t = self._thread
        self._stop.set()
        if t is not None:
            t.join()
        self._thread = None

    # -- training (background EwcMerge and deep) --------------------------------------------------------------
    def _background_step(self):
        return _adapter_step(self.model_config, ("adam", float(self.config.background_lr)))

    def _train(self, state: F.SonaState, samples, step, epochs: int, *, seed: int):
        """Epochs of `step` over `samples` (shuffled per epoch) on the live member, with the EWC++
        penalty and the anchor KL on `replay_batch` replay rows per step (cycling); returns the new
        state and leaves self.state alone (so a failure changes nothing)."""
        tc = self.config.training
        theta = jax.tree.map(jnp.copy, state.members[-1])  # the step donates its state
        ts = train_lib.TrainState(params=theta, opt_state=step.optimizer.init(theta), step=jnp.int32(0),
                                  rng=jax.random.PRNGKey(seed))
        frozen = state.members[:-1]
        rng = np.random.default_rng([self.config.seed, seed])
        n_replay = int(state.replay_tokens.shape[0]) if tc.kl_lambda > 0 else 0
        rows = min(tc.replay_batch, n_replay)
        history = []
        for _ in range(epochs):
            for b in F.batches(samples, tc.batch_size, rng.permutation(len(samples))):
                lr = step.schedule(int(ts.step))
                pick = (np.arange(rows) + len(history) * rows) % max(n_replay, 1)
                reg = {"fisher": state.fisher, "anchor": state.anchor, "ewc_lambda": jnp.float32(tc.ewc_lambda),
                       "kl_lambda": jnp.float32(tc.kl_lambda), "replay_tokens": state.replay_tokens[pick],
                       "replay_weights": state.replay_weights[pick]}
                ts, metrics = step.fn(ts, {k: jnp.asarray(v) for k, v in b.items()}, self.backend.params, frozen,
                                      state.scaling, reg)
                history.append({"step": len(history), "loss": float(metrics["loss"]), "lr": float(lr),
                                "grad_norm": float(metrics["grad_norm"])})
        self.last_training_history = history
        return F.set_live(state, ts.params)

    def _pack_samples(self, dataset: Any) -> list[tuple[np.ndarray, np.ndarray, float]]:
        if isinstance(dataset, (str, bytes)) or not isinstance(dataset, Sequence):
            raise SonaError(f"dataset must be a list of TrainingSample, got {lora_f.describe(dataset)}")
        if not dataset:
            raise SonaError("dataset is empty: the deep loop needs at least one TrainingSample")
        out = []
        for i, s in enumerate(dataset):
            if not isinstance(s, TrainingSample):
                raise SonaError(f"dataset[{i}] must be a TrainingSample, got {lora_f.describe(s)}")
            q = check_quality(s.quality, f"dataset[{i}].quality")
            tokens, weights = self.encode(s.request, s.response)
            out.append((tokens, weights, self._advantage(q)))
        return out

    def deep_optimize(self, dataset: Sequence[TrainingSample]) -> AdaptationResult:
        """Train the live adapter on `dataset` with `TrainingConfig` (clip + AdamW, warmup then cosine
        decay, `epochs` passes of `batch_size`), the EWC++ penalty and the anchor KL; then refresh the
        Fisher and replay set (sampled from the new model, or with fisher_samples = 0 the dataset's
        empirical Fisher) and move the anchor there. Pending instant updates are merged
        in first. Resets the accumulated quality of `should_trigger_deep`."""
        samples = self._pack_samples(dataset)
        tc = self.config.training
        with self._lock:
            t0 = time.perf_counter()
            self._ensure_fisher()
            before = self._served_logprob(samples)
            steps = tc.epochs * math.ceil(len(samples) / tc.batch_size)
            state = F.set_live(self.state, F.live(self.state))
            step = _adapter_step(self.model_config, ("train", train_lib.OptimConfig(
                peak_lr=tc.learning_rate, end_lr_fraction=tc.decay_to, warmup_steps=min(tc.warmup_steps, steps),
                total_steps=steps, weight_decay=tc.weight_decay, grad_clip=tc.grad_clip)))
            state = self._train(state, samples, step, tc.epochs, seed=1000 + self.counters["deep_runs"])
            old, self.state = self.state, state
            try:
                if self.config.fisher_samples > 0:  # what the model knows now, sampled from it
                    self.state = self._refreshed(self.state, self._model_samples())
                else:  # the empirical Fisher of what it just learned
                    self.state = self._refreshed(self.state, [s for s in samples if s[2] > 0] or samples)
                after = self._served_logprob(samples)
            except BaseException:
                self.state = old
                raise
            self.pending = []
            self.counters["deep_runs"] += 1
            self.counters["accumulated_quality"] = 0.0
            losses = [h["loss"] for h in self.last_training_history]
        return AdaptationResult(applied=True, latency_us=int((time.perf_counter() - t0) * 1e6),
                                quality_delta=after - before, samples_used=len(samples), loop="deep",
                                logprob_before=before, logprob_after=after,
                                message=f"{steps} steps, loss {losses[0]:.4f} -> {losses[-1]:.4f}")

    def should_trigger_deep(self) -> bool:
        """True once the qualities accumulated since the last deep run reach `deep_trigger_threshold`."""
        return self.counters["accumulated_quality"] >= self.config.deep_trigger_threshold

    # -- EWC++ -------------------------------------------------------------------------------------------------
    def _fisher(self, state: F.SonaState, samples) -> Any:
        total, n = None, 0
        for b in F.batches([(t, w, 1.0) for t, w, _ in samples], self.config.training.batch_size):
            real = int(b["mask"].sum())
            f = F.fisher_estimate(F.live(state), state.members[:-1], state.scaling, self.backend.params,
                                  jnp.asarray(b["tokens"][:real]), jnp.asarray(b["weights"][:real]),
                                  cfg=self.model_config)
            f = jax.tree.map(lambda x, real=real: x * real, f)
            total = f if total is None else F.add(total, f)
            n += real
        return jax.tree.map(lambda x: x / n, total)

    def _refreshed(self, state: F.SonaState, samples) -> F.SonaState:
        """EWC++ refresh on `samples`, which also become the replay set of the anchor KL."""
        replay = F.batches([(t, w, 1.0) for t, w, _ in samples], len(samples))[0]
        return F.refresh_fisher(state, self._fisher(state, samples), self.config.fisher_decay, replay["tokens"],
                                replay["weights"])

    def _model_samples(self) -> list:
        """`fisher_samples` continuations of `fisher_prompt` sampled (temperature 1, no filtering) from
        the served model, packed."""
        from ruvllm_jax.types import GenerateParams

        c = self.config
        prompt = self.backend.tokenizer().encode(c.fisher_prompt)
        samples = []
        for i in range(c.fisher_samples):
            gp = GenerateParams(max_tokens=c.fisher_sample_tokens, temperature=1.0, top_p=1.0, repetition_penalty=1.0,
                                seed=c.seed * 1009 + i)
            ids = self.backend.generate_tokens(prompt, gp)
            if ids:
                samples.append((*objective.pack(prompt, ids, self.model_config.vocab_size), 1.0))
        return samples

    def estimate_fisher(self, texts: Optional[Sequence[str]] = None) -> None:
        """EWC++ refresh of what the model knows now: the Fisher of `texts` (each a response to
        `fisher_prompt`), or with None of `fisher_samples` continuations of `fisher_prompt` sampled from
        the served model (its true Fisher: no data needed). The anchor moves to the current adapter and
        the scored sequences become the replay set of the anchor KL."""
        c = self.config
        if texts is not None and (isinstance(texts, str) or not isinstance(texts, Sequence) or not texts
                                  or not all(isinstance(t, str) for t in texts)):
            raise SonaError(f"texts must be a non-empty list of str, got {lora_f.describe(texts)}")
        with self._lock:
            samples = self._model_samples() if texts is None else [(*self.encode(c.fisher_prompt, t), 1.0)
                                                                  for t in texts]
            if not samples:
                raise SonaError("estimate_fisher() got no tokens to score")
            self.state = self._refreshed(self.state, samples)

    def _ensure_fisher(self) -> None:
        """Before the first change of the adapters, estimate what the model knows by sampling from it
        (when fisher_samples > 0 and a penalty is on): the anchor of EWC++ and the anchor KL."""
        tc = self.config.training
        if int(self.state.fisher_updates) == 0 and (tc.ewc_lambda > 0 or tc.kl_lambda > 0) \
                and self.config.fisher_samples > 0:
            self.estimate_fisher()

    # -- RuvLLM bookkeeping ----------------------------------------------------------------------------------
    def stats(self) -> LearningLoopStats:
        with self._lock:
            c, s = self.counters, self.state
            norm = lambda t: float(jnp.sqrt(sum(jnp.sum(x ** 2) for x in jax.tree.leaves(t))))  # noqa: E731
            return LearningLoopStats(
                instant_updates=c["instant_updates"], background_runs=c["background_runs"], deep_runs=c["deep_runs"],
                samples_seen=c["samples_seen"], pending_samples=len(self.pending),
                dropped_samples=c["dropped_samples"], accumulated_quality=c["accumulated_quality"],
                mean_instant_latency_us=c["instant_latency_us_total"] / max(c["instant_updates"], 1),
                ensemble_members=len(s.members), consolidated_norm=norm(s.members[-1]), instant_norm=norm(s.delta),
                fisher_mass=float(sum(jnp.sum(f) for f in jax.tree.leaves(s.fisher))),
                strategy=self.config.consolidation_strategy.name,
            )

    def forward(self, x: Any, module: Any, *, layer: int = 0) -> jax.Array:
        """ΔW(x) of the served adapters of `module` in `layer`, x [in] or [T, in]."""
        try:
            m = TargetModule.parse(module)
        except AdapterError as e:
            raise SonaError(e.message) from None
        if m not in self.lora_config.target_modules:
            targets = [t.name for t in self.lora_config.target_modules]
            raise SonaError(f"module {m.name} is not adapted; targets: {targets}")
        layer = lora_f.check_int("layer", layer, 0, self.model_config.num_layers, SonaError)
        a = lora_f.host_array("input", x, exc=SonaError)
        d_in = self.state.members[-1]["layers"][layer][m.key]["A"].shape[0]
        if a.ndim not in (1, 2) or a.shape[-1] != d_in:
            raise SonaError(f"input for {m.name} must be [{d_in}] or [T, {d_in}], got shape {a.shape}")
        with self._lock:
            return F.adapter_output(self.state, jnp.asarray(a, jnp.float32), m.key, layer)

    def reset(self) -> None:
        """All learning state back to the start: base model behaviour, no pending samples, zero counters."""
        with self._lock:
            self._fresh()

    # -- export and persistence ---------------------------------------------------------------------------------
    def export_peft(self, folder: str, *, base_model_name_or_path: Optional[str] = None,
                    overwrite: bool = False) -> None:
        """The adapters the served model applies now as one PEFT LoRA folder (an Ensemble of K members
        of rank r becomes one adapter of rank K·r; see `functional.compose`)."""
        with self._lock:
            ads = self.adapters
        first = next(iter(ads["layers"][0].values()))
        params = {"layers": tuple({k: {"A": m["A"], "B": m["B"]} for k, m in layer.items()} for layer in ads["layers"])}
        peft_io.save(folder, params, float(first["scaling"]), base_model_name_or_path=base_model_name_or_path,
                     overwrite=overwrite)

    def _tree(self) -> dict:
        s = self.state
        tree = {"members": list(s.members), "delta": s.delta, "scaling": s.scaling, "instant_opt": s.instant_opt,
                "fisher": s.fisher, "anchor": s.anchor, "fisher_updates": s.fisher_updates,
                "pending": [{"tokens": p.tokens, "weights": p.weights, "update": p.update} for p in self.pending]}
        if s.replay_tokens.size:  # orbax refuses zero-size arrays: an empty replay set is only in the meta
            tree.update(replay_tokens=s.replay_tokens, replay_weights=s.replay_weights)
        return tree

    def _meta(self) -> dict:
        return {"format": "ruvllm_jax.sona/1", "signature": self._signature(),
                "members": len(self.state.members), "replay_shape": list(self.state.replay_tokens.shape),
                "counters": dict(self.counters),
                "pending": [{"length": int(len(p.tokens)), "quality": p.quality, "advantage": p.advantage}
                            for p in self.pending]}

    def _signature(self) -> dict:
        lc = self.lora_config
        return {"modules": sorted(m.key for m in lc.target_modules), "rank": lc.rank, "alpha": float(lc.alpha),
                "layers": self.model_config.num_layers, "hidden_size": self.model_config.hidden_size,
                "instant_optimizer": self.config.instant_optimizer}

    def save(self, directory: str, *, overwrite: bool = False) -> None:
        """Orbax checkpoint of the whole learning state: adapters, instant delta and optimizer, Fisher and
        anchor, pending samples with their updates, counters. Written beside and renamed into place."""
        import orbax.checkpoint as ocp

        if not isinstance(directory, (str, os.PathLike)) or not os.fspath(directory):
            raise RuvIoError(f"checkpoint directory must be a non-empty path, got {lora_f.describe(directory)}")
        path = os.path.abspath(os.fspath(directory))
        if os.path.lexists(path) and not os.path.isdir(path):
            raise RuvIoError(f"cannot save a SONA checkpoint to {path!r}: it exists and is not a folder")
        if os.path.isdir(path) and os.listdir(path):
            if not os.path.isfile(os.path.join(path, _META)):
                raise RuvIoError(f"{path!r} holds files that are not a SONA checkpoint; refusing to replace them")
            if not overwrite:
                raise RuvIoError(f"{path!r} already holds a SONA checkpoint; pass overwrite=True to replace it")
        with self._lock:
            tree, meta = self._tree(), self._meta()
        parent = os.path.dirname(path)
        try:
            os.makedirs(parent, exist_ok=True)
            tmp = tempfile.mkdtemp(prefix=".sona-", dir=parent)
            ckptr = ocp.StandardCheckpointer()
            ckptr.save(os.path.join(tmp, _STATE), tree)
            ckptr.wait_until_finished()
            with open(os.path.join(tmp, _META), "w", encoding="utf-8") as f:
                json.dump(meta, f, indent=1)
            if os.path.isdir(path):
                shutil.rmtree(path)
            os.replace(tmp, path)
        except OSError as e:
            raise RuvIoError(f"cannot save a SONA checkpoint to {path!r}: {e}") from None

    def restore(self, directory: str) -> None:
        """Load a checkpoint written by `save` for the same adapters (modules, rank, alpha, model shape);
        a missing, corrupt or mismatched one raises `StorageError` and changes nothing."""
        import orbax.checkpoint as ocp

        path = os.path.abspath(os.fspath(directory)) if isinstance(directory, (str, os.PathLike)) else repr(directory)
        try:
            with open(os.path.join(path, _META), encoding="utf-8") as f:
                meta = json.load(f)
            if meta.get("format") != "ruvllm_jax.sona/1":
                raise ValueError(f"format {meta.get('format')!r}")
        except (OSError, ValueError, TypeError, AttributeError) as e:
            raise StorageError(f"no readable SONA checkpoint at {path!r}: {e}") from None
        if meta["signature"] != self._signature():
            raise StorageError(f"checkpoint {path!r} holds other adapters: {meta['signature']} vs this SonaLlm's "
                               f"{self._signature()}")
        with self._lock:
            fresh = F.init(jax.random.PRNGKey(0), self.model_config, self.lora_config,
                           instant_optimizer=self.config.instant_optimizer)
            member = fresh.members[0]
            template = {
                "members": [member] * int(meta["members"]), "delta": fresh.delta, "scaling": fresh.scaling,
                "instant_opt": fresh.instant_opt, "fisher": fresh.fisher, "anchor": fresh.anchor,
                "fisher_updates": fresh.fisher_updates,
                "pending": [{"tokens": np.zeros((p["length"],), np.int32),
                             "weights": np.zeros((p["length"],), np.float32), "update": fresh.delta}
                            for p in meta["pending"]],
            }
            replay = {"replay_tokens": np.zeros(meta["replay_shape"], np.int32),
                      "replay_weights": np.zeros(meta["replay_shape"], np.float32)}
            if replay["replay_tokens"].size:  # saved only when non-empty (see `_tree`)
                template.update(replay)
            abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
            try:
                tree = ocp.StandardCheckpointer().restore(os.path.join(path, _STATE), abstract)
            except Exception as e:  # noqa: BLE001 - orbax raises many kinds on a damaged checkpoint
                raise StorageError(f"cannot read the SONA checkpoint at {path!r}: {type(e).__name__}: {e}") from None
            leaves = jax.tree.leaves(tree)
            if not all(np.all(np.isfinite(np.asarray(x))) for x in leaves if jnp.issubdtype(x.dtype, jnp.floating)):
                raise StorageError(f"the SONA checkpoint at {path!r} holds non-finite values")
            state = F.SonaState(members=tuple(tree["members"]), delta=tree["delta"], scaling=tree["scaling"],
                                instant_opt=tree["instant_opt"], fisher=tree["fisher"], anchor=tree["anchor"],
                                fisher_updates=tree["fisher_updates"],
                                replay_tokens=tree.get("replay_tokens", replay["replay_tokens"]),
                                replay_weights=tree.get("replay_weights", replay["replay_weights"]),
                                instant_optimizer=self.config.instant_optimizer)
            self.state = self._placed(state)
            self.pending = [PendingSample(np.asarray(p["tokens"]), np.asarray(p["weights"]), m["quality"],
                                          m["advantage"], p["update"]) for p, m in zip(tree["pending"], meta["pending"],
                                                                                     strict=True)]
            self.counters = dict(meta["counters"])


_META = "meta.json"
_STATE = "state"


@dataclasses.dataclass(frozen=True)
class _Step:
    optimizer: Any
    fn: Any  # train_step(state, batch, *frozen) -> (state, metrics)
    schedule: Any  # step -> learning rate (for the history)


@functools.lru_cache(maxsize=16)
def _adapter_step(cfg, key) -> _Step:
    """The project's train step (`training.train.make_train_step`) over the adapter loss, one compiled
    step per (model, optimizer settings): background EwcMerge uses Adam at a constant rate, the deep
    loop the training optimizer (clip + AdamW, warmup + cosine) of `OptimConfig`."""
    import optax

    kind, arg = key
    if kind == "adam":
        opt, schedule = optax.adam(arg), (lambda step, lr=arg: lr)
    else:
        opt, schedule = train_lib.make_optimizer(arg), train_lib.lr_schedule(arg)
    return _Step(opt, train_lib.make_train_step(cfg, opt, F.adapter_loss), schedule)
