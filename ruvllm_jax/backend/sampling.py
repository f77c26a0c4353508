"""Next-token sampling for generation: repetition penalty, temperature, top-k, top-p, then a draw.

Semantics follow transformers' logits processors, applied in the order `generate` applies them
(RepetitionPenalty -> Temperature -> TopK -> TopP -> sample), so a model served here samples from
the same distribution as under HF. Every parameter is a traced scalar (`SamplingParams` is a
pytree), so one compiled decode step serves any temperature/top-k/top-p/penalty without
recompiling, and everything runs inside `jax.jit` and `lax.while_loop`.

Cost matters: this runs every decode step over vocabularies of ~150k on CPU. A full sort is paid
only when top-p is active and its nucleus is wider than a static cap of tokens; top-k and
top-p otherwise use `lax.top_k` (partial selection) with that cap; neither-filter and
greedy decoding skip the filtering entirely (`lax.cond` executes only the branch taken).
"""

from __future__ import annotations

import numbers
from typing import Optional

import jax
import jax.numpy as jnp
from flax import struct
from jax import lax

from ruvllm_jax.errors import ConfigError
from ruvllm_jax.types import GenerateParams

# `lax.top_k` needs a static k. Top-k requests up to this cap take the cheap partial-selection path;
# larger (rare) ones fall back to the full sort. On CPU at V=151936, top_k(1024) costs ~2 ms against
# ~150 ms for a full sort, and covers every common top-k and the nucleus of peaked distributions.
_TOP_K_CAP = 1024

_NEG_INF = -jnp.inf
_INT32_MAX = 2**31 - 1


@struct.dataclass
class SamplingParams:
    """Sampling parameters as traced scalars, so changing them never recompiles."""

    temperature: jax.Array  # f32 [] ; 0 = greedy
    top_k: jax.Array  # i32 [] ; 0 = disabled
    top_p: jax.Array  # f32 [] ; 1.0 = disabled
    repetition_penalty: jax.Array  # f32 [] ; 1.0 = disabled

    @classmethod
    def create(
        cls, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0
    ) -> "SamplingParams":
        """Build from Python numbers (unvalidated; use `from_generate_params` for user input)."""
        return cls(
            temperature=jnp.asarray(temperature, jnp.float32),
            top_k=jnp.asarray(top_k, jnp.int32),
            top_p=jnp.asarray(top_p, jnp.float32),
            repetition_penalty=jnp.asarray(repetition_penalty, jnp.float32),
        )

    @classmethod
    def from_generate_params(cls, p: "GenerateParams", vocab_size: Optional[int] = None) -> "SamplingParams":
        """From validated user-facing `GenerateParams` (which raises `ConfigError` on bad values).

        top_k must fit the vocabulary: with `vocab_size` given, top_k > vocab_size is a
        `ConfigError` naming both (top_k == vocab_size keeps every token, like 0); without it,
        top_k must still fit int32. Nothing is clipped.
        """
        if not isinstance(p, GenerateParams):
            raise ConfigError(f"expected GenerateParams; pass GenerateParams(...), got {type(p).__name__} {p!r}")
        if vocab_size is not None:
            if isinstance(vocab_size, bool) or not isinstance(vocab_size, numbers.Integral) or vocab_size <= 0:
                raise ConfigError(f"vocab_size must be an int > 0, got {vocab_size!r}")
            if p.top_k > vocab_size:
                raise ConfigError(
                    f"top_k={p.top_k} exceeds the vocabulary size {vocab_size}; "
                    f"use top_k <= {vocab_size} (0 disables top-k)"
                )
        if p.top_k > _INT32_MAX:
            raise ConfigError(f"top_k={p.top_k} does not fit int32 (max {_INT32_MAX}); no vocabulary is that large")
        return cls.create(p.temperature, p.top_k, p.top_p, p.repetition_penalty)


def apply_repetition_penalty(logits: jax.Array, presence: jax.Array, penalty: jax.Array) -> jax.Array:
    """CTRL rule on tokens already seen: negative logits times penalty, others divided by it.

    `presence` [B, V] marks prompt and generated tokens; a `where` over it costs one pass and has no
    scatter, and penalty 1.0 leaves logits bit-identical.
    """
    penalty = jnp.asarray(penalty, logits.dtype)
    penalized = jnp.where(logits < 0, logits * penalty, logits / penalty)
    return jnp.where(presence, penalized, logits)


def apply_temperature(logits: jax.Array, temperature: jax.Array) -> jax.Array:
    """Divide by temperature; temperature 0 (greedy) returns logits unchanged rather than inf/nan."""
    temperature = jnp.asarray(temperature, logits.dtype)
    return logits / jnp.where(temperature > 0, temperature, jnp.ones_like(temperature))


def _kth_largest_via_sort(logits: jax.Array, k: jax.Array) -> jax.Array:
    """[B, 1] k-th largest value by a full ascending sort (k in [1, V])."""
    v = logits.shape[-1]
    sorted_asc = jnp.sort(logits, axis=-1)
    return lax.dynamic_slice_in_dim(sorted_asc, v - k, 1, axis=-1)


def _kth_largest(logits: jax.Array, k: jax.Array) -> jax.Array:
    """[B, 1] k-th largest value (k in [1, V]): `lax.top_k` up to the static cap, else a sort."""
    v = logits.shape[-1]
    cap = min(_TOP_K_CAP, v)

    def partial(x):
        vals, _ = lax.top_k(x, cap)  # descending
        return lax.dynamic_slice_in_dim(vals, k - 1, 1, axis=-1)

    if cap == v:
        return partial(logits)
    return lax.cond(k <= cap, partial, lambda x: _kth_largest_via_sort(x, k), logits)


def apply_top_k(logits: jax.Array, top_k: jax.Array) -> jax.Array:
    """Mask to -inf everything below the k-th largest logit, keeping ties with it (as HF does).

    top_k 0 or >= V returns logits unchanged without doing any selection.
    """
    v = logits.shape[-1]
    top_k = jnp.asarray(top_k, jnp.int32)
    active = (top_k > 0) & (top_k < v)

    def filt(x):
        kth = _kth_largest(x, jnp.clip(top_k, 1, v))
        return jnp.where(x < kth, _NEG_INF, x).astype(x.dtype)

    return lax.cond(active, filt, lambda x: x, logits)


def _top_p_sorted(sorted_asc: jax.Array, top_p: jax.Array) -> jax.Array:
    """Removal mask in ascending-sorted order, exactly as HF's TopPLogitsWarper computes it."""
    cum = jnp.cumsum(jax.nn.softmax(sorted_asc.astype(jnp.float32), axis=-1), axis=-1)
    remove = cum <= (1.0 - top_p)
    return remove.at[..., -1].set(False)  # keep at least one token


def _unsort(mask_sorted: jax.Array, order: jax.Array) -> jax.Array:
    """Scatter a mask given in sorted order back to vocabulary order."""
    rows = jnp.arange(mask_sorted.shape[0])[:, None]
    return jnp.zeros_like(mask_sorted).at[rows, order].set(mask_sorted)


def _sort_with_indices(logits: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Ascending sort of [B, V] returning (values, original indices); stable, like torch's CPU sort."""
    iota = lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
    return lax.sort((logits, iota), dimension=logits.ndim - 1, num_keys=1, is_stable=True)


def _top_k_top_p_by_sort(logits: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Top-k then top-p sharing one full sort; the reference path, exact for any inputs.

    Masking values below the k-th largest to -inf keeps the ascending order, so the sort of the
    top-k output is the same sorted array with its low prefix set to -inf.
    """
    v = logits.shape[-1]
    sorted_asc, order = _sort_with_indices(logits)
    k_active = (top_k > 0) & (top_k < v)
    kth = lax.dynamic_slice_in_dim(sorted_asc, v - jnp.clip(top_k, 1, v), 1, axis=-1)
    kth = jnp.where(k_active, kth, _NEG_INF)
    sorted_asc = jnp.where(sorted_asc < kth, _NEG_INF, sorted_asc)
    remove = _unsort(_top_p_sorted(sorted_asc, top_p), order)
    return jnp.where(remove | (logits < kth), _NEG_INF, logits).astype(logits.dtype)


def _top_k_top_p_partial(logits: jax.Array, top_k: jax.Array, top_p: jax.Array, cap: int):
    """Top-k then top-p from only the `cap` largest logits (`lax.top_k`, no full sort).

    HF removes a token when the ascending cumulative probability up to it is <= 1 - top_p, i.e. when
    the probability mass strictly above it is >= top_p; so the kept set is a prefix of the
    descending order, and if the top `cap` tokens already hold mass >= top_p it lies inside them.
    Returns (filtered logits, valid): valid is False where the nucleus (or k) exceeds the cap, and
    the caller then takes the sort path. Differs from the sort only by rounding at the boundary and
    in keeping every token tied with the last kept value (HF keeps them by sort position).
    """
    v = logits.shape[-1]
    vals, _ = lax.top_k(logits, cap)  # [B, cap] descending
    k_active = (top_k > 0) & (top_k < v)
    kth = lax.dynamic_slice_in_dim(vals, jnp.clip(top_k, 1, cap) - 1, 1, axis=-1)
    kth = jnp.where(k_active, kth, _NEG_INF)
    kept_k = jnp.where(logits < kth, _NEG_INF, logits)  # top-k output, ties included
    lse = jax.nn.logsumexp(kept_k.astype(jnp.float32), axis=-1, keepdims=True)
    probs = jnp.exp(jnp.where(vals < kth, _NEG_INF, vals).astype(jnp.float32) - lse)
    cum = jnp.cumsum(probs, axis=-1)
    above = cum - probs  # mass strictly above each position
    keep = (above < top_p).at[..., 0].set(True)
    n_keep = jnp.sum(keep, axis=-1, keepdims=True)
    threshold = jnp.take_along_axis(vals, n_keep - 1, axis=-1)
    out = jnp.where(logits < jnp.maximum(threshold, kth), _NEG_INF, logits).astype(logits.dtype)
    valid = jnp.all(cum[..., -1] >= top_p) & ~(k_active & (top_k > cap))
    return out, valid


def _top_p_by_bisection(logits: jax.Array, top_p: jax.Array) -> jax.Array:
    """Top-p without sorting, for nuclei too wide for the partial path (flat distributions).

    HF keeps a token when the probability mass at or below it exceeds 1 - top_p. That mass,
    S(v) = sum of the probabilities <= v, only grows with v, so the smallest kept probability is
    found by bisection over the bit patterns of non-negative float32s (ordered like the floats):
    31 whole-row masked sums instead of a sort of the vocabulary. Ties with the smallest kept
    probability are all kept, as in the partial path.
    """
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    threshold = 1.0 - top_p  # a scalar, as everywhere in this module
    hi = lax.bitcast_convert_type(jnp.max(probs, axis=-1, keepdims=True), jnp.int32)  # S(max) = 1 > 1 - top_p
    lo = jnp.zeros_like(hi) - 1  # invariant: S(lo) <= 1 - top_p < S(hi)

    def step(_, bounds):
        lo, hi = bounds
        mid = lo + (hi - lo) // 2
        v = lax.bitcast_convert_type(jnp.maximum(mid, 0), jnp.float32)
        mass = jnp.sum(jnp.where(probs <= v, probs, 0.0), axis=-1, keepdims=True)
        above = (mass > threshold) & (mid >= 0)
        return jnp.where(above, lo, mid), jnp.where(above, mid, hi)

    _, hi = lax.fori_loop(0, 32, step, (lo, hi))
    smallest_kept = lax.bitcast_convert_type(hi, jnp.float32)
    return jnp.where(probs < smallest_kept, _NEG_INF, logits).astype(logits.dtype)


def _top_k_then_top_p(logits: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Top-k then top-p (top_p < 1): the partial path when the nucleus fits the cap; otherwise
    bisection on the top-k output, or one full sort when k itself exceeds the cap."""
    v = logits.shape[-1]
    cap = min(_TOP_K_CAP, v)
    if cap == v:
        return _top_k_top_p_by_sort(logits, top_k, top_p)
    out, valid = _top_k_top_p_partial(logits, top_k, top_p, cap)
    k_beyond_cap = (top_k > cap) & (top_k < v)

    def wide(x):
        return lax.cond(k_beyond_cap, lambda y: _top_k_top_p_by_sort(y, top_k, top_p),
                        lambda y: _top_p_by_bisection(apply_top_k(y, top_k), top_p), x)

    return lax.cond(valid, lambda x: out, wide, logits)


def apply_top_p(logits: jax.Array, top_p: jax.Array) -> jax.Array:
    """Nucleus filtering as HF's TopPLogitsWarper: sort ascending, cumulative softmax, drop tokens
    whose cumulative probability is <= 1 - top_p, always keep the most likely one.

    top_p >= 1 returns logits unchanged and skips the sort.
    """
    top_p = jnp.asarray(top_p, jnp.float32)
    no_k = jnp.zeros((), jnp.int32)
    return lax.cond(top_p < 1.0, lambda x: _top_k_then_top_p(x, no_k, top_p), lambda x: x, logits)


def _filter(logits: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Top-k then top-p, choosing the cheapest branch: none, top-k only, or top-k + top-p."""
    v = logits.shape[-1]
    k_active = (top_k > 0) & (top_k < v)
    p_active = top_p < 1.0
    branch = jnp.where(p_active, 2, jnp.where(k_active, 1, 0))
    return lax.switch(
        branch,
        [
            lambda x: x,
            lambda x: apply_top_k(x, top_k),
            lambda x: _top_k_then_top_p(x, top_k, top_p),
        ],
        logits,
    )


def process_logits(logits: jax.Array, presence: jax.Array, params: SamplingParams) -> jax.Array:
    """The whole HF chain: repetition penalty -> temperature -> top-k -> top-p, in f32."""
    logits = logits.astype(jnp.float32)
    logits = apply_repetition_penalty(logits, presence, params.repetition_penalty)
    logits = apply_temperature(logits, params.temperature)
    return _filter(logits, jnp.asarray(params.top_k, jnp.int32), jnp.asarray(params.top_p, jnp.float32))


def sample(rng: jax.Array, logits: jax.Array, presence: jax.Array, params: SamplingParams) -> jax.Array:
    """Draw one token per row [B] int32. Temperature 0 is greedy: argmax of the penalized logits,
    with temperature/top-k/top-p skipped since they cannot change the argmax."""
    logits = apply_repetition_penalty(logits.astype(jnp.float32), presence, params.repetition_penalty)

    def greedy(x):
        return jnp.argmax(x, axis=-1).astype(jnp.int32)

    def stochastic(x):
        x = apply_temperature(x, params.temperature)
        x = _filter(x, jnp.asarray(params.top_k, jnp.int32), jnp.asarray(params.top_p, jnp.float32))
        return jax.random.categorical(rng, x, axis=-1).astype(jnp.int32)

    return lax.cond(params.temperature > 0, stochastic, greedy, logits)


def update_presence(presence: jax.Array, tokens: jax.Array) -> jax.Array:
    """Mark each row's newly generated token [B] so later steps penalize it."""
    rows = jnp.arange(presence.shape[0])
    return presence.at[rows, tokens.astype(jnp.int32)].set(True, mode="drop")


def presence_from_tokens(tokens: jax.Array, lengths: jax.Array, vocab_size: int) -> jax.Array:
    """[B, V] bool of tokens in each prompt; only the first lengths[b] count, so padding is ignored."""
    b, s = tokens.shape
    valid = jnp.arange(s)[None, :] < jnp.asarray(lengths)[:, None]
    # Padding goes to an out-of-range id and is dropped, instead of marking the pad token.
    ids = jnp.where(valid, tokens.astype(jnp.int32), vocab_size)
    rows = jnp.broadcast_to(jnp.arange(b)[:, None], (b, s))
    return jnp.zeros((b, vocab_size), jnp.bool_).at[rows, ids].set(True, mode="drop")


__all__ = [
    "SamplingParams",
    "apply_repetition_penalty",
    "apply_temperature",
    "apply_top_k",
    "apply_top_p",
    "process_logits",
    "sample",
    "update_presence",
    "presence_from_tokens",
]
