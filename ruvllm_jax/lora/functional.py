"""MicroLoRA as pure functions over a `LoraState` pytree; every step jits.

The adapter of module m in layer l is `ΔW(x) = scaling · (x @ A) @ B`, A: [in, r] seeded random,
B: [r, out] zero at start. Learning is REINFORCE-like: `adapt` accumulates the gradient (w.r.t. A
and B) of `advantage · <g, ΔW(x)>`, where `g` is the objective's gradient at the module output.
Summed over the positions of a sequence with `g_t = dJ/dy_t`, that is exactly `∇_θ J` (the chain
rule through the module's additive delta), which `accumulate` takes directly from `jax.grad`.
`apply_updates` is an optax SGD step on the *negated* mean gradient: gradient ascent on the
advantage-weighted objective, so positive advantage raises J and negative advantage lowers it.

Validation of user input (NaN quality, lengths) lives in the `MicroLoRA` facade: jitted code cannot
raise on values.
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import Any, Mapping, Optional

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from ruvllm_jax.errors import AdapterError, ConfigError
from ruvllm_jax.lora import ewc as ewc_lib
from ruvllm_jax.lora.config import TargetModule, module_dims

DEFAULT_BASELINE_DECAY = 0.9
OPTIMIZERS = ("sgd", "adam")  # the direction transform before the learning rate
INITIAL_BASELINE = 0.5  # a neutral quality: the first feedback of 0.9 counts as good, 0.1 as bad


@struct.dataclass
class LoraState:
    params: Any  # {"layers": ({key: {"A": [in, r], "B": [r, out]}, ...} per layer)}
    scaling: jax.Array  # f32 []: alpha / rank
    grad: Any  # same structure as params: Σ advantage-weighted gradients since the last update
    grad_sq: Any  # same structure: Σ squared per-sample gradients (for the EWC++ Fisher)
    pending: jax.Array  # i32 []: samples accumulated since the last update
    samples: jax.Array  # i32 []: samples accumulated in total
    updates: jax.Array  # i32 []: updates applied that moved the parameters
    baseline: jax.Array  # f32 []: EMA of quality, the reference for advantage = quality - baseline
    rng: jax.Array  # uint32 [2]: for dropout in `adapt`
    opt_state: Any  # the optimizer's state (empty for SGD)
    optimizer: str = struct.field(pytree_node=False, default="sgd")
    dropout: float = struct.field(pytree_node=False, default=0.0)
    baseline_decay: float = struct.field(pytree_node=False, default=DEFAULT_BASELINE_DECAY)

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(self.params["layers"][0])

    @property
    def num_layers(self) -> int:
        return len(self.params["layers"])


def _key(module) -> str:
    return module if isinstance(module, str) else TargetModule.parse(module).key


def init(
    key: jax.Array, dims: Mapping[Any, tuple[int, int]], num_layers: int, rank: int, alpha: float,
    *, dropout: float = 0.0, baseline_decay: float = DEFAULT_BASELINE_DECAY, optimizer: str = "sgd",
) -> LoraState:
    """Fresh adapters for `dims` {module: (in, out)} in each of `num_layers` layers.

    A ~ U(-1/sqrt(in), 1/sqrt(in)) (PEFT's kaiming-uniform default), B = 0: ΔW starts at zero.
    """
    init_key, rng = jax.random.split(key)
    keys = iter(jax.random.split(init_key, num_layers * len(dims)))
    layers = []
    for _ in range(num_layers):
        layer = {}
        for module, (d_in, d_out) in dims.items():
            bound = 1.0 / math.sqrt(d_in)
            a = jax.random.uniform(next(keys), (d_in, rank), jnp.float32, -bound, bound)
            layer[_key(module)] = {"A": a, "B": jnp.zeros((rank, d_out), jnp.float32)}
        layers.append(layer)
    params = {"layers": tuple(layers)}
    return from_params(params, alpha / rank, rng=rng, dropout=dropout, baseline_decay=baseline_decay,
                       optimizer=optimizer)


def from_params(params: dict, scaling: float, *, rng: Optional[jax.Array] = None, dropout: float = 0.0,
                baseline_decay: float = DEFAULT_BASELINE_DECAY, optimizer: str = "sgd", device=None) -> LoraState:
    """A state around given adapter weights (e.g. imported from PEFT), with empty accumulators."""
    params = {"layers": tuple({k: {"A": jnp.asarray(v["A"], jnp.float32), "B": jnp.asarray(v["B"], jnp.float32)}
                               for k, v in layer.items()} for layer in params["layers"])}
    zeros = jax.tree.map(jnp.zeros_like, params)
    state = LoraState(
        params=params, scaling=jnp.float32(scaling), grad=zeros, grad_sq=zeros, pending=jnp.int32(0),
        samples=jnp.int32(0), updates=jnp.int32(0), baseline=jnp.float32(INITIAL_BASELINE),
        rng=jax.random.PRNGKey(0) if rng is None else rng, opt_state=_direction(optimizer).init(params),
        optimizer=optimizer, dropout=float(dropout), baseline_decay=float(baseline_decay),
    )
    # Commit every leaf to one device, as jitted updates return them: a jit argument's sharding is
    # part of its cache key, so uncommitted fresh arrays would cost one extra compile after an update.
    return jax.device_put(state, device or jax.devices()[0])


def _direction(optimizer: str) -> optax.GradientTransformation:
    if optimizer == "sgd":
        return optax.identity()
    if optimizer == "adam":
        return optax.scale_by_adam()
    raise ConfigError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")


def adapters(state: LoraState) -> dict:
    """The pytree `models.llama` applies: {"layers": ({key: {"A", "B", "scaling"}}, ...)}."""
    return {"layers": tuple({k: {**m, "scaling": state.scaling} for k, m in layer.items()}
                            for layer in state.params["layers"])}


def lora_output(module_p: dict, scaling: jax.Array, x: jax.Array) -> jax.Array:
    """ΔW(x) = scaling · (x @ A) @ B for x [..., in] -> [..., out]."""
    chex.assert_axis_dimension(x, -1, module_p["A"].shape[0])
    return ((x @ module_p["A"]) @ module_p["B"]) * scaling


@functools.partial(jax.jit, static_argnames=("module", "layer"))
def forward(state: LoraState, x: jax.Array, module: str, layer: int = 0) -> jax.Array:
    """The adapter's output ΔW(x) for `module` in `layer`."""
    return lora_output(state.params["layers"][layer][module], state.scaling, x.astype(jnp.float32))


@functools.partial(jax.jit, static_argnames=("module", "layer"))
def forward_add(state: LoraState, x: jax.Array, module: str, out: jax.Array, layer: int = 0) -> jax.Array:
    """out + ΔW(x): RuvLLM's in-place `forward_add`, returning the new array."""
    return out + lora_output(state.params["layers"][layer][module], state.scaling, x.astype(jnp.float32))


def _advantage(state: LoraState, quality, reward, has_reward):
    adv = jnp.where(has_reward, reward, quality - state.baseline)
    baseline = state.baseline_decay * state.baseline + (1.0 - state.baseline_decay) * quality
    return adv.astype(jnp.float32), baseline.astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("modules", "layer"))
def adapt(
    state: LoraState, x: jax.Array, g: Optional[jax.Array], quality, reward=0.0, has_reward=False,
    *, modules: tuple[str, ...], layer: int = 0,
) -> LoraState:
    """Accumulate ∇_{A,B} advantage·<g, ΔW(x)> for each module in `modules` of `layer`.

    x: [in] or [T, in] (rows are positions, summed); g: [out] / [T, out], or None for the Hebbian
    g = x (square modules only). advantage = reward if has_reward else quality - baseline; the
    baseline then moves towards quality. One call is one sample, whatever the number of modules.
    """
    adv, baseline = _advantage(state, quality, reward, has_reward)
    x = x.astype(jnp.float32)
    rng, drop_key = jax.random.split(state.rng)
    if state.dropout > 0.0:
        keep = jax.random.bernoulli(drop_key, 1.0 - state.dropout, x.shape)
        x = jnp.where(keep, x / (1.0 - state.dropout), 0.0)
    gvec = x if g is None else g.astype(jnp.float32)
    chex.assert_equal(x.ndim, gvec.ndim)
    grad_layers = list(state.grad["layers"])
    sq_layers = list(state.grad_sq["layers"])
    grad_l, sq_l = dict(grad_layers[layer]), dict(sq_layers[layer])
    for m in modules:
        mp = state.params["layers"][layer][m]
        objective = lambda p: adv * jnp.sum(gvec * lora_output(p, state.scaling, x))  # noqa: E731
        gm = jax.grad(objective)(mp)
        grad_l[m] = jax.tree.map(jnp.add, grad_l[m], gm)
        sq_l[m] = jax.tree.map(lambda s, d: s + d * d, sq_l[m], gm)
    grad_layers[layer], sq_layers[layer] = grad_l, sq_l
    return state.replace(
        grad={"layers": tuple(grad_layers)}, grad_sq={"layers": tuple(sq_layers)},
        pending=state.pending + 1, samples=state.samples + 1, baseline=baseline, rng=rng,
    )


@jax.jit
def accumulate(state: LoraState, grads: dict, quality, reward=0.0, has_reward=False) -> LoraState:
    """Add one sample's full gradient tree ∇_θ J (e.g. of a sequence's log-likelihood), weighted by
    its advantage. Same as `adapt` at every position and module with g_t = dJ/dy_t."""
    adv, baseline = _advantage(state, quality, reward, has_reward)
    weighted = jax.tree.map(lambda d: adv * d, grads)
    return state.replace(
        grad=jax.tree.map(jnp.add, state.grad, weighted),
        grad_sq=jax.tree.map(lambda s, d: s + d * d, state.grad_sq, weighted),
        pending=state.pending + 1, samples=state.samples + 1, baseline=baseline,
    )


def _step(state: LoraState, loss_grad: dict, lr) -> LoraState:
    """One optax step on `loss_grad` (SGD, or Adam's direction, then -lr). Clears the accumulators."""
    direction, opt_state = _direction(state.optimizer).update(loss_grad, state.opt_state, state.params)
    updates, _ = optax.scale_by_learning_rate(lr).update(direction, optax.EmptyState())
    zeros = jax.tree.map(jnp.zeros_like, state.params)
    moved = (state.pending > 0).astype(jnp.int32)
    return state.replace(params=optax.apply_updates(state.params, updates), grad=zeros, grad_sq=zeros,
                         pending=jnp.int32(0), updates=state.updates + moved, opt_state=opt_state)


def mean_gradient(state: LoraState) -> dict:
    n = jnp.maximum(state.pending, 1).astype(jnp.float32)
    return jax.tree.map(lambda g: g / n, state.grad)


@jax.jit
def apply_updates(state: LoraState, lr) -> LoraState:
    """θ ← θ + lr · mean accumulated gradient (an optax step on its negation: gradient ascent on the
    advantage-weighted objective); with "adam" the direction is Adam's. Clears the accumulators."""
    return _step(state, jax.tree.map(jnp.negative, mean_gradient(state)), lr)


@jax.jit
def apply_updates_with_ewc(state: LoraState, lr, ewc_states: Mapping[str, ewc_lib.EwcState], ewc_lambda) -> LoraState:
    """As `apply_updates`, with the EWC++ term λ·F·(θ − θ*) added to the loss gradient of each module
    that has an `EwcState` (keyed by module key "q", "v", ...)."""
    loss_grad = jax.tree.map(jnp.negative, mean_gradient(state))
    layers = [dict(l) for l in loss_grad["layers"]]
    for key, ewc in ewc_states.items():
        pen = ewc_lib.penalty_grad(ewc, ewc_lib.module_params(state.params, key), ewc_lambda)
        for i, layer in enumerate(layers):
            layer[key] = jax.tree.map(jnp.add, layer[key], pen["layers"][i])
    return _step(state, {"layers": tuple(layers)}, lr)


def reset(state: LoraState, key: jax.Array) -> LoraState:
    """Fresh A (from `key`), B = 0, counters and baseline back to their start."""
    dims = {k: (m["A"].shape[0], m["B"].shape[1]) for k, m in state.params["layers"][0].items()}
    rank = state.params["layers"][0][state.keys[0]]["A"].shape[1]
    return init(key, dims, state.num_layers, rank, float(state.scaling) * rank,
                dropout=state.dropout, baseline_decay=state.baseline_decay, optimizer=state.optimizer)


# -- host-side validation (used by the MicroLoRA facade, checkpoint and peft_io) ---------------------------------
# Jitted code cannot raise on values, so every check below runs on the host before any state changes.

def describe(v: Any, limit: int = 120) -> str:
    """A short, readable account of a value for an error message: arrays by type, dtype and shape."""
    if isinstance(v, (np.ndarray, jax.Array)) and np.ndim(v) > 0:
        return f"{type(v).__name__} of dtype {v.dtype} and shape {tuple(v.shape)}"
    r = repr(v)
    return r if len(r) <= limit else f"{r[:limit]}... ({type(v).__name__} of {len(r)} characters)"


def _is_float_dtype(dtype) -> bool:
    return bool(jnp.issubdtype(dtype, jnp.floating))


def _is_numeric_dtype(dtype) -> bool:
    """Ints and floats (bfloat16 included); never bool, complex, strings or objects."""
    return bool(np.issubdtype(dtype, np.integer) or _is_float_dtype(dtype))


def check_real(name: str, v: Any, exc: type = AdapterError) -> float:
    """A real number finite in float32, where it is used (a Python/NumPy int or float, a Fraction, or a
    0-d numeric array); bools, complex, Decimal, strings and None are refused."""
    if isinstance(v, (np.ndarray, jax.Array)) and v.ndim == 0 and _is_numeric_dtype(v.dtype):
        v = np.asarray(v).item()
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Real):
        raise exc(f"{name} must be a finite real number, got {describe(v)}")
    try:
        f = float(v)
    except (OverflowError, ValueError, TypeError):
        f = math.inf
    if not math.isfinite(f) or abs(f) > float(np.finfo(np.float32).max):
        raise exc(f"{name} must be a finite real number, got {describe(v)}")
    return f


def check_int(name: str, v: Any, lo: int, hi: Optional[int] = None, exc: type = AdapterError) -> int:
    """An integer (not a bool) in [lo, hi) (hi None: no upper bound)."""
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Integral) or v < lo or (hi is not None
                                                                                          and v >= hi):
        want = f"[{lo}, {hi})" if hi is not None else f">= {lo}"
        raise exc(f"{name} must be an integer {want}, got {describe(v)}")
    return int(v)


def host_array(name: str, v: Any, *, floating: bool = False, exc: type = AdapterError) -> np.ndarray:
    """`v` as a host NumPy array of a numeric dtype (float dtypes only with `floating`), every value
    finite once cast to float32. Ragged nests, strings, None, bools, complex and objects raise `exc`."""
    try:
        a = np.asarray(v)
    except (ValueError, TypeError, OverflowError) as e:  # ragged nests, objects that refuse to convert
        raise exc(f"{name} must be a numeric array, got {describe(v)} ({e})") from None
    ok = _is_float_dtype(a.dtype) if floating else _is_numeric_dtype(a.dtype)
    if not ok:
        kinds = "a floating-point" if floating else "an integer or floating-point"
        raise exc(f"{name} must be an array of {kinds} dtype, got {describe(v)} (dtype {a.dtype})")
    with np.errstate(over="ignore", invalid="ignore"):
        finite = np.isfinite(a.astype(np.float32))
    if not np.all(finite):
        bad = np.asarray(a[~finite] if a.ndim else a).ravel()[:3].tolist()
        raise exc(f"{name} contains NaN or infinite values in float32 (e.g. {bad}); every value must be finite")
    return a


def _tree_dict(name: str, v: Any, keys: Optional[set] = None, exc: type = AdapterError) -> Mapping:
    if not isinstance(v, Mapping):
        raise exc(f"{name} must be a dict, got {describe(v)}")
    if keys is not None and set(v) != keys:
        missing, extra = sorted(map(str, keys - set(v))), sorted(map(str, set(v) - keys))
        raise exc(f"{name} must have exactly the keys {sorted(keys)}; missing {missing}, unexpected {extra}")
    return v


def _layers(name: str, tree: Any, num_layers: int, exc: type) -> tuple:
    tree = _tree_dict(name, tree, {"layers"}, exc)
    layers = tree["layers"]
    if not isinstance(layers, (list, tuple)):
        raise exc(f"{name}['layers'] must be a list or tuple of per-layer dicts, got {describe(layers)}")
    if len(layers) != num_layers:
        raise exc(f"{name} have {len(layers)} layers, the model has {num_layers}")
    return tuple(layers)


def check_params(params: Any, dims: Mapping[str, tuple[int, int]], num_layers: int, rank: int, *,
                 name: str = "adapter params", exc: type = AdapterError) -> dict:
    """Validate a params tree {"layers": ({key: {"A": [in, rank], "B": [rank, out]}} per layer)}: exactly
    the modules `dims` {key: (in, out)}, `num_layers` layers, float dtypes, finite values. Returns it as
    float32 NumPy arrays (bf16/f16 exactly; f64 rounded to float32)."""
    out = []
    for i, layer in enumerate(_layers(name, params, num_layers, exc)):
        layer = _tree_dict(f"{name} layer {i}", layer, set(dims), exc)
        new = {}
        for k, (d_in, d_out) in dims.items():
            m = _tree_dict(f"{name} layer {i} module {k!r}", layer[k], {"A", "B"}, exc)
            arrays = {}
            for which, want in (("A", (d_in, rank)), ("B", (rank, d_out))):
                a = host_array(f"{name} layer {i} module {k!r} {which}", m[which], floating=True, exc=exc)
                if a.shape != want:
                    raise exc(f"{name} layer {i} module {k!r}: {which} has shape {a.shape}, expected {want} "
                              f"((in, out) = {(d_in, d_out)}, rank {rank})")
                arrays[which] = a.astype(np.float32)
            new[k] = arrays
        out.append(new)
    return {"layers": tuple(out)}


def check_adapters(adapters: Any, model_cfg) -> None:
    """Raise `AdapterError` unless `adapters` is a {"layers": [...]} tree that fits `model_cfg`: one
    dict per layer mapping module keys the model has to {"A": [in, r], "B": [r, out], "scaling": []}
    (r >= 1, float dtypes, finite values). What `models.llama` applies, checked before it is used."""
    if not isinstance(adapters, Mapping) or "layers" not in adapters:
        raise AdapterError(
            f"adapters must be a dict with a 'layers' list (or a MicroLoRA), got {describe(adapters)}"
        )
    layers = _layers("adapters", adapters, model_cfg.num_layers, AdapterError)
    dims = {m.key: d for m, d in module_dims(model_cfg).items()}
    for i, layer in enumerate(layers):
        layer = _tree_dict(f"adapters layer {i}", layer)
        for k, m in layer.items():
            if k not in dims:
                raise AdapterError(f"layer {i}: the model has no module {k!r}; modules: {list(dims)}")
            where = f"adapters layer {i} module {k!r}"
            m = _tree_dict(where, m, {"A", "B", "scaling"})
            a, b, s = (host_array(f"{where} {w}", m[w], floating=True) for w in ("A", "B", "scaling"))
            if a.ndim != 2 or b.ndim != 2 or a.shape[0] != dims[k][0] or b.shape[1] != dims[k][1] \
                    or a.shape[1] != b.shape[0] or a.shape[1] < 1:
                raise AdapterError(f"layer {i} module {k!r}: A {a.shape} / B {b.shape} do not fit "
                                   f"(in, out) = {dims[k]}")
            if s.ndim != 0:
                raise AdapterError(f"{where} scaling must be a scalar, got shape {s.shape}")
