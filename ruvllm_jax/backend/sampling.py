"""Next-token sampling for generation: repetition penalty, temperature, top-k, top-p, then a draw.

Semantics follow transformers' logits processors, applied in the order `generate` applies them
(RepetitionPenalty -> Temperature -> TopK -> TopP -> sample), so a model served here samples from
the same distribution as under HF. Every parameter is a traced scalar (`SamplingParams` is a
pytree), so one compiled decode step serves any temperature/top-k/top-p/penalty without
recompiling, and everything runs inside `jax.jit` and `lax.while_loop`. The one static split is
`greedy_tokens`: steps in which no row samples compile only the argmax of the penalized logits (the
serving engine knows when), a much smaller program; the first sampled request then compiles the
whole sampler once.

For continuous batching, each field may instead be a per-row `[B]` array (`SamplingParams.stack`,
`with_row`) and `sample` may take a `[B]` array of keys: every row then gets exactly (bit for bit)
the token it would get sampled alone with its own parameters and key.

Cost matters: this runs every decode step over vocabularies of ~150k on CPU. A full sort is paid
only when top-p is active and its nucleus is wider than a static cap of tokens; top-k and
top-p otherwise use `lax.top_k` (partial selection) with that cap; neither-filter and
greedy decoding skip the filtering entirely (`lax.cond` executes only the branch taken). With
per-row parameters the branches are taken on batch-wide predicates (does any row need this path?)
and each row then picks its own result with a `where`, so a path is paid only when some row needs
it; there is no `vmap` over a `cond`, which would run every branch.
"""

from __future__ import annotations

import numbers
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
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

_FIELD_DTYPES = {
    "temperature": jnp.float32,
    "top_k": jnp.int32,
    "top_p": jnp.float32,
    "repetition_penalty": jnp.float32,
}


@struct.dataclass
class SamplingParams:
    """Sampling parameters as traced arrays, so changing them never recompiles.

    Each field is a scalar `[]` (one setting for the whole batch) or a `[B]` array (one per row).
    """

    temperature: jax.Array  # f32 [] or [B] ; 0 = greedy
    top_k: jax.Array  # i32 [] or [B] ; 0 = disabled
    top_p: jax.Array  # f32 [] or [B] ; 1.0 = disabled
    repetition_penalty: jax.Array  # f32 [] or [B] ; 1.0 = disabled

    @classmethod
    def create(
        cls, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0
    ) -> "SamplingParams":
        """Build from Python numbers (unvalidated; use `from_generate_params` for user input).

        The fields are host (numpy) scalars: jit takes them as they are, and `stack` stacks them on the
        host; `jnp.asarray` of a Python number would compile a small cast program on first use."""
        return cls(
            temperature=np.asarray(temperature, np.float32),
            top_k=np.asarray(top_k, np.int32),
            top_p=np.asarray(top_p, np.float32),
            repetition_penalty=np.asarray(repetition_penalty, np.float32),
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

    def _fields(self) -> dict[str, jax.Array]:
        """Each field in its dtype; host (numpy) fields stay on the host."""
        out = {}
        for name, dt in _FIELD_DTYPES.items():
            a = getattr(self, name)
            out[name] = np.asarray(a, dt) if isinstance(a, (np.ndarray, np.generic)) else jnp.asarray(a, dt)
        return out

    @classmethod
    def stack(cls, rows: Sequence["SamplingParams"]) -> "SamplingParams":
        """Per-row parameters `[B]` from B scalar ones (row b of the result is `rows[b]`)."""
        rows = list(rows)
        if not rows:
            raise ValueError("SamplingParams.stack needs at least one row")
        fields = [r._fields() for r in rows]
        for i, f in enumerate(fields):
            bad = {n: a.shape for n, a in f.items() if a.ndim != 0}
            if bad:
                raise ValueError(f"SamplingParams.stack takes scalar rows; row {i} has non-scalar fields {bad}")
        on_host = all(isinstance(a, np.ndarray) for f in fields for a in f.values())
        return cls(**{n: (np.stack if on_host else jnp.stack)([f[n] for f in fields]) for n in _FIELD_DTYPES})

    def broadcast(self, b: int) -> "SamplingParams":
        """Every field as `[b]`: scalars repeated, `[b]` fields unchanged (other shapes are an error)."""
        out = {}
        for n, a in self._fields().items():
            if a.shape not in ((), (b,)):
                raise ValueError(f"cannot broadcast SamplingParams.{n} of shape {a.shape} to ({b},)")
            out[n] = jnp.broadcast_to(a, (b,))
        return type(self)(**out)

    def with_row(self, i, row: "SamplingParams") -> "SamplingParams":
        """A copy with row `i` (may be traced) set to the scalar parameters `row`; fields must be `[B]`."""
        out = {}
        for n, a in self._fields().items():
            r = jnp.asarray(getattr(row, n), _FIELD_DTYPES[n])
            if a.ndim != 1 or r.ndim != 0:
                raise ValueError(
                    f"with_row needs [B] fields and a scalar row; got {n} of shape {a.shape} and row {r.shape} "
                    "(use broadcast(b) or stack(rows) first)"
                )
            out[n] = jnp.asarray(a).at[i].set(r)
        return type(self)(**out)

    def row(self, i) -> "SamplingParams":
        """The scalar parameters of row `i` (may be traced); scalar fields are returned as they are."""
        return type(self)(**{n: a if a.ndim == 0 else a[i] for n, a in self._fields().items()})

    @property
    def per_row(self) -> bool:
        """Whether any field is per-row (`[B]`)."""
        return any(jnp.ndim(getattr(self, n)) > 0 for n in _FIELD_DTYPES)


# --- per-row plumbing ---------------------------------------------------------------------------
# Internally a parameter is either a scalar [] (one value for the batch, today's code path) or a
# column [B, 1] that broadcasts against [B, V] logits. Branches are chosen by `_per_row`.


def _col(p, b: int, dtype) -> jax.Array:
    """A parameter as a scalar [] or a column [B, 1]."""
    p = jnp.asarray(p, dtype)
    if p.ndim == 0 or p.shape == (b, 1):
        return p
    if p.shape == (b,):
        return p[:, None]
    raise ValueError(f"a sampling parameter must be a scalar or have shape ({b},), got {p.shape}")


def _param_cols(params: SamplingParams, b: int) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """(temperature, top_k, top_p, penalty): all scalars, or all [B, 1] when any field is per-row."""
    f = (params.broadcast(b) if params.per_row else params)._fields()
    cols = [_col(f[n], b, dt) for n, dt in _FIELD_DTYPES.items()]
    return cols[0], cols[1], cols[2], cols[3]


def _per_row(pred, on_true: Callable, on_false: Callable, x, care=True, out=None):
    """Per row, `on_true(x)` where `pred` else `on_false(x)`.

    A scalar `pred` is a plain `lax.cond`. A per-row `pred` ([B, 1] or [B], broadcasting against
    the outputs) runs each side only if some row that matters (`care`) needs it, then selects per
    row; rows outside `care` get either side. Each side computes every row the same way it would
    alone, so a row's result does not depend on the others. `out` is the result's shape and dtype
    when it is not that of `x` (a skipped side then yields zeros).
    """
    if jnp.ndim(pred) == 0:
        return lax.cond(pred, on_true, on_false, x)
    skip = (lambda y: y) if out is None else (lambda y: jnp.zeros(out.shape, out.dtype))
    t = lax.cond(jnp.any(pred & care), on_true, skip, x)
    f = lax.cond(jnp.any(~pred & care), on_false, skip, x)
    return jnp.where(pred, t, f)


def _take(vals: jax.Array, idx: jax.Array) -> jax.Array:
    """[B, 1] vals[b, idx[b]] for a scalar or [B, 1] index (already in range)."""
    idx = jnp.broadcast_to(jnp.asarray(idx, jnp.int32), (vals.shape[0], 1))
    return jnp.take_along_axis(vals, idx, axis=-1, mode="clip")


# --- processors ---------------------------------------------------------------------------------


def apply_repetition_penalty(logits: jax.Array, presence: jax.Array, penalty: jax.Array) -> jax.Array:
    """CTRL rule on tokens already seen: negative logits times penalty, others divided by it.

    `presence` [B, V] marks prompt and generated tokens; a `where` over it costs one pass and has no
    scatter, and penalty 1.0 leaves logits bit-identical. `penalty` is a scalar or per-row [B].
    """
    penalty = _col(penalty, logits.shape[0], logits.dtype)
    # The divisor is a full [B, V] select, not a broadcast: XLA rewrites `x / broadcast(p)` into
    # `x * (1 / p)` in some contexts but not others, which would make a row's bits depend on the
    # shape of `penalty`; a division by this select is always an exact division.
    divisor = jnp.where(presence, penalty, jnp.ones_like(penalty))
    penalized = jnp.where(logits < 0, logits * penalty, logits / divisor)
    return jnp.where(presence, penalized, logits)


def apply_temperature(logits: jax.Array, temperature: jax.Array) -> jax.Array:
    """Divide by temperature (scalar or [B]); temperature 0 (greedy) returns logits unchanged
    rather than inf/nan.

    Written as a multiply by 1 / temperature, which is what XLA compiles the division by a
    broadcast scalar to anyway; spelled out, it is the same for scalar and per-row temperatures.
    """
    temperature = _col(temperature, logits.shape[0], logits.dtype)
    return logits * (1.0 / jnp.where(temperature > 0, temperature, jnp.ones_like(temperature)))


def _kth_largest_via_sort(logits: jax.Array, k: jax.Array) -> jax.Array:
    """[B, 1] k-th largest value by a full ascending sort (k in [1, V])."""
    v = logits.shape[-1]
    sorted_asc = jnp.sort(logits, axis=-1)
    return _take(sorted_asc, v - k)


def _kth_largest(logits: jax.Array, k: jax.Array, care=True) -> jax.Array:
    """[B, 1] k-th largest value (k in [1, V]): `lax.top_k` up to the static cap, else a sort."""
    v = logits.shape[-1]
    cap = min(_TOP_K_CAP, v)

    def partial(x):
        vals, _ = lax.top_k(x, cap)  # descending
        return _take(vals, jnp.minimum(k, cap) - 1)

    if cap == v:
        return partial(logits)
    kth_shape = jax.ShapeDtypeStruct((logits.shape[0], 1), logits.dtype)
    return _per_row(k <= cap, partial, lambda x: _kth_largest_via_sort(x, k), logits, care, out=kth_shape)


def _top_k(logits: jax.Array, top_k: jax.Array) -> jax.Array:
    """`apply_top_k` with top_k a scalar or a [B, 1] column."""
    v = logits.shape[-1]
    active = (top_k > 0) & (top_k < v)

    def filt(x):
        kth = _kth_largest(x, jnp.clip(top_k, 1, v), active)
        kth = jnp.where(active, kth, _NEG_INF)  # rows without top-k keep everything
        return jnp.where(x < kth, _NEG_INF, x).astype(x.dtype)

    return lax.cond(jnp.any(active), filt, lambda x: x, logits)


def apply_top_k(logits: jax.Array, top_k: jax.Array) -> jax.Array:
    """Mask to -inf everything below the k-th largest logit, keeping ties with it (as HF does).

    top_k (scalar or [B]) 0 or >= V leaves a row unchanged; with no such row active, no selection
    is done at all.
    """
    return _top_k(logits, _col(top_k, logits.shape[0], jnp.int32))


def _softmax(x: jax.Array) -> jax.Array:
    """Softmax over the last axis as `jax.nn.softmax` computes it after XLA's rewrite of its
    division (a multiply by 1 / sum), spelled out so no compilation context can change its bits."""
    e = jnp.exp(x - jnp.max(x, axis=-1, keepdims=True))
    return e * (1.0 / jnp.sum(e, axis=-1, keepdims=True))


def _top_p_sorted(sorted_asc: jax.Array, top_p: jax.Array) -> jax.Array:
    """Removal mask in ascending-sorted order, exactly as HF's TopPLogitsWarper computes it."""
    cum = jnp.cumsum(_softmax(sorted_asc.astype(jnp.float32)), axis=-1)
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
    kth = _take(sorted_asc, v - jnp.clip(top_k, 1, v))
    kth = jnp.where(k_active, kth, _NEG_INF)
    sorted_asc = jnp.where(sorted_asc < kth, _NEG_INF, sorted_asc)
    remove = _unsort(_top_p_sorted(sorted_asc, top_p), order)
    return jnp.where(remove | (logits < kth), _NEG_INF, logits).astype(logits.dtype)


def _top_k_top_p_partial(logits: jax.Array, top_k: jax.Array, top_p: jax.Array, cap: int):
    """Top-k then top-p from only the `cap` largest logits (`lax.top_k`, no full sort).

    HF removes a token when the ascending cumulative probability up to it is <= 1 - top_p, i.e. when
    the probability mass strictly above it is >= top_p; so the kept set is a prefix of the
    descending order, and if the top `cap` tokens already hold mass >= top_p it lies inside them.
    Returns (filtered logits, valid [B, 1]): valid is False in rows whose nucleus (or k) exceeds the
    cap, which the caller then sends to a wider path. Differs from the sort only by rounding at the
    boundary and in keeping every token tied with the last kept value (HF keeps them by sort position).
    """
    v = logits.shape[-1]
    vals, _ = lax.top_k(logits, cap)  # [B, cap] descending
    k_active = (top_k > 0) & (top_k < v)
    kth = _take(vals, jnp.clip(top_k, 1, cap) - 1)
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
    valid = (cum[..., -1:] >= top_p) & ~(k_active & (top_k > cap))
    return out, valid


def _top_p_by_bisection(logits: jax.Array, top_p: jax.Array) -> jax.Array:
    """Top-p without sorting, for nuclei too wide for the partial path (flat distributions).

    HF keeps a token when the probability mass at or below it exceeds 1 - top_p. That mass,
    S(v) = sum of the probabilities <= v, only grows with v, so the smallest kept probability is
    found by bisection over the bit patterns of non-negative float32s (ordered like the floats):
    31 whole-row masked sums instead of a sort of the vocabulary. Ties with the smallest kept
    probability are all kept, as in the partial path.
    """
    probs = _softmax(logits.astype(jnp.float32))
    threshold = 1.0 - top_p  # a scalar or a [B, 1] column, as everywhere in this module
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


def _top_k_then_top_p(logits: jax.Array, top_k: jax.Array, top_p: jax.Array, rows=True) -> jax.Array:
    """Top-k then top-p (top_p < 1 in the rows that matter, `rows`): the partial path when the
    nucleus fits the cap; otherwise bisection on the top-k output, or one full sort when k itself
    exceeds the cap.

    With scalar parameters the batch takes one path (the partial one only if it is valid for every
    row, as it always has); with per-row parameters each row takes the path it would take alone.
    """
    v = logits.shape[-1]
    cap = min(_TOP_K_CAP, v)
    if cap == v:
        return _top_k_top_p_by_sort(logits, top_k, top_p)
    out, valid = _top_k_top_p_partial(logits, top_k, top_p, cap)
    scalar = jnp.ndim(top_k) == 0 and jnp.ndim(top_p) == 0
    if scalar:
        valid = jnp.all(valid)
    k_beyond_cap = (top_k > cap) & (top_k < v)

    def wide(x):
        need = ~valid & rows
        bisect_k = top_k if scalar else jnp.where(need & ~k_beyond_cap, top_k, 0)  # top-k only where used
        return _per_row(k_beyond_cap, lambda y: _top_k_top_p_by_sort(y, top_k, top_p),
                        lambda y: _top_p_by_bisection(_top_k(y, bisect_k), top_p), x, need)

    if scalar:
        return lax.cond(valid, lambda x: out, wide, logits)
    return jnp.where(valid, out, lax.cond(jnp.any(~valid & rows), wide, lambda x: x, logits))


def apply_top_p(logits: jax.Array, top_p: jax.Array) -> jax.Array:
    """Nucleus filtering as HF's TopPLogitsWarper: sort ascending, cumulative softmax, drop tokens
    whose cumulative probability is <= 1 - top_p, always keep the most likely one.

    top_p (scalar or [B]) >= 1 leaves a row unchanged; with no row below 1, the sort is skipped.
    """
    top_p = _col(top_p, logits.shape[0], jnp.float32)
    no_k = jnp.zeros(jnp.shape(top_p), jnp.int32)
    active = top_p < 1.0
    return _per_row(active, lambda x: _top_k_then_top_p(x, no_k, top_p, active), lambda x: x, logits)


def _filter(logits: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Top-k then top-p, choosing the cheapest branch: none, top-k only, or top-k + top-p."""
    v = logits.shape[-1]
    k_active = (top_k > 0) & (top_k < v)
    p_active = top_p < 1.0
    k_only = jnp.where(k_active & ~p_active, top_k, 0)  # rows with top-p take top-k in the other branch
    return _per_row(p_active, lambda x: _top_k_then_top_p(x, top_k, top_p, p_active),
                    lambda x: _top_k(x, k_only), logits)


def process_logits(logits: jax.Array, presence: jax.Array, params: SamplingParams) -> jax.Array:
    """The whole HF chain: repetition penalty -> temperature -> top-k -> top-p, in f32, with each
    row's own parameters when they are per-row."""
    temperature, top_k, top_p, penalty = _param_cols(params, logits.shape[0])
    logits = logits.astype(jnp.float32)
    logits = apply_repetition_penalty(logits, presence, penalty)
    logits = apply_temperature(logits, temperature)
    return _filter(logits, top_k, top_p)


def _keys_per_row(rng: jax.Array) -> bool:
    """Whether `rng` is a [B] array of keys (typed keys [B], raw uint32 keys [B, 2]) or one key."""
    if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
        return rng.ndim == 1
    return rng.ndim == 2


def sample(rng: jax.Array, logits: jax.Array, presence: jax.Array, params: SamplingParams) -> jax.Array:
    """Draw one token per row [B] int32. Temperature 0 is greedy: argmax of the penalized logits,
    with temperature/top-k/top-p skipped since they cannot change the argmax.

    `rng` is one key for the batch, or a [B] array of keys (typed keys [B] or raw uint32 [B, 2]).
    With per-row keys every row is independent: row b's token is bit-identical to
    `sample(rng[b], logits[b:b+1], presence[b:b+1], params.row(b))[0]`, whatever the other rows
    hold. With one key, the draw is one `categorical` over the batch (as before), and scalar
    params take one path for the whole batch.
    """
    b = logits.shape[0]
    rng = jnp.asarray(rng)
    per_row_keys = _keys_per_row(rng)
    if per_row_keys:
        if rng.shape[0] != b:
            raise ValueError(f"sample got {rng.shape[0]} keys for {b} rows; pass one key or one per row")
        params = params.broadcast(b)  # independent rows: each takes the path it would take alone
    temperature, top_k, top_p, penalty = _param_cols(params, b)
    logits = apply_repetition_penalty(logits.astype(jnp.float32), presence, penalty)
    stochastic_rows = temperature > 0

    def draw(x):
        if per_row_keys:  # vmap over the draw only: no cond inside
            return jax.vmap(lambda k, r: _categorical(k, r[None])[0])(rng, x)
        return _categorical(rng, x)

    def stochastic(x):
        x = apply_temperature(x, temperature)
        # Greedy rows' filters are dropped, so they cannot pull the batch onto an expensive path.
        k = jnp.where(stochastic_rows, top_k, 0)
        p = jnp.where(stochastic_rows, top_p, 1.0)
        return draw(_filter(x, k, p)).astype(jnp.int32)

    pred = stochastic_rows if jnp.ndim(stochastic_rows) == 0 else stochastic_rows[:, 0]
    return _per_row(pred, stochastic, _argmax, logits, out=jax.ShapeDtypeStruct((b,), jnp.int32))


def _argmax(x: jax.Array) -> jax.Array:
    """`jnp.argmax(x, axis=-1)` as int32 (the first maximum; the first NaN if any), in two plain
    reductions. XLA:CPU runs argmax's (value, index) reduction one element at a time: over a
    151936-token vocabulary it took ~0.7 ms a row, 5 % of a 0.5B Q8_0 decode step; a max and then
    the first index holding it are vectorized reductions, ~6x faster."""
    v = x.shape[-1]
    top = jnp.max(x, axis=-1, keepdims=True)
    hit = jnp.where(jnp.isnan(top), jnp.isnan(x), x == top)
    return jnp.min(jnp.where(hit, jnp.arange(v, dtype=jnp.int32), v), axis=-1)


def _categorical(key: jax.Array, x: jax.Array) -> jax.Array:
    """`jax.random.categorical(key, x, axis=-1)`, bit for bit: the same Gumbel noise (jax draws it as
    `gumbel(key, x.shape, x.dtype)`) added to x, then `_argmax` instead of `jnp.argmax`, whose
    reduction XLA:CPU also fused with the noise's generation: 3.7 ms a 151936-token row, now 0.8."""
    return _argmax(jax.random.gumbel(key, x.shape, x.dtype) + x)


def greedy_tokens(logits: jax.Array, presence: jax.Array, params: SamplingParams) -> jax.Array:
    """`sample` when every row is greedy (temperature 0): the argmax of the penalized logits [B]
    int32, the very computation of `sample`'s greedy branch, without the filters and draws of its
    other branch. Compiled alone it costs far less: on XLA:CPU `sample`'s filters took ~0.1 GB
    more memory to compile and most of its compile time. The caller must know the rows are greedy
    (the serving engine does, from its requests' params): a row with temperature > 0 would not be
    sampled here."""
    _, _, _, penalty = _param_cols(params, logits.shape[0])
    return _argmax(apply_repetition_penalty(logits.astype(jnp.float32), presence, penalty))


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
    "greedy_tokens",
    "sample",
    "update_presence",
    "presence_from_tokens",
]
