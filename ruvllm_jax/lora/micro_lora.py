"""`MicroLoRA`: the stateful RuvLLM facade over `ruvllm_jax.lora.functional`.

It holds a `LoraState` and validates user input on the host before calling the jitted pure
functions, so a rejected call (NaN quality, wrong length, unknown module) leaves the state as it
was. Attach it to a `JaxBackend` (`backend.attach_adapters(lora)`) and every generation applies
its current adapters.

What is checked (each bad value raises `AdapterError` naming it, before anything changes):

* construction: `seed` an int in [0, 2**32) (not a bool), `baseline_decay` a real in [0, 1];
* vectors (`forward`, `forward_add`, `adapt` input and `gradient_estimate`): numeric arrays (ints or
  floats, not bools, complex, strings, ragged nests), 1-D [n] or 2-D [T, n] with T >= 1, the module's
  length, every value finite in float32;
* feedback: quality a finite real in [0, 1], reward None or a finite real, latency_us an int >= 0,
  session_id None or a str, source_module an adapted module; `learning_rate`, `ewc_lambda` finite >= 0;
* `adapt_sequence` / `log_likelihood`: model params with the structure and shapes of the
  `model_config` this MicroLoRA was built for; token ids 1-D integers in [0, vocab_size), non-empty,
  prompt + response no longer than max_position_embeddings (floats are refused, never truncated);
* EWC++: a mapping of adapted modules to `EwcState`s whose Fisher and anchor have this MicroLoRA's
  shapes, float dtypes and finite values (Fisher >= 0); Fisher `decay` a real in (0, 1];
* `import_params` / `import_peft`: exactly this MicroLoRA's modules, layers and rank;
* `restore`: a checkpoint of this MicroLoRA's modules, dims, layers, rank, scaling, dropout, baseline
  decay and optimizer (else `StorageError`, as for a missing, partial or corrupt one).

An empty `gradient_estimate` (RuvLLM's empty Vec) means "none": the Hebbian g = input is used.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ruvllm_jax.errors import AdapterError, ConfigError, StorageError
from ruvllm_jax.lora import checkpoint as ckpt
from ruvllm_jax.lora import ewc as ewc_lib
from ruvllm_jax.lora import functional as F
from ruvllm_jax.lora import objective, peft_io
from ruvllm_jax.lora.config import AdaptFeedback, MicroLoraConfig, MicroLoraStats, TargetModule, module_dims
from ruvllm_jax.models.config import LlamaConfig
from ruvllm_jax.sharding import follow_params

EwcStates = Mapping[TargetModule, ewc_lib.EwcState]


SEED_RANGE = (0, 2 ** 32)  # seeds are the 32-bit values jax.random.PRNGKey takes without x64


def _real(name: str, v: Any) -> float:
    return F.check_real(name, v, AdapterError)


class MicroLoRA:
    """Rank-r adapters on the target modules of every layer, learning from feedback."""

    def __init__(self, config: MicroLoraConfig, *, model_config=None, seed: int = 0,
                 baseline_decay: float = F.DEFAULT_BASELINE_DECAY, optimizer: str = "sgd"):
        if not isinstance(optimizer, str) or optimizer not in F.OPTIMIZERS:
            raise ConfigError(f"optimizer must be one of {F.OPTIMIZERS}, got {F.describe(optimizer)}")
        if not isinstance(config, MicroLoraConfig):
            raise ConfigError(f"config must be a MicroLoraConfig, got {F.describe(config)}")
        if model_config is not None and not isinstance(model_config, LlamaConfig):
            raise ConfigError(f"model_config must be a LlamaConfig or None, got {F.describe(model_config)}")
        seed = F.check_int("seed", seed, *SEED_RANGE)
        baseline_decay = _real("baseline_decay", baseline_decay)
        if not 0.0 <= baseline_decay <= 1.0:
            raise AdapterError(f"baseline_decay must be in [0, 1], got {baseline_decay!r}")
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
        if not isinstance(model_config, LlamaConfig):
            raise ConfigError(f"model_config must be a LlamaConfig, got {F.describe(model_config)}")
        cfg = MicroLoraConfig.for_model(model_config, rank=rank, alpha=alpha, dropout=dropout,
                                        target_modules=target_modules)
        return cls(cfg, model_config=model_config, seed=seed, optimizer=optimizer)

    @classmethod
    def from_peft(cls, folder: str, model_config, *, seed: int = 0, optimizer: str = "sgd") -> "MicroLoRA":
        """Import a PEFT LoRA folder made for this model (plain LoRA; other options raise AdapterError).
        Its `lora_dropout` becomes the MicroLoRA's dropout."""
        if not isinstance(model_config, LlamaConfig):
            raise ConfigError(f"model_config must be a LlamaConfig, got {F.describe(model_config)}")
        params, scaling, rank, alpha, targets, dropout = peft_io.load(folder, model_config)
        lora = cls.for_model(model_config, rank=rank, alpha=alpha, dropout=dropout, target_modules=targets,
                             seed=seed, optimizer=optimizer)
        lora.state = F.from_params(params, scaling, rng=lora.state.rng, dropout=dropout,
                                   baseline_decay=lora._baseline_decay, optimizer=optimizer)
        return lora

    def import_peft(self, folder: str) -> None:
        """Replace this MicroLoRA's adapter values by those of a PEFT folder with the same modules, rank
        and lora_alpha (else `AdapterError`, nothing changed); accumulators and optimizer state restart
        as in `import_params`. Build a new one with `from_peft` for another structure."""
        cfg = self._require_model("import_peft")
        params, scaling, rank, alpha, targets, _ = peft_io.load(folder, cfg)
        got = (tuple(sorted(m.key for m in targets)), rank, float(np.float32(scaling)))
        want = (tuple(sorted(self.state.keys)), self.config.rank, float(self.state.scaling))
        if got != want:
            raise AdapterError(f"PEFT folder {folder!r} holds (modules, rank, scaling) {got}, this MicroLoRA has "
                               f"{want}; use MicroLoRA.from_peft for adapters of another structure")
        self.import_params(params)

    def import_params(self, params: Any) -> None:
        """Set the adapter values from a {"layers": ({key: {"A": [in, r], "B": [r, out]}} per layer)} tree
        of exactly this MicroLoRA's modules, layers and rank (float arrays, finite values; float64 is
        rounded to float32). Accumulators, counters and the optimizer state restart (as after
        `from_peft`); scaling, dropout, baseline decay, rng and optimizer are kept."""
        dims = {m.key: d for m, d in self.dims.items()}
        checked = F.check_params(params, dims, self.num_layers, self.config.rank)
        s = self.state
        self.state = F.from_params(checked, s.scaling, rng=s.rng, dropout=s.dropout, baseline_decay=s.baseline_decay,
                                   optimizer=s.optimizer)

    def export_peft(self, folder: str, *, base_model_name_or_path: Optional[str] = None,
                    overwrite: bool = False) -> None:
        """Write a PEFT folder (`adapter_config.json` + `adapter_model.safetensors`). The folder may hold
        other files; one that already holds an adapter is refused (`RuvIoError`) unless `overwrite`, and
        a path that is a file is refused. See `peft_io.save`."""
        self._require_model("export_peft")
        if base_model_name_or_path is not None and not isinstance(base_model_name_or_path, str):
            raise AdapterError(f"base_model_name_or_path must be a str or None, got "
                               f"{F.describe(base_model_name_or_path)}")
        peft_io.save(folder, self.state.params, float(self.state.scaling), dropout=self.config.dropout,
                     base_model_name_or_path=base_model_name_or_path, overwrite=overwrite)

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
        return F.check_int("layer", layer, 0, self.num_layers)

    @staticmethod
    def _array(name: str, v: Any) -> np.ndarray:
        """A host array [n] or [T, n] (T >= 1, n >= 1) of ints or floats, every value finite."""
        a = F.host_array(name, v)
        if a.ndim not in (1, 2) or 0 in a.shape:
            raise AdapterError(f"{name} must be a non-empty vector [n] or matrix [T, n], got {F.describe(v)}")
        return a

    def _vector(self, name: str, v: Any, length: int, module: TargetModule) -> jax.Array:
        a = v if isinstance(v, np.ndarray) else self._array(name, v)
        if a.shape[-1] != length:
            raise AdapterError(f"{name} for {module.name} must have length {length}, got shape {a.shape}")
        return jnp.asarray(a.astype(np.float32))

    # -- RuvLLM API -----------------------------------------------------------------------------------
    def forward(self, x: Any, module: Any, *, layer: int = 0) -> jax.Array:
        """ΔW(x) = scaling · (x @ A) @ B of `module` in `layer` (x [in] or [T, in])."""
        m, layer = self._module(module), self._layer(layer)
        return F.forward(self.state, self._vector("input", self._array("input", x), self.dims[m][0], m), m.key,
                         layer)

    def forward_add(self, x: Any, module: Any, out: Any, *, layer: int = 0) -> jax.Array:
        """out + ΔW(x), as a new array (RuvLLM adds in place)."""
        m, layer = self._module(module), self._layer(layer)
        xv = self._vector("input", self._array("input", x), self.dims[m][0], m)
        ov = self._vector("output", self._array("output", out), self.dims[m][1], m)
        if xv.shape[:-1] != ov.shape[:-1]:
            raise AdapterError(f"output of shape {ov.shape} does not match input of shape {xv.shape} "
                               f"(same leading axes expected)")
        return F.forward_add(self.state, xv, m.key, ov, layer)

    def _advantage_args(self, feedback: AdaptFeedback) -> tuple[float, float, bool]:
        if not isinstance(feedback, AdaptFeedback):
            raise AdapterError(f"feedback must be an AdaptFeedback, got {F.describe(feedback)}")
        q = _real("feedback.quality", feedback.quality)
        if not 0.0 <= q <= 1.0:
            raise AdapterError(f"feedback.quality must be in [0, 1], got {feedback.quality!r}")
        F.check_int("feedback.latency_us", feedback.latency_us, 0)
        if feedback.session_id is not None and not isinstance(feedback.session_id, str):
            raise AdapterError(f"feedback.session_id must be a str or None, got {F.describe(feedback.session_id)}")
        if feedback.source_module is not None:
            self._module(feedback.source_module)
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
        x_raw = self._array("input", input)
        g_raw = feedback.gradient_estimate
        if g_raw is not None:
            g_arr = F.host_array("feedback.gradient_estimate", g_raw)
            has_g = g_arr.size > 0  # an empty estimate (RuvLLM's empty Vec) means none
            if has_g:
                g_raw = self._array("feedback.gradient_estimate", g_raw)
        else:
            has_g = False
        if chosen is not None:
            modules = [self._module(chosen)]
        else:
            n_in = x_raw.shape[-1]
            n_out = g_raw.shape[-1] if has_g else None
            modules = [m for m, (i, o) in self.dims.items() if i == n_in and (n_out is None or o == n_out)]
            if not modules:
                raise AdapterError(
                    f"input of shape {x_raw.shape} fits no target module; (in, out) dims: "
                    f"{ {m.name: d for m, d in self.dims.items()} }"
                )
        d_in = self.dims[modules[0]][0]
        x = self._vector("input", x_raw, d_in, modules[0])
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
        cfg = self._require_model("sequence feedback")
        objective.check_model_params(model_params, cfg)
        tokens, weights = objective.pack(prompt_ids, response_ids, cfg.vocab_size, cfg.max_position_embeddings)
        self.state = follow_params(self.state, model_params, cfg)  # a sharded model: onto its mesh
        j, grads = objective.sequence_gradients(self.state.params, self.state.scaling, model_params, tokens, weights,
                                                cfg=cfg, remat=self.config.gradient_checkpointing)
        self.state = F.accumulate(self.state, grads, q, reward, has_reward)
        return float(j)

    def log_likelihood(self, model_params: dict, prompt_ids: Sequence[int], response_ids: Sequence[int]) -> float:
        """log p(response | prompt) under the model with these adapters."""
        cfg = self._require_model("log_likelihood")
        objective.check_model_params(model_params, cfg)
        tokens, weights = objective.pack(prompt_ids, response_ids, cfg.vocab_size, cfg.max_position_embeddings)
        self.state = follow_params(self.state, model_params, cfg)
        return float(objective.sequence_log_likelihood(self.state.params, self.state.scaling, model_params, tokens,
                                                       weights, cfg=cfg))

    def _require_model(self, what: str):
        if self.model_config is None:
            raise AdapterError(f"{what} needs adapters built for a model (MicroLoRA.for_model)")
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
        lr, by_key = self._lr(learning_rate), self._ewc_by_key(ewc_states)
        self.state = F.apply_updates_with_ewc(self.state, lr, by_key, lam)

    # -- EWC++ --------------------------------------------------------------------------------------------
    def _ewc_by_key(self, ewc_states: EwcStates) -> dict[str, ewc_lib.EwcState]:
        """{module key: EwcState}, each checked against this MicroLoRA's params (AdapterError if not)."""
        if not isinstance(ewc_states, Mapping):
            raise AdapterError(f"ewc_states must be a dict of TargetModule -> EwcState, got {F.describe(ewc_states)}")
        out: dict[str, ewc_lib.EwcState] = {}
        for m, e in ewc_states.items():
            key = self._module(m).key
            if key in out:
                raise AdapterError(f"ewc_states names module {key!r} twice ({m!r})")
            ewc_lib.check_state(e, ewc_lib.module_params(self.state.params, key), f"ewc_states[{key!r}]")
            out[key] = e
        return out

    @staticmethod
    def _decay(decay: Any) -> float:
        d = _real("Fisher decay", decay)
        if not 0.0 < d <= 1.0:
            raise AdapterError(f"Fisher decay must be in (0, 1], got {decay!r}")
        return d

    def ewc_states(self) -> dict[TargetModule, ewc_lib.EwcState]:
        """Fresh EWC++ states (zero Fisher, anchored at the current parameters) for every target."""
        return {m: ewc_lib.init(self.state.params, m.key) for m in self.dims}

    def update_fisher(self, ewc_states: EwcStates, decay: float = ewc_lib.DEFAULT_FISHER_DECAY) -> dict:
        """F ← decay·g² + (1 − decay)·F with the squared per-sample gradients pending since the last
        update (call before `apply_updates*`, which clears them). Returns the new states.

        `decay` is a real in (0, 1]: 1 keeps only the new squared gradients, small values average long."""
        decay = self._decay(decay)
        by_key = self._ewc_by_key(ewc_states)
        return {m: ewc_lib.update_fisher(by_key[self._module(m).key], self.state.grad_sq, self.state.pending,
                                         self._module(m).key, decay)
                for m in ewc_states}

    def reanchor(self, ewc_states: EwcStates) -> dict:
        by_key = self._ewc_by_key(ewc_states)
        return {m: ewc_lib.reanchor(by_key[self._module(m).key], self.state.params, self._module(m).key)
                for m in ewc_states}

    def consolidate(self, ewc_states: EwcStates, decay: float = ewc_lib.DEFAULT_FISHER_DECAY) -> dict:
        """End of a task: fold pending squared gradients into the Fisher, then anchor at θ."""
        self._decay(decay)
        self._ewc_by_key(ewc_states)
        return self.reanchor(self.update_fisher(ewc_states, decay))

    # -- bookkeeping ---------------------------------------------------------------------------------------
    def reset(self) -> None:
        """Fresh A (same seed), B = 0, empty accumulators, counters and baseline back to their start."""
        self.state = F.reset(self.state, jax.random.PRNGKey(self.seed))

    def stats(self, ewc_states: Optional[EwcStates] = None) -> MicroLoraStats:
        p = self.state.params
        norm = lambda which: float(jnp.sqrt(sum(jnp.sum(m[which] ** 2) for l in p["layers"] for m in l.values())))  # noqa: E731
        grad = float(jnp.sqrt(sum(jnp.sum(g ** 2) for g in jax.tree.leaves(self.state.grad))))
        mass = float(sum(ewc_lib.fisher_mass(e) for e in self._ewc_by_key(ewc_states or {}).values()))
        return MicroLoraStats(
            updates_applied=int(self.state.updates), samples_accumulated=int(self.state.samples),
            pending_samples=int(self.state.pending), baseline=float(self.state.baseline),
            a_norm=norm("A"), b_norm=norm("B"), grad_norm=grad, fisher_mass=mass,
            num_parameters=int(sum(x.size for x in jax.tree.leaves(p))),
        )

    # -- persistence -----------------------------------------------------------------------------------------
    def save(self, directory: str, ewc_states: Optional[EwcStates] = None, *, overwrite: bool = False) -> None:
        """Orbax checkpoint of the adapter state (accumulators, counters, baseline) and EWC states.

        `directory` must not exist, or be an empty folder. A folder that already holds a checkpoint is
        refused with `RuvIoError` unless `overwrite=True`, which replaces it only once the new one is
        fully written; a regular file there, or a folder of other files, is always refused. See
        `checkpoint.save`."""
        ckpt.save(directory, self.state, self._ewc_by_key(ewc_states or {}), overwrite=overwrite)

    def _signature(self, state: F.LoraState) -> dict:
        layer0 = state.params["layers"][0]
        return {
            "modules (in, out)": {k: (int(m["A"].shape[0]), int(m["B"].shape[1])) for k, m in layer0.items()},
            "layers": state.num_layers, "rank": int(layer0[state.keys[0]]["A"].shape[1]),
            "scaling": float(state.scaling), "dropout": float(state.dropout),
            "baseline_decay": float(state.baseline_decay), "optimizer": state.optimizer,
        }

    def restore(self, directory: str) -> dict[TargetModule, ewc_lib.EwcState]:
        """Load a checkpoint written by `save` for adapters of the same modules, dims, layers, rank,
        scaling, dropout, baseline decay and optimizer; returns its EWC states. A missing, partial,
        corrupt or mismatched checkpoint raises `StorageError` naming the path, and changes nothing."""
        state, ewc_states = ckpt.restore(directory)
        got, want = self._signature(state), self._signature(self.state)
        if got != want:
            diff = {k: (got[k], want[k]) for k in want if got[k] != want[k]}
            raise StorageError(f"checkpoint {ckpt.display_path(directory)!r} holds other adapters than this MicroLoRA: "
                               f"(checkpoint, this MicroLoRA) = {diff}")
        by_key = {m.key: m for m in TargetModule}
        out = {by_key[k]: e for k, e in ewc_states.items()}
        self.state = state
        return out
