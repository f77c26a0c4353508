"""The generation engine: one jitted prefill, then jitted chunks of decode steps on device.

Decoding follows gemma's sampler: the loop state is a pytree (`DecodeState`), one pure step feeds
the last token through the model and samples the next, and a `lax.while_loop` runs up to `chunk`
steps on device, stopping early once every sequence is done. The host sees tokens once per chunk
(`limit` is traced, so streaming asks for one step at a time with the same executable). Inside a
chunk new keys/values go to a short `SegmentedKVCache` segment, written back once per chunk, so
the loop never copies the whole cache.

Shapes are bucketed so nothing recompiles per prompt: prompts pad to a power of two (>= 16) and the
cache to a power of two >= prompt + max_tokens, capped at the model's `max_context`. Sampling
values are traced too; only whether any row samples is static (`greedy`: steps of greedy rows
compile just the argmax, ~0.1 GB less compile memory and time on XLA:CPU; see `_resolve_greedy`).
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from ruvllm_jax.backend.sampling import (
    SamplingParams,
    greedy_tokens,
    presence_from_tokens,
    sample,
    update_presence,
)
from ruvllm_jax.cache import ContiguousKVCache
from ruvllm_jax.cache.paged import KV_DTYPES, PagedKVCache, PagedSpec, apply_copies
from ruvllm_jax.cache.segmented import SegmentedKVCache
from ruvllm_jax.cache.two_tier import TwoTierKVCache, TwoTierSpec
from ruvllm_jax.errors import ConfigError, GenerationError, KvCacheError
from ruvllm_jax.host_memory import lean_jit
from ruvllm_jax.kernels import KernelOptions
from ruvllm_jax.models import llama
from ruvllm_jax.models.config import LlamaConfig
from ruvllm_jax.sharding import ModelSharding
from ruvllm_jax.types import SEED_LIMIT, KvCacheConfig

DEFAULT_CHUNK = 32
MIN_PROMPT_BUCKET = 16
MIN_CACHE_BUCKET = 64
DEFAULT_KERNEL = KernelOptions()  # "auto": Pallas on GPU/TPU, jnp on CPU


@struct.dataclass
class DecodeState:
    """The decode loop's state (gemma's sampler): one row per sequence, or per slot of an `Engine`.

    `rng` is one key for the batch, or one key per row [B] (an engine's slots: each request its own
    stream). An engine's state also carries each slot's sampling parameters (fields [B]) and the
    tokens it may still generate (`remaining`); a free slot is `done`.
    """

    cache: Any
    token: jax.Array  # [B] last sampled token, not yet fed through the model
    position: jax.Array  # [B] the position `token` will occupy
    presence: jax.Array  # [B, V] bool: tokens seen so far (for the repetition penalty)
    done: jax.Array  # [B] bool
    rng: jax.Array
    remaining: Optional[jax.Array] = None  # [B] int32: tokens each row may still generate
    sampling: Optional[SamplingParams] = None  # per-row parameters; None: the loop's argument


def pow2_bucket(n: int, floor: int) -> int:
    """The smallest power of two >= n and >= floor: the shape buckets of prompts, caches and tables."""
    return max(floor, 1 << max(0, (n - 1).bit_length()))


# The longest cache `JaxBackend` runs the layer scan over. Inside the scan each layer reads its keys
# and values out of the stacked cache through a traced index, which XLA:CPU copies for the attention
# dots: per decode step 2 KVH T D floats per layer, nothing against the weights at short contexts but
# 6-19% of the step at T = 2048-4096 (0.5B Q8_0: 0.81-0.94x the unrolled loop's tok/s there, two
# rounds, `experiments/results/scan_long_context.json`). Longer caches unroll; their KV cache dwarfs
# the compile memory the scan saves.
LAYER_SCAN_MAX_LEN = 1024


def buckets(prompt_len: int, max_tokens: int, max_context: int) -> tuple[int, int]:
    """(prompt bucket, cache length) for a request; `GenerationError` if it cannot fit."""
    if prompt_len <= 0:
        raise GenerationError("the prompt encodes to no tokens; at least one is needed")
    if prompt_len + max_tokens > max_context:
        raise GenerationError(
            f"prompt of {prompt_len} tokens + max_tokens={max_tokens} = {prompt_len + max_tokens} "
            f"exceeds max_context={max_context}"
        )
    cache_len = min(pow2_bucket(prompt_len + max_tokens, MIN_CACHE_BUCKET), max_context)
    prompt_bucket = min(pow2_bucket(prompt_len, MIN_PROMPT_BUCKET), cache_len)
    return prompt_bucket, cache_len


def _is_eos(tokens: jax.Array, eos_ids: jax.Array) -> jax.Array:
    return jnp.any(tokens[:, None] == eos_ids[None, :], axis=-1)


@functools.partial(jax.jit, static_argnames=("cfg", "kernel"), donate_argnames=("cache",))
def prefill_and_sample(
    params, tokens, lengths, cache, sampling: SamplingParams, rng, eos_ids, adapters=None, *,
    cfg: LlamaConfig, kernel: KernelOptions = DEFAULT_KERNEL,
) -> DecodeState:
    """Run padded prompts tokens [B, S] (real lengths [B]) and sample each first new token."""
    logits, cache = llama.prefill(params, cfg, tokens, cache, adapters=adapters, kernel=kernel,
                                  logit_positions=lengths - 1, lengths=lengths)
    presence = presence_from_tokens(tokens, lengths, cfg.vocab_size)
    rng, key = jax.random.split(rng)
    token = sample(key, logits, presence, sampling)
    return DecodeState(
        cache=cache, token=token, position=lengths.astype(jnp.int32), presence=update_presence(presence, token),
        done=_is_eos(token, eos_ids), rng=rng,
    )


def split_rng(rng: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(next rng, key to draw with) for one key, or row by row for keys [B] (each row's stream is
    exactly the stream it has alone)."""
    if rng.ndim == 0:
        rng, key = jax.random.split(rng)
        return rng, key
    pairs = jax.vmap(jax.random.split)(rng)
    return pairs[:, 0], pairs[:, 1]


def _draw(key, logits, presence, sampling: SamplingParams, greedy: bool) -> jax.Array:
    """The next token of each row: `sample`, or its greedy branch alone when the caller knows every
    row is greedy (a smaller program; the key is still split, so PRNG streams do not depend on it)."""
    return greedy_tokens(logits, presence, sampling) if greedy else sample(key, logits, presence, sampling)


def decode_step(params, state: DecodeState, sampling: SamplingParams, eos_ids, adapters, cfg: LlamaConfig,
                kernel: KernelOptions, greedy: bool = False):
    """Feed each sequence's last token, sample the next. Finished sequences stay frozen."""
    logits, cache = llama.decode(params, cfg, state.token, state.position, state.cache, adapters=adapters,
                                 kernel=kernel)
    rng, key = split_rng(state.rng)
    sampling = sampling if state.sampling is None else state.sampling
    token = jnp.where(state.done, state.token, _draw(key, logits, state.presence, sampling, greedy))
    done = state.done | _is_eos(token, eos_ids)
    remaining = state.remaining
    if remaining is not None:
        remaining = remaining - jnp.where(state.done, 0, 1)
        done = done | (remaining <= 0)
    return state.replace(
        cache=cache,
        token=token,
        position=state.position + jnp.where(state.done, 0, 1),
        presence=update_presence(state.presence, token),
        done=done,
        rng=rng,
        remaining=remaining,
    )


@functools.partial(jax.jit, static_argnames=("cfg", "chunk", "kernel"), donate_argnames=("state",))
def decode_chunk(
    params, state: DecodeState, sampling: SamplingParams, eos_ids, limit, adapters=None, *,
    cfg: LlamaConfig, chunk: int = DEFAULT_CHUNK, kernel: KernelOptions = DEFAULT_KERNEL,
):
    """Up to min(chunk, limit) decode steps on device -> (state, tokens [B, chunk] (-1 = none), count)."""
    return decode_loop(params, state, sampling, eos_ids, limit, adapters, cfg=cfg, chunk=chunk, kernel=kernel)


def decode_loop(params, state: DecodeState, sampling, eos_ids, limit, adapters, *, cfg: LlamaConfig, chunk: int,
                kernel: KernelOptions, greedy: bool = False):
    """`decode_chunk`'s body, for callers already inside jit (the engine's `generate`)."""
    b = state.token.shape[0]

    def cond(carry):
        i, st, _ = carry
        return (i < jnp.minimum(limit, chunk)) & ~jnp.all(st.done)

    def body(carry):
        i, st, out = carry
        was_done = st.done
        st = decode_step(params, st, sampling, eos_ids, adapters, cfg, kernel, greedy)
        out = out.at[:, i].set(jnp.where(was_done, -1, st.token))
        return i + 1, st, out

    out = jnp.full((b, chunk), -1, jnp.int32)
    segmented = isinstance(state.cache, ContiguousKVCache) and SegmentedKVCache.supports(cfg.sliding_windows)
    if segmented:  # append to a short segment inside the loop; one write-back per chunk
        segment = SegmentedKVCache.open(state.cache, state.position, min(chunk, state.cache.max_len))
        state = state.replace(cache=segment)  # (a chunk never runs past the cache's end)
    count, state, out = jax.lax.while_loop(cond, body, (jnp.int32(0), state, out))
    if segmented:
        state = state.replace(cache=state.cache.close())
    return state, out, count


def new_cache(cfg: LlamaConfig, batch: int, max_len: int, dtype=jnp.float32,
              kv_cache_config: Optional[KvCacheConfig] = None, stacked: bool = False):
    """The cache a generation runs on: contiguous full precision [B, KVH, max_len, D] per layer
    (`stacked`: one [L, ...] array, for the layer scan), or
    with `kv_cache_config` the two-tier quantized cache (its shape fixed by the config, heads and
    head_dim the model's; `max_len` then only has to fit when eviction is off)."""
    if kv_cache_config is None:
        return ContiguousKVCache.init(
            num_layers=cfg.num_layers, batch=batch, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
            max_len=max_len, dtype=dtype, stacked=stacked,
        )
    spec = two_tier_spec(cfg, kv_cache_config)
    check_two_tier_fits(spec, max_len)
    return TwoTierKVCache.init(spec, num_layers=cfg.num_layers, batch=batch)


def check_two_tier_fits(spec: TwoTierSpec, tokens: int, what: str = "a generation") -> None:
    """`KvCacheError` when `tokens` exceed the two-tier cache's capacity and it may not evict."""
    if not spec.config.eviction and tokens > spec.capacity:
        raise KvCacheError(f"{what} of up to {tokens} tokens does not fit a two-tier cache of "
                           f"{spec.capacity} tokens with eviction off (KvCacheConfig.eviction=False)")


def two_tier_spec(cfg: LlamaConfig, kv_cache_config: KvCacheConfig) -> TwoTierSpec:
    """The two-tier layout for this model: the config's tiers, the model's heads; refused for
    sliding-window layers (the tail ring does not place the query for a window)."""
    if any(w is not None for w in cfg.sliding_windows):
        raise KvCacheError(f"the two-tier KV cache does not support sliding-window layers (model windows "
                           f"{sorted({w for w in cfg.sliding_windows if w is not None})}); use kv_cache_config=None")
    return TwoTierSpec.from_config(kv_cache_config, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim)


def make_rng(seed: Optional[int]) -> jax.Array:
    """A PRNG key from a seed in [0, 2**64) (`types.SEED_LIMIT`); fresh OS entropy when seed is None.

    The key is seeded with the low 32 bits and folds in the high 32 bits, so every seed in the range
    gives its own stream (and seeds below 2**63 keep the streams they always had). A seed outside
    the range, a bool or a non-int is a `ConfigError`: masking it would alias another seed.
    """
    seed = _seed_value(seed)
    key = jax.random.key(seed & 0xFFFFFFFF)
    return jax.random.fold_in(key, seed >> 32)


def make_rngs(seeds: Sequence[Optional[int]]) -> jax.Array:
    """`make_rng(seed)` for each seed, stacked into keys [len(seeds)], by one small jitted program.

    Why not stack `make_rng`s: each of its eager ops (the seeding, the fold-in, the stack) is an XLA
    program of its own, compiled on first use (each kept ~1.5 MB and tens of ms of a first prefill)."""
    values = [_seed_value(s) for s in seeds]
    low = np.asarray([v & 0xFFFFFFFF for v in values], np.uint32)
    high = np.asarray([v >> 32 for v in values], np.uint32)
    return _keys_from_halves(low, high)


def _seed_value(seed: Optional[int]) -> int:
    if seed is None:
        import secrets

        seed = secrets.randbits(64)
    if not isinstance(seed, numbers.Integral) or isinstance(seed, bool) or not 0 <= seed < SEED_LIMIT:
        raise ConfigError(f"seed must be None or an int in [0, 2**64), got {seed!r}")
    return int(seed)


@jax.jit
def _keys_from_halves(low: jax.Array, high: jax.Array) -> jax.Array:
    return jax.vmap(lambda lo, hi: jax.random.fold_in(jax.random.key(lo), hi))(low, high)


# --------------------------------------------------------------------------------------------------
# The engine: slots, a paged pool, one decode step for every slot (JetStream's engine_api shape).

DEFAULT_POOL_TOKENS = 8192  # the default pool when EngineConfig.num_blocks is None (see `num_blocks`)
_LAYOUTS = ("paged", "contiguous")


def _positive_int(value, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ConfigError(f"EngineConfig.{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Static shape of an engine (hashable; every field change compiles its own executables).

    - `max_slots`: sequences decoded together (the batch of every decode step);
    - `max_len`: the longest a sequence gets, prompt + generation (a session: the whole conversation);
    - `layout` "paged": a pool of `num_blocks` blocks of `block_size` tokens shared by all slots
      (None: room for every slot at `max_len`, capped at `DEFAULT_POOL_TOKENS` tokens), in
      `kv_dtype` ("float32", "float16", "bfloat16" or "int8" with per-token scales);
      "contiguous": one slot with its own [max_len] cache, the single-sequence path (the
      segmented decode of `decode_chunk`; or the two-tier cache with `kv_cache_config`);
    - `chunk`: decode steps per device call; `kernel`: how attention runs;
    - `layer_scan` (contiguous full-precision cache only): stack the cache's layers, so that a model
      whose layers are native-quantized runs them as one `lax.scan` (see `ruvllm_jax.models.llama`),
      and compile the programs with `host_memory.lean_jit`'s options. Both cut what the first
      generation needs beyond the weights (0.5B Q8_0 GGUF: peak 1.51x -> 1.23x the weights); for
      float models the stacked cache only costs (an unrolled loop copies its per-layer slices).
    """

    max_slots: int = 8
    max_len: int = 2048
    layout: str = "paged"
    block_size: int = 16
    num_blocks: Optional[int] = None
    kv_dtype: str = "float32"
    chunk: int = DEFAULT_CHUNK
    kernel: KernelOptions = DEFAULT_KERNEL
    kv_cache_config: Optional[KvCacheConfig] = None
    layer_scan: bool = False

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
        set_("max_slots", _positive_int(self.max_slots, "max_slots"))
        set_("max_len", _positive_int(self.max_len, "max_len"))
        set_("block_size", _positive_int(self.block_size, "block_size"))
        set_("chunk", _positive_int(self.chunk, "chunk"))
        if self.layout not in _LAYOUTS:
            raise ConfigError(f"EngineConfig.layout must be one of {_LAYOUTS}, got {self.layout!r}")
        if self.num_blocks is not None:
            set_("num_blocks", _positive_int(self.num_blocks, "num_blocks"))
        if not isinstance(self.kernel, KernelOptions):
            raise ConfigError(f"EngineConfig.kernel must be a KernelOptions, got {self.kernel!r}")
        if self.kv_cache_config is not None and not isinstance(self.kv_cache_config, KvCacheConfig):
            raise ConfigError(f"EngineConfig.kv_cache_config must be None or a KvCacheConfig, "
                              f"got {self.kv_cache_config!r}")
        if not isinstance(self.layer_scan, bool):
            raise ConfigError(f"EngineConfig.layer_scan must be a bool, got {self.layer_scan!r}")
        if self.layer_scan and (self.layout != "contiguous" or self.kv_cache_config is not None):
            raise ConfigError("EngineConfig.layer_scan stacks a contiguous full-precision cache: it needs "
                              "layout='contiguous' and no kv_cache_config")
        if self.layout == "paged":
            if self.kv_dtype not in KV_DTYPES:
                raise ConfigError(f"EngineConfig.kv_dtype must be one of {KV_DTYPES}, got {self.kv_dtype!r}")
            if self.kv_cache_config is not None:
                raise ConfigError("the two-tier cache (kv_cache_config) runs on layout='contiguous', not 'paged'")
        elif self.max_slots != 1:
            raise ConfigError(f"layout='contiguous' holds one sequence; got max_slots={self.max_slots} "
                              f"(use layout='paged' to batch)")

    @property
    def blocks_per_seq(self) -> int:
        return -(-self.max_len // self.block_size)

    @property
    def pool_blocks(self) -> int:
        if self.num_blocks is not None:
            return self.num_blocks
        cap = -(-DEFAULT_POOL_TOKENS // self.block_size)
        return max(self.blocks_per_seq, min(self.max_slots * self.blocks_per_seq, cap))


def _scans(kwargs: dict) -> bool:
    """Whether a program call runs the layer scan (`EngineConfig.layer_scan`): it then compiles lean."""
    config = kwargs.get("config")
    return bool(getattr(config, "layer_scan", False))


def mesh_layout(cfg: LlamaConfig, config: "EngineConfig") -> Optional[ModelSharding]:
    """The layout of an engine whose kernel options name a mesh (None on one device)."""
    mesh = config.kernel.mesh
    return None if mesh is None else ModelSharding.create(cfg, mesh)


def _keep_layout(state: DecodeState, cfg: LlamaConfig, config: "EngineConfig") -> DecodeState:
    """On a mesh, pin the state a step returns to the layout it came in with (slots over `data`, KV
    heads over `model`), so the next step's arguments match the executable it already compiled."""
    layout = mesh_layout(cfg, config)
    return state if layout is None else layout.constrain(state, layout.state_shardings(state))


@functools.partial(lean_jit, lean_when=_scans, static_argnames=("cfg", "config", "with_context", "greedy"),
                   donate_argnames=("state",))
def prefill_slots(params, state: DecodeState, slots, tokens, lengths, starts, presence, sampling: SamplingParams,
                  rngs, max_tokens, eos_ids, tables, adapters, *, cfg: LlamaConfig, config: EngineConfig,
                  with_context: bool, greedy: bool = False) -> DecodeState:
    """Prefill k requests into `slots` [k] at once and sample each first token (see `Engine.prefill`).

    Rows whose slot is `max_slots` are padding (a bucket of k): their tables hold no block and
    their state updates are dropped.
    """
    cache = state.cache
    last = jnp.maximum(lengths - 1, 0)  # padding rows have no tokens
    if config.layout == "paged":
        view = cache.with_tables(tables)
        logits, view = llama.prefill(params, cfg, tokens, view, adapters=adapters, kernel=config.kernel,
                                     logit_positions=last, lengths=lengths, start=starts if with_context else None)
        cache = view.with_tables(cache.block_tables)
    else:
        logits, cache = llama.prefill(params, cfg, tokens, cache, adapters=adapters, kernel=config.kernel,
                                      logit_positions=last, lengths=lengths)
    rngs, keys = split_rng(rngs)
    token = _draw(keys, logits, presence, sampling, greedy)
    done = _is_eos(token, eos_ids) | (max_tokens <= 1)

    def put(x, value):
        return x.at[slots].set(value.astype(x.dtype), mode="drop")

    return _keep_layout(state.replace(
        cache=cache,
        token=put(state.token, token),
        position=put(state.position, starts + lengths),
        presence=put(state.presence, update_presence(presence, token)),
        done=put(state.done, done),
        rng=state.rng.at[slots].set(rngs, mode="drop"),
        remaining=put(state.remaining, max_tokens - 1),
        sampling=jax.tree_util.tree_map(put, state.sampling, sampling),
    ), cfg, config)


@functools.partial(lean_jit, lean_when=_scans, static_argnames=("cfg", "config", "greedy"), donate_argnames=("state",))
def generate_slots(params, state: DecodeState, tables, eos_ids, limit, adapters, *, cfg: LlamaConfig,
              config: EngineConfig, greedy: bool = False):
    if config.layout == "paged":
        parked = state.cache.block_tables
        state = state.replace(cache=state.cache.with_tables(tables))
    state, out, count = decode_loop(params, state, None, eos_ids, limit, adapters, cfg=cfg, chunk=config.chunk,
                                    kernel=config.kernel, greedy=greedy)
    if config.layout == "paged":
        state = state.replace(cache=state.cache.with_tables(parked))
    return _keep_layout(state, cfg, config), out, count


@functools.partial(jax.jit, donate_argnames=("state",))
def free_slot(state: DecodeState, slot) -> DecodeState:
    return state.replace(done=state.done.at[slot].set(True), remaining=state.remaining.at[slot].set(0))


def _paged_spec(cfg: LlamaConfig, config: EngineConfig) -> PagedSpec:
    return PagedSpec(num_blocks=config.pool_blocks, block_size=config.block_size, num_kv_heads=cfg.num_kv_heads,
                     head_dim=cfg.head_dim, dtype=config.kv_dtype)


def _fresh_state(cfg: LlamaConfig, config: EngineConfig) -> DecodeState:
    s = config.max_slots
    if config.layout == "paged":
        cache = PagedKVCache.init(_paged_spec(cfg, config), num_layers=cfg.num_layers, batch=1, width=1)
    else:
        cache = new_cache(cfg, 1, config.max_len, kv_cache_config=config.kv_cache_config, stacked=config.layer_scan)
    zeros = lambda: jnp.zeros((s,), jnp.int32)  # noqa: E731 (separate buffers: the state is donated)
    return DecodeState(
        cache=cache, token=zeros(), position=zeros(), presence=jnp.zeros((s, cfg.vocab_size), jnp.bool_),
        done=jnp.ones((s,), jnp.bool_), rng=jax.random.split(jax.random.key(0), s), remaining=zeros(),
        sampling=SamplingParams.create().broadcast(s),
    )


@functools.partial(lean_jit, lean_when=_scans, static_argnames=("cfg", "config"))
def _fresh_state_program(cfg: LlamaConfig, config: EngineConfig) -> DecodeState:
    """`_fresh_state` as one program: built eagerly, its zeros, ones, key and split were ~10 small XLA
    programs compiled on an engine's first use (~1.5 MB kept and some ms each)."""
    return _fresh_state(cfg, config)


@functools.partial(jax.jit, static_argnames=("cfg", "config"))
def _fresh_state_on_mesh(cfg: LlamaConfig, config: EngineConfig) -> DecodeState:
    """`_fresh_state` created on the mesh's devices by the layout (no host copy to place: across hosts
    each process makes only its own shards)."""
    return _keep_layout(_fresh_state(cfg, config), cfg, config)


def _resolve_greedy(greedy: Optional[bool], temperature, done=None) -> bool:
    """Whether a step may compile only the greedy argmax (`sampling.greedy_tokens`) instead of the
    whole sampler: a smaller, faster-compiling program with the same tokens, for steps in which no
    row samples. A host that knows its requests' params passes True or False; None reads the rows'
    temperatures (those not `done`) and decides. True while some such row samples (temperature > 0)
    is a `ConfigError`, checked wherever the rows are readable here (not across hosts, where None
    means False: the whole sampler, right for any rows)."""
    if greedy is not None and not isinstance(greedy, (bool, np.bool_)):
        raise ConfigError(f"greedy must be None, True or False, got {greedy!r}")
    if greedy is not None and not greedy:
        return False  # the whole sampler is right for any rows: nothing to read back from the device
    arrays = [temperature] if done is None else [temperature, done]
    if not all(getattr(a, "is_fully_addressable", True) for a in arrays):
        return bool(greedy)
    temps = np.asarray(temperature, np.float32).reshape(-1)
    if done is not None:
        live = ~np.broadcast_to(np.asarray(done, np.bool_).reshape(-1), temps.shape)
        temps = temps[live]
    sampled = temps[temps > 0]
    if greedy is None:
        return sampled.size == 0
    if greedy and sampled.size:
        raise ConfigError(f"greedy=True but {sampled.size} row(s) sample (temperature {float(sampled[0])!r} > 0); "
                          f"pass greedy=None or False for rows that sample")
    return bool(greedy)


@dataclasses.dataclass(frozen=True)
class Engine:
    """Pure, jitted serving steps over an explicit `DecodeState` with `max_slots` slots.

    After JetStream's `engine_api`: `init_decode_state`, `prefill` (a request into a free slot:
    its prompt through the model, its KV into the slot's blocks, its first token sampled; the
    paged pool has no per-request KV to move, so JetStream's prefill and insert are one step),
    `generate` (up to `chunk` decode steps of every slot at once, each slot with its own sampling
    parameters and PRNG stream) and `free`. Params, adapters and the state are arguments, never
    closed over; the state is donated. Which blocks a slot owns is the host's business
    (`backend.serving.ServingEngine` with `cache.allocator`): it passes the tables in.
    """

    cfg: LlamaConfig
    config: EngineConfig

    @property
    def paged_spec(self) -> PagedSpec:
        return _paged_spec(self.cfg, self.config)

    def init_decode_state(self, device=None) -> DecodeState:
        """Every slot free: done, nothing to generate (on `device`, default the first; on a mesh,
        built in place on the layout's shards, so it works across hosts too)."""
        if mesh_layout(self.cfg, self.config) is not None:
            return _fresh_state_on_mesh(self.cfg, self.config)
        # Committed to the device like every state a step returns: an uncommitted first state
        # would make the first prefill compile a second executable.
        state = _fresh_state_program(cfg=self.cfg, config=self.config)
        return jax.device_put(state, jax.devices()[0] if device is None else device)

    def prefill(self, params, state: DecodeState, slots, tokens, lengths, *, sampling: SamplingParams, rngs,
                max_tokens, eos_ids, presence, starts=None, tables=None, adapters=None,
                greedy: Optional[bool] = None) -> DecodeState:
        """Run k prompts into `slots` [k] (JetStream's prefill + insert; the slot `max_slots` marks a
        padding row): tokens [k, bucket] with `lengths` [k] real ones at positions starts + 0..
        (starts [k], default 0: a start > 0 continues the slot's sequence after that many tokens
        already in its blocks, a session's next turn, so only the new tokens run). `sampling` has
        fields [k], `rngs` [k] keys, `max_tokens` [k], `presence` [k, V] the tokens the repetition
        penalty counts (the whole history), `tables` [k, W] the blocks (paged). `greedy` (see
        `_resolve_greedy`): None decides from `sampling`.
        """
        greedy = _resolve_greedy(greedy, sampling.temperature)
        k = len(slots)
        starts = np.zeros((k,), np.int32) if starts is None else np.asarray(starts, np.int32)
        tables = np.zeros((k, 1), np.int32) if tables is None else tables
        as_i32 = lambda x: jnp.asarray(x, jnp.int32)  # noqa: E731
        return prefill_slots(params, state, as_i32(slots), as_i32(tokens), as_i32(lengths), as_i32(starts),
                             jnp.asarray(presence, jnp.bool_), sampling, rngs, as_i32(max_tokens), eos_ids,
                             as_i32(tables), adapters, cfg=self.cfg, config=self.config,
                             with_context=bool(np.any(starts > 0)), greedy=greedy)

    def generate(self, params, state: DecodeState, *, eos_ids, limit: int, tables=None, adapters=None,
                 greedy: Optional[bool] = None):
        """Up to min(chunk, limit) steps of every slot -> (state, tokens [slots, chunk] (-1 none), count).
        `greedy` (see `_resolve_greedy`): None decides from the running slots' temperatures."""
        greedy = _resolve_greedy(greedy, state.sampling.temperature, state.done)
        # Host values (numpy), not eager jnp ops: those would each compile a small program.
        tables = np.zeros((1, 1), np.int32) if tables is None else tables
        tables = tables.astype(jnp.int32) if isinstance(tables, jax.Array) else np.asarray(tables, np.int32)
        return generate_slots(params, state, tables, eos_ids, np.int32(limit), adapters, cfg=self.cfg,
                              config=self.config, greedy=greedy)

    def free(self, state: DecodeState, slot: int) -> DecodeState:
        """The slot done and empty (its blocks are the host's to reuse)."""
        return free_slot(state, np.int32(slot))

    def copy_blocks(self, state: DecodeState, copies) -> DecodeState:
        """Copy-on-write copies the allocator asked for, on the pool."""
        return state.replace(cache=apply_copies(state.cache, copies))
