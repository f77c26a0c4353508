"""`MicroLoRA`: the stateful RuvLLM facade over `ruvllm_jax.lora.functional`.

It holds a `LoraState` and validates user input on the host before calling the jitted pure
functions, so a rejected call (NaN quality, wrong length, unknown module) leaves the state as it
was. Attach it to a `JaxBackend` (`backend.attach_adapters(lora)`) and every generation applies
its current adapters.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ruvllm_jax.errors import AdapterError, ConfigError
from ruvllm_jax.lora import checkpoint as ckpt
from ruvllm_jax.lora import ewc as ewc_lib
from ruvllm_jax.lora import functional as F
from ruvllm_jax.lora import objective, peft_io
from ruvllm_jax.lora.config import AdaptFeedback, MicroLoraConfig, MicroLoraStats, TargetModule, module_dims

EwcStates = Mapping[TargetModule, ewc_lib.EwcState]


def _real(name: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(float(v)):
        raise AdapterError(f"{name} must be a finite real number, got {v!r}")
    return float(v)


class MicroLoRA:
    """Rank-r adapters on the target modules of every layer, learning from feedback."""

    def __init__(self, config: MicroLoraConfig, *, model_config=None, seed: int = 0,
                 baseline_decay: float = F.DEFAULT_BASELINE_DECAY, optimizer: str = "sgd"):
        if optimizer not in F.OPTIMIZERS:
            raise ConfigError(f"optimizer must be one of {F.OPTIMIZERS}, got {optimizer!r}")
        self.config = config
        self.model_config = model_config
        self.seed = seed
        if model_config is None:  # RuvLLM's single-dim adapter: every target is in -> out, one layer
            all_dims = {m: (config.in_features, config.out_features) for m in TargetModule}
            self.num_layers = 1
        else:
            all_dims = module_dims(model_config)
            d = model_config.hidden_size
            if (config.in_features, config.out_features) != (d, d):
                raise AdapterError(
                    f"MicroLoraConfig in/out features ({config.in_features}, {config.out_features}) do not match "
                    f"the model's hidden size {d}; use MicroLoraConfig.for_model(model_config)"
                )
            self.num_layers = model_config.num_layers
        self.dims = {m: all_dims[m] for m in config.target_modules}
        self._baseline_decay, self.optimizer = baseline_decay, optimizer
        self.state = F.init(jax.random.PRNGKey(seed), {m.key: d for m, d in self.dims.items()}, self.num_layers,
                            config.rank, config.alpha, dropout=config.dropout, baseline_decay=baseline_decay,
                            optimizer=optimizer)

    # -- construction ------------------------------------------------------------------------------
    @classmethod
    def new(cls, config: MicroLoraConfig) -> "MicroLoRA":
        return cls(config)

    @classmethod
    def for_model(cls, model_config, *, rank: int = 2, alpha: float = 4.0, dropout: float = 0.0,
                  target_modules: Sequence[Any] = (TargetModule.QProj, TargetModule.VProj), seed: int = 0,
                  optimizer: str = "sgd") -> "MicroLoRA":
        """Adapters for every layer of a `LlamaConfig` (what `JaxBackend.attach_adapters` takes)."""
        cfg = MicroLoraConfig.for_model(model_config, rank=rank, alpha=alpha, dropout=dropout,
                                        target_modules=target_modules)
        return cls(cfg, model_config=model_config, seed=seed, optimizer=optimizer)

    @classmethod
    def from_peft(cls, folder: str, model_config, *, seed: int = 0, optimizer: str = "sgd") -> "MicroLoRA":
        """Import a PEFT LoRA folder made for this model (plain LoRA; other options raise AdapterError)."""
        params, scaling, rank, alpha, targets = peft_io.load(folder, model_config)
        lora = cls.for_model(model_config, rank=rank, alpha=alpha, target_modules=targets, seed=seed,
                             optimizer=optimizer)
        lora.state = F.from_params(params, scaling, rng=lora.state.rng, baseline_decay=lora._baseline_decay,
                                   optimizer=optimizer)
        return lora

    def export_peft(self, folder: str, *, base_model_name_or_path: Optional[str] = None) -> None:
        """Write a PEFT folder (`adapter_config.json` + `adapter_model.safetensors`)."""
        if self.model_config is None:
            raise AdapterError("export_peft needs adapters built for a model (MicroLoRA.for_model)")
        peft_io.save(folder, self.state.params, float(self.state.scaling), dropout=self.config.dropout,
                     base_model_name_or_path=base_model_name_or_path)

    # -- the model's view ----------------------------------------------------------------------------
    @property
    def adapters(self) -> dict:
        """The pytree `models.llama` / `JaxBackend` apply."""
        return F.adapters(self.state)

    # -- validation -------------------------------------------------------------------------------------
    def _module(self, module: Any) -> TargetModule:
        m = TargetModule.parse(module)
        if m not in self.dims:
            raise AdapterError(f"module {m.name} is not adapted; targets: {[t.name for t in self.dims]}")
        return m

    def _layer(self, layer: int) -> int:
        if isinstance(layer, bool) or not isinstance(layer, numbers.Integral) or not 0 <= layer < self.num_layers:
            raise AdapterError(f"layer must be an integer in [0, {self.num_layers}), got {layer!r}")
        return int(layer)

    def _vector(self, name: str, v: Any, length: int, module: TargetModule) -> jax.Array:
        a = np.asarray(v, dtype=np.float32)
        if a.ndim not in (1, 2) or a.shape[-1] != length:
            raise AdapterError(f"{name} for {module.name} must have length {length}, got shape {a.shape}")
        if not np.all(np.isfinite(a)):
            raise AdapterError(f"{name} for {module.name} contains NaN or infinite values")
        return jnp.asarray(a)

    # -- RuvLLM API -----------------------------------------------------------------------------------
    def forward(self, x: Any, module: Any, *, layer: int = 0) -> jax.Array:
        """ΔW(x) = scaling · (x @ A) @ B of `module` in `layer` (x [in] or [..., in])."""
        m, layer = self._module(module), self._layer(layer)
        return F.forward(self.state, self._vector("input", x, self.dims[m][0], m), m.key, layer)

    def forward_add(self, x: Any, module: Any, out: Any, *, layer: int = 0) -> jax.Array:
        """out + ΔW(x), as a new array (RuvLLM adds in place)."""
        m, layer = self._module(module), self._layer(layer)
        xv = self._vector("input", x, self.dims[m][0], m)
        ov = self._vector("output", out, self.dims[m][1], m)
        return F.forward_add(self.state, xv, m.key, ov, layer)

    def _advantage_args(self, feedback: AdaptFeedback) -> tuple[float, float, bool]:
        if not isinstance(feedback, AdaptFeedback):
            raise AdapterError(f"feedback must be an AdaptFeedback, got {type(feedback).__name__}")
        q = _real("feedback.quality", feedback.quality)
        if not 0.0 <= q <= 1.0:
            raise AdapterError(f"feedback.quality must be in [0, 1], got {feedback.quality!r}")
        if feedback.reward is None:
            return q, 0.0, False
        return q, _real("feedback.reward", feedback.reward), True

    def adapt(self, input: Any, feedback: AdaptFeedback, *, module: Any = None, layer: int = 0) -> None:
        """Accumulate ∇ advantage·<g, ΔW(input)> (see `functional.adapt`); `apply_updates` applies it.

        The module is `module`, else `feedback.source_module`, else every target whose input (and
        gradient estimate) length fits. Without a gradient estimate, g = input (square modules only).
        """
        q, reward, has_reward = self._advantage_args(feedback)
        layer = self._layer(layer)
        chosen = module if module is not None else feedback.source_module
        g_raw = feedback.gradient_estimate
        has_g = g_raw is not None and np.size(g_raw) > 0
        if chosen is not None:
            modules = [self._module(chosen)]
        else:
            n_in = np.shape(input)[-1] if np.ndim(input) else -1
            n_out = np.shape(g_raw)[-1] if has_g and np.ndim(g_raw) else None
            modules = [m for m, (i, o) in self.dims.items() if i == n_in and (n_out is None or o == n_out)]
            if not modules:
                raise AdapterError(
                    f"input of shape {np.shape(input)} fits no target module; (in, out) dims: "
                    f"{ {m.name: d for m, d in self.dims.items()} }"
                )
        d_in = self.dims[modules[0]][0]
        x = self._vector("input", input, d_in, modules[0])
        g = None
        for m in modules:
            i, o = self.dims[m]
            if x.shape[-1] != i:
                raise AdapterError(f"input for {m.name} must have length {i}, got shape {x.shape}")
            if has_g:
                g = self._vector("feedback.gradient_estimate", g_raw, o, m)
                if g.shape[:-1] != x.shape[:-1]:
                    raise AdapterError(f"gradient_estimate shape {g.shape} does not match input shape {x.shape}")
            elif i != o:
                raise AdapterError(
                    f"{m.name} is not square ({i} -> {o}): a Hebbian update (no gradient_estimate) needs in == out"
                )
        self.state = F.adapt(self.state, x, g, q, reward, has_reward, modules=tuple(m.key for m in modules),
                             layer=layer)

    def adapt_sequence(self, model_params: dict, prompt_ids: Sequence[int], response_ids: Sequence[int],
                       feedback: AdaptFeedback) -> float:
        """`adapt` at every position, module and layer with the model's own gradient estimate
        g_t = d log p(response | prompt) / d y_t (one sample); returns log p(response | prompt)."""
        q, reward, has_reward = self._advantage_args(feedback)
        cfg = self._require_model()
        tokens, weights = objective.pack(prompt_ids, response_ids, cfg.vocab_size)
        j, grads = objective.sequence_gradients(self.state.params, self.state.scaling, model_params, tokens, weights,
                                                cfg=cfg, remat=self.config.gradient_checkpointing)
        self.state = F.accumulate(self.state, grads, q, reward, has_reward)
        return float(j)

    def log_likelihood(self, model_params: dict, prompt_ids: Sequence[int], response_ids: Sequence[int]) -> float:
        """log p(response | prompt) under the model with these adapters."""
        cfg = self._require_model()
        tokens, weights = objective.pack(prompt_ids, response_ids, cfg.vocab_size)
        return float(objective.sequence_log_likelihood(self.state.params, self.state.scaling, model_params, tokens,
                                                       weights, cfg=cfg))

    def _require_model(self):
        if self.model_config is None:
            raise AdapterError("sequence feedback needs adapters built for a model (MicroLoRA.for_model)")
        return self.model_config

    def _lr(self, lr: Any) -> float:
        v = _real("learning_rate", lr)
        if v < 0:
            raise AdapterError(f"learning_rate must be >= 0, got {lr!r}")
        return v

    def apply_updates(self, learning_rate: float) -> None:
        self.state = F.apply_updates(self.state, self._lr(learning_rate))

    def apply_updates_with_ewc(self, learning_rate: float, ewc_states: EwcStates, ewc_lambda: float) -> None:
        lam = _real("ewc_lambda", ewc_lambda)
        if lam < 0:
            raise AdapterError(f"ewc_lambda must be >= 0, got {ewc_lambda!r}")
        self.state = F.apply_updates_with_ewc(self.state, self._lr(learning_rate), self._ewc_by_key(ewc_states), lam)

    # -- EWC++ --------------------------------------------------------------------------------------------
    def _ewc_by_key(self, ewc_states: EwcStates) -> dict[str, ewc_lib.EwcState]:
        return {self._module(m).key: e for m, e in ewc_states.items()}

    def ewc_states(self) -> dict[TargetModule, ewc_lib.EwcState]:
        """Fresh EWC++ states (zero Fisher, anchored at the current parameters) for every target."""
        return {m: ewc_lib.init(self.state.params, m.key) for m in self.dims}

    def update_fisher(self, ewc_states: EwcStates, decay: float = ewc_lib.DEFAULT_FISHER_DECAY) -> dict:
        """F ← decay·g² + (1 − decay)·F with the squared per-sample gradients pending since the last
        update (call before `apply_updates*`, which clears them). Returns the new states."""
        return {m: ewc_lib.update_fisher(e, self.state.grad_sq, self.state.pending, self._module(m).key, decay)
                for m, e in ewc_states.items()}

    def reanchor(self, ewc_states: EwcStates) -> dict:
        return {m: ewc_lib.reanchor(e, self.state.params, self._module(m).key) for m, e in ewc_states.items()}

    def consolidate(self, ewc_states: EwcStates, decay: float = ewc_lib.DEFAULT_FISHER_DECAY) -> dict:
        """End of a task: fold pending squared gradients into the Fisher, then anchor at θ."""
        return self.reanchor(self.update_fisher(ewc_states, decay))

    # -- bookkeeping ---------------------------------------------------------------------------------------
    def reset(self) -> None:
        """Fresh A (same seed), B = 0, empty accumulators, counters and baseline back to their start."""
        self.state = F.reset(self.state, jax.random.PRNGKey(self.seed))

    def stats(self, ewc_states: Optional[EwcStates] = None) -> MicroLoraStats:
        p = self.state.params
        norm = lambda which: float(jnp.sqrt(sum(jnp.sum(m[which] ** 2) for l in p["layers"] for m in l.values())))  # noqa: E731
        grad = float(jnp.sqrt(sum(jnp.sum(g ** 2) for g in jax.tree.leaves(self.state.grad))))
        mass = float(sum(ewc_lib.fisher_mass(e) for e in (ewc_states or {}).values()))
        return MicroLoraStats(
            updates_applied=int(self.state.updates), samples_accumulated=int(self.state.samples),
            pending_samples=int(self.state.pending), baseline=float(self.state.baseline),
            a_norm=norm("A"), b_norm=norm("B"), grad_norm=grad, fisher_mass=mass,
            num_parameters=int(sum(x.size for x in jax.tree.leaves(p))),
        )

    # -- persistence -----------------------------------------------------------------------------------------
    def save(self, directory: str, ewc_states: Optional[EwcStates] = None) -> None:
        """Orbax checkpoint of the adapter state (accumulators, counters, baseline) and EWC states."""
        ckpt.save(directory, self.state, self._ewc_by_key(ewc_states or {}))

    def restore(self, directory: str) -> dict[TargetModule, ewc_lib.EwcState]:
        """Load a checkpoint written by `save` for the same targets/dims; returns its EWC states."""
        state, ewc_states = ckpt.restore(directory)
        want = {m.key: d for m, d in self.dims.items()}
        got = {k: (m["A"].shape[0], m["B"].shape[1]) for k, m in state.params["layers"][0].items()}
        if got != want or state.num_layers != self.num_layers:
            raise AdapterError(f"checkpoint {directory!r} holds adapters {got} x {state.num_layers} layers, "
                               f"this MicroLoRA has {want} x {self.num_layers}")
        self.state = state
        by_key = {m.key: m for m in TargetModule}
        return {by_key[k]: e for k, e in ewc_states.items()}
