"""Sampling checked against transformers' logits processors, the reference semantics we promise.

Each processor and the whole chain are compared with HF on random logits built from the same numpy
arrays; sampling is checked for greedy = argmax, seed reproducibility, staying inside the kept set
and matching the processed distribution; and parameter changes must not recompile.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from ruvllm_jax.backend import sampling as S
from ruvllm_jax.backend.sampling import (
    SamplingParams,
    apply_repetition_penalty,
    apply_temperature,
    apply_top_k,
    apply_top_p,
    greedy_tokens,
    presence_from_tokens,
    process_logits,
    sample,
    update_presence,
)
from ruvllm_jax.errors import ConfigError
from ruvllm_jax.types import GenerateParams

# A few fixed shapes: each new shape costs a compile, which dominates the runtime otherwise.
BATCHES = st.sampled_from([1, 3])
VOCABS = st.sampled_from([2, 37, 300])
# Derandomized (a seed derived from each test) with no example database, as the kernel tests do,
# so a CI run tests the same examples every time and cannot flake on a new draw.
HYP = settings(max_examples=25, deadline=None, derandomize=True, database=None,
               suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(params=["small_cap", "default_cap"])
def jitted(request, monkeypatch):
    """Fresh jitted processors, run with a tiny top-k cap too so small vocabularies exercise both
    the partial-selection path and its sort fallback. The cap is read at trace time, so the jitted
    functions are new wrappers per test (jit caches per function object)."""
    if request.param == "small_cap":
        monkeypatch.setattr(S, "_TOP_K_CAP", 4)

    class J:
        top_k = staticmethod(jax.jit(lambda x, k: apply_top_k(x, k)))
        top_p = staticmethod(jax.jit(lambda x, p: apply_top_p(x, p)))
        chain = staticmethod(jax.jit(lambda x, pres, params: process_logits(x, pres, params)))

    return J


def _logits(seed: int, b: int, v: int, scale: float = 3.0) -> np.ndarray:
    return (np.random.default_rng(seed).normal(size=(b, v)) * scale).astype(np.float32)


def _hf(proc, logits: np.ndarray, input_ids: np.ndarray | None = None) -> np.ndarray:
    ids = torch.zeros((logits.shape[0], 1), dtype=torch.long) if input_ids is None else torch.from_numpy(input_ids)
    return proc(ids, torch.from_numpy(logits.copy())).numpy()


def _assert_same_filtered(ours, ref, allowed_mismatch=None):
    """Same -inf mask (exactly, except where `allowed_mismatch`) and same finite values."""
    ours = np.asarray(ours)
    ours_masked, ref_masked = np.isneginf(ours), np.isneginf(ref)
    diff = ours_masked != ref_masked
    if allowed_mismatch is not None:
        diff &= ~allowed_mismatch
    assert not diff.any(), f"mask differs at {np.argwhere(diff)[:10]}"
    both = ~ours_masked & ~ref_masked
    np.testing.assert_allclose(ours[both], ref[both], rtol=1e-6, atol=1e-6)


def _hf_cum_at_token(logits: np.ndarray) -> np.ndarray:
    """HF's ascending cumulative probability, scattered back to each token's position."""
    t = torch.from_numpy(logits.copy())
    sl, si = torch.sort(t, descending=False)
    cum = sl.softmax(-1).cumsum(-1)
    return torch.zeros_like(cum).scatter(1, si, cum).numpy()


# --- each processor against HF ------------------------------------------------------------------


@HYP
@given(
    seed=st.integers(0, 2**31 - 1),
    b=BATCHES,
    v=VOCABS,
    s=st.sampled_from([1, 12]),
    penalty=st.floats(0.3, 3.0),
)
def test_repetition_penalty_matches_hf(seed, b, v, s, penalty):
    rng = np.random.default_rng(seed)
    x = _logits(seed, b, v)
    x[:, ::7] = 0.0  # zero logits take the divide branch
    ids = rng.integers(0, v, size=(b, s)).astype(np.int64)
    presence = presence_from_tokens(jnp.asarray(ids, jnp.int32), jnp.full((b,), s), v)
    ours = jax.jit(apply_repetition_penalty)(jnp.asarray(x), presence, jnp.float32(penalty))
    ref = _hf(RepetitionPenaltyLogitsProcessor(penalty=penalty), x, ids)
    np.testing.assert_allclose(np.asarray(ours), ref, rtol=1e-6, atol=0)
    seen = np.asarray(presence) & (x != 0)
    assert np.all((ref != x)[seen] == (penalty != 1.0))  # the check has something to see
    assert (ref == x)[~np.asarray(presence)].all()


def test_presence_excludes_padding_and_updates():
    tokens = jnp.asarray([[3, 1, 3, 9, 9], [0, 2, 7, 7, 7]], jnp.int32)
    pres = presence_from_tokens(tokens, jnp.asarray([3, 2]), 10)
    expected = np.zeros((2, 10), bool)
    expected[0, [1, 3]] = True
    expected[1, [0, 2]] = True
    np.testing.assert_array_equal(np.asarray(pres), expected)
    pres = update_presence(pres, jnp.asarray([5, 2], jnp.int32))
    expected[0, 5] = True
    np.testing.assert_array_equal(np.asarray(pres), expected)


@HYP
@given(seed=st.integers(0, 2**31 - 1), b=BATCHES, v=VOCABS, t=st.floats(0.05, 5.0))
def test_temperature_matches_hf(seed, b, v, t):
    x = _logits(seed, b, v)
    ours = jax.jit(apply_temperature)(jnp.asarray(x), jnp.float32(t))
    np.testing.assert_allclose(np.asarray(ours), _hf(TemperatureLogitsWarper(t), x), rtol=1e-6)


def test_temperature_zero_is_identity():
    x = _logits(0, 2, 50)
    np.testing.assert_array_equal(np.asarray(apply_temperature(jnp.asarray(x), jnp.float32(0.0))), x)


@HYP
@given(
    seed=st.integers(0, 2**31 - 1),
    b=BATCHES,
    v=VOCABS,
    k_frac=st.floats(0.0, 1.2),
    levels=st.sampled_from([3, 10, 1000]),
)
def test_top_k_matches_hf_with_ties(jitted, seed, b, v, k_frac, levels):
    # Few distinct levels -> many ties with the k-th value, which HF keeps.
    x = np.random.default_rng(seed).integers(0, levels, size=(b, v)).astype(np.float32) * 0.5
    k = int(round(k_frac * v))
    ours = jitted.top_k(jnp.asarray(x), jnp.int32(k))
    if k == 0:
        np.testing.assert_array_equal(np.asarray(ours), x)
        return
    _assert_same_filtered(ours, _hf(TopKLogitsWarper(k), x))


@HYP
@given(
    seed=st.integers(0, 2**31 - 1),
    b=BATCHES,
    v=VOCABS,
    top_p=st.one_of(st.floats(1e-4, 1.0), st.sampled_from([1e-7, 1e-3, 0.5, 0.999, 0.9999999, 1.0])),
    scale=st.sampled_from([0.5, 3.0, 12.0]),
)
def test_top_p_matches_hf(jitted, seed, b, v, top_p, scale):
    x = _logits(seed, b, v, scale)
    ours = jitted.top_p(jnp.asarray(x), jnp.float32(top_p))
    if np.float32(top_p) >= 1.0:
        np.testing.assert_array_equal(np.asarray(ours), x)
        return
    ref = _hf(TopPLogitsWarper(float(np.float32(top_p))), x)
    # Rounding of the cumulative sum may flip a token sitting right on the 1 - top_p boundary.
    near = np.abs(_hf_cum_at_token(x) - (1 - np.float32(top_p))) < 1e-5
    _assert_same_filtered(ours, ref, allowed_mismatch=near)
    assert np.isfinite(np.asarray(ours)).any(axis=-1).all()


@pytest.mark.parametrize("scale", [0.5, 4.0, 15.0])
@pytest.mark.parametrize("top_k", [0, 20, 2000])
def test_top_k_top_p_large_vocab_matches_hf(scale, top_k):
    """V above the default cap: peaked logits take the partial path, flat ones the sort fallback."""
    x = _logits(7, 2, 5000, scale)
    p = SamplingParams.create(temperature=1.0, top_k=top_k, top_p=0.9, repetition_penalty=1.0)
    ours = process_logits(jnp.asarray(x), jnp.zeros(x.shape, bool), p)
    ref = torch.from_numpy(x.copy())
    if top_k:
        ref = TopKLogitsWarper(top_k)(None, ref)
    ref_in = ref.numpy().copy()
    ref = TopPLogitsWarper(0.9)(None, ref).numpy()
    near = np.abs(_hf_cum_at_token(ref_in) - 0.1) < 1e-5
    _assert_same_filtered(ours, ref, allowed_mismatch=near)


# --- the whole chain ---------------------------------------------------------------------------


@HYP
@given(
    seed=st.integers(0, 2**31 - 1),
    b=BATCHES,
    v=VOCABS,
    temperature=st.floats(0.1, 3.0),
    k_frac=st.sampled_from([0.0, 0.01, 0.1, 0.5, 1.0]),
    top_p=st.sampled_from([0.05, 0.5, 0.9, 1.0]),
    penalty=st.sampled_from([1.0, 0.8, 1.3]),
)
@example(seed=0, b=3, v=300, temperature=1.0, k_frac=0.1, top_p=1.0, penalty=1.0)  # top-k alone must bite
def test_chain_matches_hf(jitted, seed, b, v, temperature, k_frac, top_p, penalty):
    rng = np.random.default_rng(seed)
    x = _logits(seed, b, v)
    ids = rng.integers(0, v, size=(b, 6)).astype(np.int64)
    k = int(round(k_frac * v))
    params = SamplingParams.create(temperature, k, top_p, penalty)
    presence = presence_from_tokens(jnp.asarray(ids, jnp.int32), jnp.full((b,), 6), v)
    ours = jitted.chain(jnp.asarray(x), presence, params)

    ref = torch.from_numpy(x.copy())
    tids = torch.from_numpy(ids)
    ref = RepetitionPenaltyLogitsProcessor(penalty)(tids, ref)
    ref = TemperatureLogitsWarper(temperature)(tids, ref)
    if k:
        ref = TopKLogitsWarper(k)(tids, ref)
    before_p = ref.numpy().copy()
    near = None
    if top_p < 1.0:
        ref = TopPLogitsWarper(top_p)(tids, ref)
        # Rounding may flip a token right on the 1 - top_p boundary. Only tokens top-k kept can sit
        # there: a removed one has probability 0 and, at top_p = 1, cumulative mass 0 = 1 - top_p,
        # so without the isfinite a chain that skipped top-k would pass.
        near = np.isfinite(before_p) & (np.abs(_hf_cum_at_token(before_p) - (1 - np.float32(top_p))) < 1e-5)
    _assert_same_filtered(ours, ref.numpy(), allowed_mismatch=near)


# --- sampling ----------------------------------------------------------------------------------


def test_greedy_is_argmax_of_penalized_logits():
    x = _logits(1, 4, 100)
    top = x.argmax(-1)
    presence = np.zeros_like(x, bool)
    presence[np.arange(4), top] = True  # a strong penalty must move the argmax off the seen token
    params = SamplingParams.create(temperature=0.0, top_k=3, top_p=0.5, repetition_penalty=1e3)
    got = np.asarray(sample(jax.random.key(0), jnp.asarray(x), jnp.asarray(presence), params))
    pen = np.where(presence, np.where(x < 0, x * 1e3, x / 1e3), x)
    np.testing.assert_array_equal(got, pen.argmax(-1))
    assert (got != top).all()
    assert got.dtype == np.int32


@HYP
@given(seed=st.integers(0, 2**16), b=BATCHES, v=VOCABS, penalty=st.sampled_from([1.0, 0.7, 1.3, 1e3]),
       per_row=st.booleans())
def test_greedy_tokens_are_hf_penalty_then_argmax_and_samples_greedy_rows(seed, b, v, penalty, per_row):
    """The engine's greedy-only program draws with `greedy_tokens`: HF's repetition penalty then
    torch's argmax, and the same tokens `sample` gives rows at temperature 0 whatever their filters."""
    rng = np.random.default_rng(seed)
    x = _logits(seed, b, v)
    ids = rng.integers(0, v, size=(b, 5)).astype(np.int64)
    presence = presence_from_tokens(jnp.asarray(ids, jnp.int32), jnp.full((b,), 5), v)
    pens = rng.choice([1.0, penalty], size=b).astype(np.float32) if per_row else np.float32(penalty)
    params = SamplingParams(temperature=jnp.zeros(np.shape(pens), jnp.float32), top_k=jnp.full(np.shape(pens), 3),
                            top_p=jnp.full(np.shape(pens), 0.5, jnp.float32), repetition_penalty=jnp.asarray(pens))
    got = np.asarray(jax.jit(greedy_tokens)(jnp.asarray(x), presence, params))
    assert got.dtype == np.int32 and got.shape == (b,)
    ref = []
    for r in range(b):
        pen = float(pens[r]) if per_row else float(pens)
        row = RepetitionPenaltyLogitsProcessor(pen)(torch.from_numpy(ids[r : r + 1]),
                                                    torch.from_numpy(x[r : r + 1].copy()))
        ref.append(int(torch.argmax(row, dim=-1)))
    np.testing.assert_array_equal(got, ref)
    drawn = jax.jit(sample)(jax.random.key(seed), jnp.asarray(x), presence, params)
    np.testing.assert_array_equal(got, np.asarray(drawn))


_SPECIAL = [np.nan, np.inf, -np.inf, 0.0, -0.0, 1.0, -1.0, 3.5, np.finfo(np.float32).max]


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(b=BATCHES, v=VOCABS, data=st.data())
def test_argmax_is_numpys_and_torchs_first_maximum(b, v, data):
    """`_argmax` (two plain reductions, see its docstring) picks what numpy's and torch's argmax pick:
    the first of tied maxima, the first NaN when a row holds one, index 0 for a row of -inf."""
    vals = st.one_of(st.sampled_from(_SPECIAL), st.floats(-4, 4, width=32))
    x = np.asarray(data.draw(st.lists(vals, min_size=b * v, max_size=b * v)), np.float32).reshape(b, v)
    got = np.asarray(jax.jit(S._argmax)(jnp.asarray(x)))
    assert got.dtype == np.int32 and got.shape == (b,)
    np.testing.assert_array_equal(got, x.argmax(-1))
    np.testing.assert_array_equal(got, torch.argmax(torch.from_numpy(x), dim=-1).numpy())


def test_seeded_sampling_repeats_and_seeds_differ():
    x = jnp.asarray(_logits(2, 64, 50, scale=1.0))
    pres = jnp.zeros(x.shape, bool)
    params = SamplingParams.create(temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0)
    f = jax.jit(sample)
    a = np.asarray(f(jax.random.key(123), x, pres, params))
    b = np.asarray(f(jax.random.key(123), x, pres, params))
    c = np.asarray(f(jax.random.key(124), x, pres, params))
    np.testing.assert_array_equal(a, b)
    assert (a != c).sum() > 20  # 64 rows of a broad distribution: most draws differ


@pytest.mark.parametrize("top_k,top_p", [(5, 1.0), (0, 0.6), (7, 0.8), (2000, 0.3)])
def test_samples_stay_in_kept_set(top_k, top_p):
    x = jnp.asarray(_logits(3, 64, 2000, scale=2.0))
    pres = jnp.zeros(x.shape, bool)
    params = SamplingParams.create(temperature=1.5, top_k=top_k, top_p=top_p, repetition_penalty=1.0)
    kept = np.isfinite(np.asarray(jax.jit(process_logits)(x, pres, params)))
    assert (kept.sum(-1) < 2000).all()
    f = jax.jit(sample)
    for seed in range(4):
        tok = np.asarray(f(jax.random.key(seed), x, pres, params))
        assert kept[np.arange(64), tok].all()


def test_empirical_distribution_matches_processed_softmax():
    v, n = 8, 40000
    row = np.array([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, 3.0, -4.0], np.float32)
    presence = np.zeros((1, v), bool)
    presence[0, 6] = True
    params = SamplingParams.create(temperature=0.8, top_k=6, top_p=0.95, repetition_penalty=1.5)
    proc = np.asarray(process_logits(jnp.asarray(row[None]), jnp.asarray(presence), params))[0]
    probs = np.exp(proc - proc.max())
    probs /= probs.sum()
    assert 2 < (probs > 0).sum() < v  # the filters removed something and left a real choice

    x = jnp.broadcast_to(jnp.asarray(row), (n, v))
    pres = jnp.broadcast_to(jnp.asarray(presence[0]), (n, v))
    tok = np.asarray(jax.jit(sample)(jax.random.key(9), x, pres, params))
    counts = np.bincount(tok, minlength=v)
    assert counts[probs == 0].sum() == 0
    kept = probs > 0

    def chi2(p):
        expected = n * p[kept]
        return float(((counts[kept] - expected) ** 2 / expected).sum())

    df = kept.sum() - 1
    assert chi2(probs) < df + 8 * np.sqrt(2 * df)  # ~5 sigma loose bound
    # The same statistic rejects the raw (unprocessed) distribution, so the bound can fail.
    raw = np.exp(row - row.max())
    raw = np.where(kept, raw, 0)
    assert chi2(raw / raw.sum()) > df + 8 * np.sqrt(2 * df)


def test_changing_params_does_not_recompile():
    traces = []

    @jax.jit
    def step(key, logits, presence, params):
        traces.append(1)
        return sample(key, logits, presence, params)

    x = jnp.asarray(_logits(4, 2, 500))
    pres = jnp.zeros(x.shape, bool)
    settings_ = [(0.0, 0, 1.0, 1.0), (0.7, 0, 1.0, 1.1), (1.0, 40, 1.0, 1.0), (0.5, 0, 0.9, 1.2), (1.3, 10, 0.5, 0.9)]
    outs = [step(jax.random.key(0), x, pres, SamplingParams.create(*s)) for s in settings_]
    outs += [step(jax.random.key(0), x, pres, SamplingParams.from_generate_params(GenerateParams()))]
    jax.block_until_ready(outs)
    assert len(traces) == 1


def test_decode_loop_in_while_loop():
    """Sampling plus presence updates inside lax.while_loop; greedy with a huge penalty never
    repeats a token, which only holds if presence is carried and applied each step."""
    v, steps = 30, 12
    x = jnp.asarray(np.abs(_logits(5, 2, v)) + 0.1)  # all positive: a seen token always loses
    prompt = jnp.asarray([[1, 2, 0], [4, 4, 4]], jnp.int32)
    params = SamplingParams.create(temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1e4)

    @jax.jit
    def run(x, params):
        pres = presence_from_tokens(prompt, jnp.asarray([2, 3]), v)

        def body(c):
            i, pres, out, key = c
            key, sub = jax.random.split(key)
            tok = sample(sub, x, pres, params)
            return i + 1, update_presence(pres, tok), out.at[:, i].set(tok), key

        init = (0, pres, jnp.zeros((2, steps), jnp.int32), jax.random.key(0))
        return jax.lax.while_loop(lambda c: c[0] < steps, body, init)[2]

    out = np.asarray(run(x, params))
    for r, seen in enumerate([{1, 2}, {4}]):
        assert len(set(out[r])) == steps and not (set(out[r]) & seen)
    sampled = np.asarray(run(x, SamplingParams.create(1.0, 5, 0.9, 1.0)))
    assert sampled.shape == (2, steps) and ((0 <= sampled) & (sampled < v)).all()


# --- parameters ---------------------------------------------------------------------------------


def test_from_generate_params():
    p = SamplingParams.from_generate_params(
        GenerateParams(temperature=0.5, top_k=40, top_p=0.8, repetition_penalty=1.2)
    )
    assert p.temperature.dtype == jnp.float32 and p.top_k.dtype == jnp.int32
    assert float(p.temperature) == 0.5 and int(p.top_k) == 40
    assert float(p.top_p) == pytest.approx(0.8) and float(p.repetition_penalty) == pytest.approx(1.2)
    assert len(jax.tree_util.tree_leaves(p)) == 4


@pytest.mark.parametrize(
    "bad",
    [
        {"temperature": -0.1},
        {"temperature": float("nan")},
        {"top_p": 0.0},
        {"top_p": -0.5},
        {"top_p": 1.01},
        {"repetition_penalty": 0.0},
        {"repetition_penalty": -1.0},
        {"top_k": -1},
    ],
)
def test_generate_params_rejects_bad_values(bad):
    with pytest.raises(ConfigError):
        GenerateParams(**bad)


@pytest.mark.parametrize("seed, spread", [(0, 0.5), (1, 1.0), (2, 1.5)])
def test_top_p_on_flat_large_vocab_matches_hf_without_sorting(seed, spread):
    """Nuclei far wider than the top-k cap take the bisection path; its mask equals HF's."""
    logits = np.random.default_rng(seed).normal(size=(2, 50_000)).astype(np.float32) * spread
    for top_p in (0.5, 0.9, 0.99):
        ours = np.asarray(jax.jit(apply_top_p)(jnp.asarray(logits), top_p))
        hf = TopPLogitsWarper(top_p)(None, torch.tensor(logits)).numpy()
        assert np.isfinite(hf).sum() > 2 * S._TOP_K_CAP  # really wider than the partial path
        np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(hf))


def test_from_generate_params_checks_top_k_against_the_vocabulary():
    p = GenerateParams(top_k=300)
    assert int(SamplingParams.from_generate_params(p, vocab_size=300).top_k) == 300  # == V: keeps every token
    with pytest.raises(ConfigError, match="top_k=300 exceeds the vocabulary size 299"):
        SamplingParams.from_generate_params(p, vocab_size=299)
    with pytest.raises(ConfigError, match=r"top_k=2147483648 does not fit int32"):
        SamplingParams.from_generate_params(GenerateParams(top_k=2**31))  # used to overflow in jnp.asarray
    for bad in (0, -3, True, 2.5):
        with pytest.raises(ConfigError, match="vocab_size must be an int > 0"):
            SamplingParams.from_generate_params(p, vocab_size=bad)
    for bad in ({"top_k": 3}, None, SamplingParams.create()):
        with pytest.raises(ConfigError, match=r"pass GenerateParams\(\.\.\.\)"):
            SamplingParams.from_generate_params(bad)
