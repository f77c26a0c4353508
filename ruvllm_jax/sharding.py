"""The model, its caches and its adapters laid out over a `jax.sharding.Mesh` (SPMD, MaxText's way).

A mesh has two axes, ``data`` and ``model`` (`ModelConfig.mesh_shape = (data, model)`). The layout
is Megatron's, written as logical rules (`ModelSharding.spec`) that map each weight's axes to mesh
axes:

- attention heads and MLP columns over ``model``: q / k / v / gate / up weights [out, in] split
  their ``out`` rows, o / down split their ``in`` columns (so one all-reduce per block joins them);
- the embedding and LM head over the vocabulary (or, where it does not divide, the hidden size);
- KV caches: KV heads over ``model``, batch over ``data`` (the paged pool, shared by all slots, only
  over ``model``); decode state and sampling parameters: slots over ``data``;
- adapters follow the weight they adapt: B of q/k/v/gate/up splits like that weight's rows, A of
  o/down like its columns; optimizer and Fisher state follow their adapters;
- norms, biases and anything that does not divide: replicated.

On a mesh the fused q/k/v and gate/up weights are kept as tuples of parts (one per module), so each
device holds whole heads and columns of every module; `models.llama` multiplies the parts one by one.
`num_heads` must divide by the ``model`` axis (`ConfigError` otherwise: we do not pad heads). KV heads
either divide by it or, when fewer (GQA with 2 KV heads on 4 or 8 devices), are replicated over it:
every device then keeps all KV heads' keys and values, as vLLM does, at `model / num_kv_heads` times
the per-device cache memory.

Quantized weights (`QuantizedTensor`) split their rows over ``model`` (every row is whole blocks); the
native CPU kernel, which XLA cannot partition, then runs per shard under `shard_map`
(`quant.matmul.quantized_matmul_sharded`). Everything else is plain jit: shardings on the arguments,
XLA's propagation, and `with_sharding_constraint` (`constrain`) where a state must keep its layout
across steps (the engine's decode state).

Loading (`models.loader.load_params(layout=)`, `models.gguf_io.load_gguf(layout=)`) places each tensor
straight onto its shards with `jax.make_array_from_callback` from the one host buffer it was read into,
so no device ever holds a whole weight it does not own, and the same call works across hosts after
`jax.distributed.initialize` (`initialize_distributed`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ruvllm_jax.errors import ConfigError
from ruvllm_jax.models import weights_io
from ruvllm_jax.models.config import LlamaConfig
from ruvllm_jax.quant.tensor import QuantizedTensor
from ruvllm_jax.types import ModelConfig

AXES = ("data", "model")
COLUMN_PARALLEL = ("q", "k", "v", "gate", "up")  # weights whose out rows split over `model`
ROW_PARALLEL = ("o", "down")  # weights whose in columns split over `model`


def make_mesh(shape, devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """A (data, model) mesh over the first data * model of `devices` (default: all, every host's).

    The axes are `Auto`: jit's sharding propagation places what the rules leave open.
    """
    data, model = ModelConfig(mesh_shape=shape).mesh_shape  # validated there
    devices = list(jax.devices() if devices is None else devices)
    if data * model > len(devices):
        raise ConfigError(f"mesh_shape={(data, model)} needs {data * model} devices, only {len(devices)} present "
                          f"(on CPU, XLA_FLAGS=--xla_force_host_platform_device_count=N makes N)")
    grid = np.asarray(devices[: data * model], dtype=object).reshape(data, model)
    auto = getattr(jax.sharding, "AxisType", None)
    if auto is None:  # jax before explicit sharding: every mesh axis is automatic
        return Mesh(grid, AXES)
    return Mesh(grid, AXES, axis_types=(auto.Auto,) * 2)


def _is_quantized(x) -> bool:
    return isinstance(x, QuantizedTensor)


@dataclasses.dataclass(frozen=True)
class ModelSharding:
    """The layout of one model (its `LlamaConfig`) on one mesh: specs and shardings of everything.

    Build with `ModelSharding.create(cfg, mesh)`, which refuses head counts the mesh cannot split.
    Frozen and hashable, so it can be static configuration.
    """

    mesh: Mesh
    cfg: LlamaConfig

    @classmethod
    def create(cls, cfg: LlamaConfig, mesh: Mesh) -> "ModelSharding":
        if tuple(mesh.axis_names) != AXES:
            raise ConfigError(f"the mesh's axes must be named {AXES}, got {tuple(mesh.axis_names)}")
        model = mesh.shape["model"]
        if cfg.num_heads % model:
            divisors = [n for n in range(1, cfg.num_heads + 1) if cfg.num_heads % n == 0]
            raise ConfigError(f"num_heads={cfg.num_heads} does not divide over the mesh's model axis of {model}; "
                              f"use a model axis in {divisors} (heads are not padded)")
        if cfg.num_kv_heads % model and model % cfg.num_kv_heads:
            raise ConfigError(f"num_kv_heads={cfg.num_kv_heads} and the mesh's model axis of {model} do not divide "
                              f"one another: KV heads are split over it when they divide by it, replicated when "
                              f"they divide it")
        return cls(mesh, cfg)

    # -- the rules -------------------------------------------------------------------------------
    @property
    def data(self) -> int:
        return self.mesh.shape["data"]

    @property
    def model(self) -> int:
        return self.mesh.shape["model"]

    @property
    def shard_kv(self) -> bool:
        """Whether KV heads split over `model` (else every device keeps all of them)."""
        return self.cfg.num_kv_heads % self.model == 0

    def _over(self, n: int, axis: str) -> Optional[str]:
        """`axis` if a dimension of n divides over it (and it has more than one device), else None."""
        size = self.mesh.shape[axis]
        return axis if size > 1 and n % size == 0 else None

    def spec(self, role: str, shape: Sequence[int], quantized: bool = False) -> P:
        """The partition spec of a weight of `role` with [rows, cols] `shape` (of the logical matrix).

        Roles: "embed", "lm_head", "q", "k", "v", "o", "gate", "up", "down", "vector" (norms, biases).
        A `QuantizedTensor`'s spec is of its block bytes [rows, row_bytes]: rows only.
        """
        if role == "vector":
            return P()
        rows, cols = shape
        if role in ("k", "v") and not self.shard_kv:
            return P()
        if quantized or role in COLUMN_PARALLEL:
            return P(self._over(rows, "model"), None)
        if role in ROW_PARALLEL:
            return P(None, self._over(cols, "model"))
        if role in ("embed", "lm_head"):
            if self._over(rows, "model"):
                return P("model", None)
            return P(None, self._over(cols, "model"))
        raise ConfigError(f"no sharding rule for a weight of role {role!r}")

    def named(self, spec: P) -> NamedSharding:
        return NamedSharding(self.mesh, spec)

    @property
    def replicated(self) -> NamedSharding:
        return self.named(P())

    def weight(self, role: str, shape: Sequence[int], quantized: bool = False) -> NamedSharding:
        return self.named(self.spec(role, shape, quantized))

    def placer(self, role: str):
        """For `weights_io.materialize(device=)`: the sharding of a `role` weight once its shape is known."""
        return lambda rows, cols, quantized: self.weight(role, (rows, cols), quantized)

    def batch(self, n: int, ndim: int, axis: int = 0) -> NamedSharding:
        """An array of `ndim` axes whose `axis` is n sequences: over `data` when n divides."""
        spec = [None] * ndim
        spec[axis] = self._over(n, "data")
        return self.named(P(*spec))

    # -- params ----------------------------------------------------------------------------------
    def split_fused(self, params: dict) -> dict:
        """The params with fused q/k/v and gate/up weights as tuples of one part per module (the
        layout on a mesh); biases stay fused. Parts already split are kept."""
        c = self.cfg
        layers = []
        for lp in params["layers"]:
            lp = dict(lp)
            lp["wqkv"] = _split_rows(lp["wqkv"], (c.q_size, c.kv_size, c.kv_size))
            lp["w_gate_up"] = _split_rows(lp["w_gate_up"], (c.intermediate_size, c.intermediate_size))
            layers.append(lp)
        return {**params, "layers": tuple(layers)}

    def param_shardings(self, params: dict) -> dict:
        """A pytree like `params` (split layout) whose leaves are their `NamedSharding`s."""

        def weight(w, role):
            if isinstance(w, tuple):
                return tuple(weight(p, r) for p, r in zip(w, role, strict=True))
            if _is_quantized(w):
                return QuantizedTensor(self.weight(role, w.shape, True), w.qtype, w.shape)
            return self.weight(role, w.shape)

        out: dict[str, Any] = {}
        for name, value in params.items():
            if name == "layers":
                out[name] = tuple({k: weight(v, _LAYER_ROLES.get(k, "vector")) for k, v in lp.items()}
                                  for lp in value)
            elif name in ("embed", "lm_head"):
                out[name] = weight(value, name)
            else:
                out[name] = self.replicated
        return out

    def place_params(self, params: dict) -> dict:
        """Params in memory (any device, or numpy) split and moved onto the mesh by the rules."""
        params = self.split_fused(params)
        return jax.tree.map(_place, params, self.param_shardings(params),
                            is_leaf=lambda x: isinstance(x, (jax.Array, np.ndarray)))

    # -- adapters, optimizer and EWC state -------------------------------------------------------
    def adapter_shardings(self, tree: Any) -> Any:
        """Shardings for any pytree holding LoRA adapters ({"layers": ({module: {"A", "B", ...}})}),
        bare or inside optimizer / SONA states: a leaf under module m's "A" / "B" splits as m's weight
        does (B of q/k/v/gate/up over its out columns, A of o/down over its in rows); all else replicated."""

        def rule(path, leaf):
            keys = [getattr(k, "key", getattr(k, "name", None)) for k in path]
            shape = getattr(leaf, "shape", ())
            if len(keys) >= 2 and keys[-1] in ("A", "B") and keys[-2] in _MODULES and len(shape) == 2:
                module, which = keys[-2], keys[-1]
                if which == "B" and module in COLUMN_PARALLEL:
                    spec = self.spec(module, (shape[1], shape[0]))  # B [r, out]: out splits like the rows
                    return self.named(P(None, spec[0]) if len(spec) else P())
                if which == "A" and module in ROW_PARALLEL:
                    return self.named(P(self._over(shape[0], "model"), None))
            return self.replicated

        return jax.tree_util.tree_map_with_path(rule, tree)

    def place_adapters(self, tree: Any) -> Any:
        return None if tree is None else jax.device_put(tree, self.adapter_shardings(tree))

    # -- caches and decode state -----------------------------------------------------------------
    def cache_shardings(self, cache: Any) -> Any:
        """Shardings for a KV cache (contiguous, paged, segmented or two-tier): KV heads over `model`
        (when they divide), the batch over `data` where the batch is an axis of its own."""
        from ruvllm_jax.cache import ContiguousKVCache
        from ruvllm_jax.cache.segmented import SegmentedKVCache

        kv = "model" if self.shard_kv else None

        def rule(path, leaf):
            keys = [getattr(k, "name", getattr(k, "key", None)) for k in path]
            name, shape = keys[-1] if keys else None, getattr(leaf, "shape", ())
            per_seq = isinstance(cache, (ContiguousKVCache, SegmentedKVCache)) or name in ("sink_k", "sink_v")
            if len(shape) == 5 and per_seq:  # a stacked contiguous cache [L, B, KVH, T, D]
                return self.named(P(None, self._over(shape[1], "data"), kv))
            if len(shape) >= 3 and per_seq:  # [B, KVH, T, D]
                return self.named(P(self._over(shape[0], "data"), kv))
            if len(shape) >= 3:  # pools and tiers: [KVH, blocks, ...], blocks shared by all sequences
                return self.named(P(kv))
            return self.replicated

        return jax.tree_util.tree_map_with_path(rule, cache)

    def state_shardings(self, state: Any) -> Any:
        """Shardings for an engine's `DecodeState`: its cache by `cache_shardings`, every per-slot
        field (tokens, positions, presence, PRNG keys, sampling parameters) with slots over `data`."""
        slots = state.token.shape[0]

        def per_slot(x):
            return self.batch(slots, x.ndim) if x.ndim >= 1 and x.shape[0] == slots else self.replicated

        rest = jax.tree.map(per_slot, state.replace(cache=None))
        return rest.replace(cache=self.cache_shardings(state.cache))

    def constrain(self, tree: Any, shardings: Any) -> Any:
        """`with_sharding_constraint` of `tree` to `shardings` (inside jit: keeps a state's layout)."""
        return jax.lax.with_sharding_constraint(tree, shardings)


_LAYER_ROLES = {"wqkv": ("q", "k", "v"), "wo": "o", "w_gate_up": ("gate", "up"), "w_down": "down"}
_MODULES = ("q", "k", "v", "o", "gate", "up", "down")


def _rows(w) -> int:
    return sum(_rows(p) for p in w) if isinstance(w, tuple) else w.shape[0]


def take_rows(w, start: int, stop: int):
    """Rows [start, stop) of a weight: an array, a `QuantizedTensor` (whole rows of blocks) or a tuple of
    parts stacked along rows (the result a tuple again only when the range spans several parts)."""
    if isinstance(w, tuple):
        pieces, at = [], 0
        for p in w:
            n = _rows(p)
            lo, hi = max(start, at), min(stop, at + n)
            if lo < hi:
                pieces.append(take_rows(p, lo - at, hi - at))
            at += n
        return pieces[0] if len(pieces) == 1 else tuple(pieces)
    if start == 0 and stop == w.shape[0]:
        return w
    if _is_quantized(w):
        return QuantizedTensor(w.data[start:stop], w.qtype, (stop - start, w.shape[1]))
    return w[start:stop]


def _split_rows(w, sizes: Sequence[int]) -> tuple:
    if isinstance(w, tuple) and [_rows(p) for p in w] == list(sizes):
        return w
    bounds = np.cumsum([0, *sizes])
    if _rows(w) != bounds[-1]:
        raise ConfigError(f"a fused weight of {_rows(w)} rows cannot split into parts of {list(sizes)} rows")
    return tuple(take_rows(w, int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True))


def _place(x, sharding: NamedSharding):
    """x (an array on any device, or numpy) onto `sharding`, each device given only its own slice."""
    if isinstance(x, jax.Array) and x.is_fully_addressable:
        x = np.asarray(jax.device_get(x))
    return weights_io.place(np.asarray(x), sharding)


def layout_of(params: Any, cfg: LlamaConfig) -> Optional[ModelSharding]:
    """The layout of params that live on a (data, model) mesh, None for params on one device."""
    for leaf in jax.tree_util.tree_leaves(params):
        s = getattr(leaf, "sharding", None)
        if isinstance(s, NamedSharding) and tuple(s.mesh.axis_names) == AXES:
            return ModelSharding(s.mesh, cfg)
    return None


def follow_params(tree: Any, params: Any, cfg: LlamaConfig) -> Any:
    """`tree` (adapters or their training state) moved onto the mesh `params` live on, by the adapter
    rules, when it is not there yet; unchanged when the params are on one device."""
    layout = layout_of(params, cfg)
    if layout is None:
        return tree
    leaves = jax.tree_util.tree_leaves(tree)
    on_mesh = all(isinstance(getattr(x, "sharding", None), NamedSharding) and x.sharding.mesh == layout.mesh
                  for x in leaves)
    return tree if on_mesh else jax.device_put(tree, layout.adapter_shardings(tree))


def per_device_bytes(tree: Any) -> dict[str, int]:
    """Bytes each device holds of the arrays in `tree` (its addressable shards), by device."""
    out: dict[str, int] = {}
    for leaf in jax.tree_util.tree_leaves(tree):
        for shard in getattr(leaf, "addressable_shards", ()):
            key = str(shard.device)
            out[key] = out.get(key, 0) + shard.data.nbytes
    return out


def initialize_distributed(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
                           process_id: Optional[int] = None, **kwargs) -> None:
    """`jax.distributed.initialize` for a multi-host mesh (call it first thing in every process).

    With no arguments jax finds the cluster itself (SLURM, TPU pods, Kubernetes with the environment
    it sets); on plain machines pass the coordinator's "host:port", the number of processes and this
    one's id. On CPU processes it also selects the gloo collectives, which cross-process CPU
    computations need. Afterwards `jax.devices()` lists every host's devices, `make_mesh` spans them,
    and each process loads only its own devices' shards.
    """
    try:  # only CPU computations use it; jax 0.10 defaults to gloo already, older ones did not
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except (AttributeError, ValueError):  # a jax without the option
        pass
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id, **kwargs)
