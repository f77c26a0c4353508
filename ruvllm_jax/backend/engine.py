"""The generation engine: one jitted prefill, then jitted chunks of decode steps on device.

Decoding follows gemma's sampler: the loop state is a pytree (`DecodeState`), one pure step feeds
the last token through the model and samples the next, and a `lax.while_loop` runs up to `chunk`
steps on device, stopping early once every sequence is done. The host sees tokens once per chunk
(`limit` is traced, so streaming asks for one step at a time with the same executable). Inside a
chunk new keys/values go to a short `SegmentedKVCache` segment, written back once per chunk, so
the loop never copies the whole cache.

Shapes are bucketed so nothing recompiles per prompt: prompts pad to a power of two (>= 16) and the
cache to a power of two >= prompt + max_tokens, capped at the model's `max_context`.
"""

from __future__ import annotations

import functools
import numbers
from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import struct

from ruvllm_jax.backend.sampling import SamplingParams, presence_from_tokens, sample, update_presence
from ruvllm_jax.cache import ContiguousKVCache
from ruvllm_jax.cache.segmented import SegmentedKVCache
from ruvllm_jax.cache.two_tier import TwoTierKVCache, TwoTierSpec
from ruvllm_jax.errors import ConfigError, GenerationError, KvCacheError
from ruvllm_jax.kernels import KernelOptions
from ruvllm_jax.models import llama
from ruvllm_jax.models.config import LlamaConfig
from ruvllm_jax.types import SEED_LIMIT, KvCacheConfig

DEFAULT_CHUNK = 32
MIN_PROMPT_BUCKET = 16
MIN_CACHE_BUCKET = 64
DEFAULT_KERNEL = KernelOptions()  # "auto": Pallas on GPU/TPU, jnp on CPU


@struct.dataclass
class DecodeState:
    cache: Any
    token: jax.Array  # [B] last sampled token, not yet fed through the model
    position: jax.Array  # [B] the position `token` will occupy
    presence: jax.Array  # [B, V] bool: tokens seen so far (for the repetition penalty)
    done: jax.Array  # [B] bool
    rng: jax.Array


def _next_pow2(n: int, floor: int) -> int:
    return max(floor, 1 << max(0, (n - 1).bit_length()))


def buckets(prompt_len: int, max_tokens: int, max_context: int) -> tuple[int, int]:
    """(prompt bucket, cache length) for a request; `GenerationError` if it cannot fit."""
    if prompt_len <= 0:
        raise GenerationError("the prompt encodes to no tokens; at least one is needed")
    if prompt_len + max_tokens > max_context:
        raise GenerationError(
            f"prompt of {prompt_len} tokens + max_tokens={max_tokens} = {prompt_len + max_tokens} "
            f"exceeds max_context={max_context}"
        )
    cache_len = min(_next_pow2(prompt_len + max_tokens, MIN_CACHE_BUCKET), max_context)
    prompt_bucket = min(_next_pow2(prompt_len, MIN_PROMPT_BUCKET), cache_len)
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


def decode_step(params, state: DecodeState, sampling: SamplingParams, eos_ids, adapters, cfg: LlamaConfig,
                kernel: KernelOptions):
    """Feed each sequence's last token, sample the next. Finished sequences stay frozen."""
    logits, cache = llama.decode(params, cfg, state.token, state.position, state.cache, adapters=adapters,
                                 kernel=kernel)
    rng, key = jax.random.split(state.rng)
    token = jnp.where(state.done, state.token, sample(key, logits, state.presence, sampling))
    return DecodeState(
        cache=cache,
        token=token,
        position=state.position + jnp.where(state.done, 0, 1),
        presence=update_presence(state.presence, token),
        done=state.done | _is_eos(token, eos_ids),
        rng=rng,
    )


@functools.partial(jax.jit, static_argnames=("cfg", "chunk", "kernel"), donate_argnames=("state",))
def decode_chunk(
    params, state: DecodeState, sampling: SamplingParams, eos_ids, limit, adapters=None, *,
    cfg: LlamaConfig, chunk: int = DEFAULT_CHUNK, kernel: KernelOptions = DEFAULT_KERNEL,
):
    """Up to min(chunk, limit) decode steps on device -> (state, tokens [B, chunk] (-1 = none), count)."""
    b = state.token.shape[0]

    def cond(carry):
        i, st, _ = carry
        return (i < jnp.minimum(limit, chunk)) & ~jnp.all(st.done)

    def body(carry):
        i, st, out = carry
        was_done = st.done
        st = decode_step(params, st, sampling, eos_ids, adapters, cfg, kernel)
        out = out.at[:, i].set(jnp.where(was_done, -1, st.token))
        return i + 1, st, out

    out = jnp.full((b, chunk), -1, jnp.int32)
    segmented = isinstance(state.cache, ContiguousKVCache) and SegmentedKVCache.supports(cfg.sliding_windows)
    if segmented:  # append to a short segment inside the loop; one write-back per chunk
        state = state.replace(cache=SegmentedKVCache.open(state.cache, state.position, chunk))
    count, state, out = jax.lax.while_loop(cond, body, (jnp.int32(0), state, out))
    if segmented:
        state = state.replace(cache=state.cache.close())
    return state, out, count


def new_cache(cfg: LlamaConfig, batch: int, max_len: int, dtype=jnp.float32,
              kv_cache_config: Optional[KvCacheConfig] = None):
    """The cache a generation runs on: contiguous full precision [B, KVH, max_len, D] per layer, or
    with `kv_cache_config` the two-tier quantized cache (its shape fixed by the config, heads and
    head_dim the model's; `max_len` then only has to fit when eviction is off)."""
    if kv_cache_config is None:
        return ContiguousKVCache.init(
            num_layers=cfg.num_layers, batch=batch, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
            max_len=max_len, dtype=dtype,
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
    if seed is None:
        import secrets

        seed = secrets.randbits(64)
    if not isinstance(seed, numbers.Integral) or isinstance(seed, bool) or not 0 <= seed < SEED_LIMIT:
        raise ConfigError(f"seed must be None or an int in [0, 2**64), got {seed!r}")
    seed = int(seed)
    key = jax.random.key(seed & 0xFFFFFFFF)
    return jax.random.fold_in(key, seed >> 32)
