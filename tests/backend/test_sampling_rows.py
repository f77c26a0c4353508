"""Per-row sampling parameters and per-row keys, as a continuous-batching engine uses them.

The contract: with per-row params and keys, every row of `sample` is bit-identical to sampling
that row alone with its own scalar params and key, whatever the other rows hold (greedy or not,
other filters, other keys). The per-row chain is also checked against transformers' processors
applied row by row; the params helpers are checked for shapes and for running under jit.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hypothesis import given, settings
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
    presence_from_tokens,
    process_logits,
    sample,
)

# Above the default top-k cap, so top-k > cap (the sort), nuclei wider than the cap (bisection) and
# the partial path all occur; one vocabulary keeps the number of compiles down.
V = 1500
assert V > S._TOP_K_CAP
HYP = settings(max_examples=15, deadline=None, derandomize=True, database=None)

# Shared across tests: jit caches per shape, and compiles dominate this file's runtime.
_sample = jax.jit(sample)
_process = jax.jit(process_logits)


def _row_params(r: np.random.Generator) -> SamplingParams:
    """Random per-row parameters covering every path: greedy or not, top-k off / small / beyond the
    cap, top-p off or on, penalties both ways."""
    return SamplingParams.create(
        temperature=float(r.choice([0.0, 0.0, 0.3, 0.8, 1.0, 1.7])),
        top_k=int(r.choice([0, 1, 5, 50, 1100, V])),
        top_p=float(r.choice([1.0, 1.0, 0.3, 0.7, 0.9, 0.99])),
        repetition_penalty=float(r.choice([1.0, 1.3, 0.7])),
    )


def _batch(seed: int, b: int):
    """Logits with a per-row scale (flat rows have nuclei wider than the cap), presence, params."""
    rng = np.random.default_rng(seed)
    scale = rng.choice([0.2, 1.0, 4.0, 12.0], size=(b, 1))
    x = (rng.normal(size=(b, V)) * scale).astype(np.float32)
    x[:, ::11] = 0.0  # zero logits take the penalty's divide branch
    presence = rng.random((b, V)) < 0.05
    rows = [_row_params(rng) for _ in range(b)]
    return x, presence, rows


def _alone(keys, x, presence, rows, b):
    return int(_sample(keys[b], x[b : b + 1], presence[b : b + 1], rows[b])[0])


# --- the contract: a row of the batch == the row alone -------------------------------------------


@HYP
@given(seed=st.integers(0, 2**31 - 1), b=st.sampled_from([1, 3, 5]))  # each batch size is a compile
def test_each_row_samples_as_if_alone(seed, b):
    x, presence, rows = _batch(seed, b)
    params = SamplingParams.stack(rows)
    keys = jax.random.split(jax.random.key(seed), b)
    got = np.asarray(_sample(keys, x, presence, params))
    assert got.shape == (b,) and got.dtype == np.int32
    for i in range(b):
        assert got[i] == _alone(keys, x, presence, rows, i), (i, rows[i])
        if float(rows[i].temperature) == 0.0:  # greedy rows: argmax of the penalized logits
            pen = np.asarray(apply_repetition_penalty(jnp.asarray(x[i : i + 1]), presence[i : i + 1],
                                                      rows[i].repetition_penalty))
            assert got[i] == pen[0].argmax()


def test_mixed_batch_hits_every_path_and_stays_exact():
    """A fixed batch with one row on each path (greedy, none, top-k small and beyond the cap,
    partial top-p, bisection, sort), sampled under several keys."""
    rng = np.random.default_rng(0)
    rows = [
        SamplingParams.create(0.0, 50, 0.5, 1.3),  # greedy, with filters that must be ignored
        SamplingParams.create(1.2, 1100, 1.0, 1.0),  # top-k beyond the cap: sort for the k-th value
        SamplingParams.create(0.8, 50, 0.9, 1.1),  # partial top-p
        SamplingParams.create(1.0, 0, 0.99, 1.0),  # flat row, nucleus wider than the cap: bisection
        SamplingParams.create(1.0, 1200, 0.95, 1.0),  # wide nucleus with k beyond the cap: full sort
    ]
    b = len(rows)  # 5, the largest batch of the property test: no new compile
    scale = np.array([[3.0], [0.5], [3.0], [0.2], [0.2]], np.float32)
    x = (rng.normal(size=(b, V)) * scale).astype(np.float32)
    presence = rng.random((b, V)) < 0.05
    params = SamplingParams.stack(rows)
    # Every filter bites where it should (the processed rows agree with the rows alone, exactly).
    proc = np.asarray(_process(x, presence, params))
    for i in range(b):
        np.testing.assert_array_equal(proc[i], np.asarray(_process(x[i : i + 1], presence[i : i + 1], rows[i]))[0])
    kept = np.isfinite(proc).sum(-1)
    assert kept[1] == 1100 and kept[2] < 50 and kept[3] > S._TOP_K_CAP and S._TOP_K_CAP < kept[4] < 1200
    for seed in range(3):
        keys = jax.random.split(jax.random.key(seed), b)
        got = np.asarray(_sample(keys, x, presence, params))
        assert [_alone(keys, x, presence, rows, i) for i in range(b)] == got.tolist()
        assert np.isfinite(proc[np.arange(1, b), got[1:]]).all()


def test_categorical_of_a_row_equals_vmapped_draw():
    """The premise of the per-row draw: `categorical(key, x[None])` on each row alone equals the
    vmapped draw (same Gumbel bits for a [1, V] and a vmapped [V] draw)."""
    x = jnp.asarray(np.random.default_rng(1).normal(size=(4, 300)).astype(np.float32))
    keys = jax.random.split(jax.random.key(3), 4)
    vm = jax.jit(jax.vmap(lambda k, r: jax.random.categorical(k, r[None], axis=-1)[0]))(keys, x)
    alone = jax.jit(lambda k, r: jax.random.categorical(k, r, axis=-1))
    assert np.asarray(vm).tolist() == [int(alone(keys[i], x[i : i + 1])[0]) for i in range(4)]


@settings(max_examples=30, deadline=None, derandomize=True, database=None)
@given(seed=st.integers(0, 2**32 - 1), b=st.sampled_from([1, 3]), v=st.sampled_from([2, 300]),
       masked=st.floats(0.0, 0.99), scale=st.sampled_from([0.1, 3.0, 50.0]))
def test_our_categorical_is_jax_random_categorical(seed, b, v, masked, scale):
    """`sample` draws with `S._categorical` (Gumbel noise plus `_argmax`, for speed): token for token
    `jax.random.categorical`, for one key over the batch and vmapped per-row keys, typed or raw,
    on rows with -inf (filtered) entries."""
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=(b, v)) * scale).astype(np.float32)
    x[rng.random((b, v)) < masked] = -np.inf
    x[:, rng.integers(v)] = 1.0  # each row keeps a token
    x = jnp.asarray(x)
    key = jax.random.key(seed)
    ours = jax.jit(S._categorical)(key, x)
    np.testing.assert_array_equal(ours, jax.jit(lambda k, r: jax.random.categorical(k, r, axis=-1))(key, x))
    for keys in (jax.random.split(key, b), jax.random.key_data(jax.random.split(key, b))):
        vm = jax.jit(jax.vmap(lambda k, r: S._categorical(k, r[None])[0]))(keys, x)
        ref = jax.jit(jax.vmap(lambda k, r: jax.random.categorical(k, r[None], axis=-1)[0]))(keys, x)
        np.testing.assert_array_equal(vm, ref)


def test_scalar_params_with_raw_per_row_keys():
    """Raw uint32 keys [B, 2] are per-row keys too, and scalar params then act per row: each row
    is still the row alone (a small vocabulary keeps these two compiles cheap)."""
    rng = np.random.default_rng(6)
    x = (rng.normal(size=(3, 200)) * np.array([[0.3], [3.0], [12.0]])).astype(np.float32)
    presence = rng.random((3, 200)) < 0.1
    p = SamplingParams.create(1.0, 20, 0.9, 1.2)
    f = jax.jit(sample)
    for seed in range(3):
        keys = jax.random.split(jax.random.PRNGKey(seed), 3)  # [3, 2] uint32
        got = np.asarray(f(keys, x, presence, p))
        assert got.tolist() == [int(f(keys[i], x[i : i + 1], presence[i : i + 1], p)[0]) for i in range(3)]


# --- a row's draws depend only on its own key and params ------------------------------------------


def test_row_draws_depend_only_on_own_key_and_params():
    rng = np.random.default_rng(7)
    x = (rng.normal(size=(3, V)) * 1.0).astype(np.float32)  # broad: draws vary with the key
    presence = np.zeros((3, V), bool)
    mine = SamplingParams.create(1.0, 200, 0.95, 1.0)
    base_rows = [mine, SamplingParams.create(0.7, 5, 1.0, 1.0), SamplingParams.create(0.0, 0, 1.0, 1.0)]
    others = [
        [mine, SamplingParams.create(1.5, 1100, 0.3, 1.4), SamplingParams.create(1.0, 0, 0.99, 0.5)],
        [mine, SamplingParams.create(0.0, 0, 1.0, 1.0), SamplingParams.create(0.0, 0, 1.0, 1.0)],
    ]
    base_keys = jax.random.split(jax.random.key(0), 3)
    own = []
    for seed in range(6):
        k0 = jax.random.key(100 + seed)
        keys = base_keys.at[0].set(k0)
        tok = int(_sample(keys, x, presence, SamplingParams.stack(base_rows))[0])
        own.append(tok)
        for j, rows in enumerate(others):  # other rows' keys and params change; row 0 must not
            other_keys = jax.random.split(jax.random.key(1000 + 10 * seed + j), 3).at[0].set(k0)
            assert int(_sample(other_keys, x, presence, SamplingParams.stack(rows))[0]) == tok
        assert tok == int(_sample(k0, x[:1], presence[:1], mine)[0])
    assert len(set(own)) > 1  # its own key does move it


# --- per-row filtering against transformers, row by row -------------------------------------------


def _hf_chain(x: np.ndarray, ids: np.ndarray, p: SamplingParams):
    """HF's processors on one row; returns (processed, cum at each token before top-p, or None)."""
    t = torch.from_numpy(x.copy())[None]
    tids = torch.from_numpy(ids)[None]
    t = RepetitionPenaltyLogitsProcessor(float(p.repetition_penalty))(tids, t)
    if float(p.temperature) > 0:
        t = TemperatureLogitsWarper(float(p.temperature))(tids, t)
    if 0 < int(p.top_k) < x.shape[-1]:
        t = TopKLogitsWarper(int(p.top_k))(tids, t)
    before_p = t.numpy()[0].copy()
    if float(p.top_p) < 1.0:
        t = TopPLogitsWarper(float(p.top_p))(tids, t)
        sl, si = torch.sort(torch.from_numpy(before_p), descending=False)
        cum = torch.zeros_like(sl).scatter(0, si, sl.softmax(-1).cumsum(-1)).numpy()
        near = np.isfinite(before_p) & (np.abs(cum - (1 - np.float32(float(p.top_p)))) < 1e-5)
        return t.numpy()[0], near
    return t.numpy()[0], None


@HYP
@given(seed=st.integers(0, 2**31 - 1))
def test_per_row_chain_matches_hf_row_by_row(seed):
    b = 5
    rng = np.random.default_rng(seed)
    x, _, rows = _batch(seed, b)
    ids = rng.integers(0, V, size=(b, 40)).astype(np.int64)
    presence = presence_from_tokens(jnp.asarray(ids, jnp.int32), jnp.full((b,), 40), V)
    ours = np.asarray(_process(x, presence, SamplingParams.stack(rows)))
    for i in range(b):
        np.testing.assert_array_equal(ours[i], np.asarray(_process(x[i : i + 1], presence[i : i + 1], rows[i]))[0])
        ref, near = _hf_chain(x[i], ids[i], rows[i])
        mask_diff = np.isneginf(ours[i]) != np.isneginf(ref)
        if near is not None:
            mask_diff &= ~near  # rounding may flip a token right on the 1 - top_p boundary
            # Tokens tied with the smallest kept value are all kept here; HF keeps them by sort
            # position (the zero logits of `_batch` make such ties common).
            kept = np.isfinite(ours[i])
            mask_diff &= ~(kept & (ours[i] == ours[i][kept].min()))
        assert not mask_diff.any(), (i, rows[i], np.argwhere(mask_diff)[:10])
        both = np.isfinite(ours[i]) & np.isfinite(ref)
        np.testing.assert_allclose(ours[i][both], ref[both], rtol=1e-6, atol=1e-6)


def test_each_processor_takes_per_row_arrays():
    """The public processors with [B] parameters equal the scalar call on each row (exactly) and,
    for top-k / top-p, HF's warper on that row."""
    rng = np.random.default_rng(11)
    x = jnp.asarray((rng.normal(size=(4, V)) * np.array([[0.2], [3.0], [3.0], [12.0]])).astype(np.float32))
    presence = jnp.asarray(rng.random((4, V)) < 0.1)
    pen = jnp.asarray([1.0, 1.3, 0.7, 2.0], jnp.float32)
    temp = jnp.asarray([0.0, 0.5, 1.0, 1.7], jnp.float32)
    ks = jnp.asarray([0, 3, 1100, 40], jnp.int32)
    ps = jnp.asarray([0.99, 1.0, 0.5, 0.9], jnp.float32)
    cases = [
        (jax.jit(lambda x, q: apply_repetition_penalty(x, presence, q)), pen),
        (jax.jit(apply_temperature), temp),
        (jax.jit(apply_top_k), ks),
        (jax.jit(apply_top_p), ps),
    ]
    for f, per_row in cases:  # row i of the per-row call == row i of the call with its scalar
        out = np.asarray(f(x, per_row))
        for i in range(4):
            np.testing.assert_array_equal(out[i], np.asarray(f(x, per_row[i]))[i])
    top_k_out = np.asarray(cases[2][0](x, ks))
    top_p_out = np.asarray(cases[3][0](x, ps))
    for i in range(4):
        row = torch.from_numpy(np.asarray(x[i : i + 1]).copy())
        if int(ks[i]):
            ref = TopKLogitsWarper(int(ks[i]))(None, row).numpy()[0]
            np.testing.assert_array_equal(np.isfinite(top_k_out[i]), np.isfinite(ref))
        ref = TopPLogitsWarper(float(ps[i]))(None, row).numpy()[0] if float(ps[i]) < 1 else row.numpy()[0]
        np.testing.assert_array_equal(np.isfinite(top_p_out[i]), np.isfinite(ref))
    assert np.isfinite(top_p_out[0]).sum() > S._TOP_K_CAP  # the flat row took the bisection path


# --- the params helpers -------------------------------------------------------------------------


def test_stack_broadcast_with_row_shapes_and_values():
    rows = [SamplingParams.create(0.0, 0, 1.0, 1.0), SamplingParams.create(0.7, 40, 0.9, 1.2),
            SamplingParams.create(1.3, 5, 0.5, 0.8)]
    p = SamplingParams.stack(rows)
    chex.assert_shape([p.temperature, p.top_k, p.top_p, p.repetition_penalty], (3,))
    chex.assert_type([p.temperature, p.top_k, p.top_p, p.repetition_penalty],
                     [jnp.float32, jnp.int32, jnp.float32, jnp.float32])
    assert p.per_row and not rows[0].per_row
    np.testing.assert_array_equal(np.asarray(p.top_k), [0, 40, 5])

    wide = rows[1].broadcast(5)
    chex.assert_shape(jax.tree_util.tree_leaves(wide), (5,))
    assert (np.asarray(wide.top_k) == 40).all()
    chex.assert_trees_all_equal(p.broadcast(3), p)  # [b] fields are kept as they are

    new = SamplingParams.create(0.2, 7, 0.6, 1.5)
    set_row = jax.jit(lambda p, i, r: p.with_row(i, r))
    get_row = jax.jit(lambda p, i: p.row(i))
    for i in range(3):  # traced index: one compile for every i
        q = set_row(p, jnp.int32(i), new)
        chex.assert_shape(jax.tree_util.tree_leaves(q), (3,))
        chex.assert_trees_all_equal(get_row(q, jnp.int32(i)), new)
        for j in set(range(3)) - {i}:
            chex.assert_trees_all_equal(get_row(q, jnp.int32(j)), rows[j])
    assert set_row._cache_size() == 1 and get_row._cache_size() == 1
    chex.assert_trees_all_equal(jax.jit(SamplingParams.stack)(rows), p)  # stack traces too

    with pytest.raises(ValueError, match="scalar rows"):
        SamplingParams.stack([p])
    with pytest.raises(ValueError, match="at least one row"):
        SamplingParams.stack([])
    with pytest.raises(ValueError, match="with_row needs"):
        rows[0].with_row(0, new)
    with pytest.raises(ValueError, match="cannot broadcast"):
        p.broadcast(4)


def test_shape_mismatches_are_errors():
    x = jnp.zeros((3, 50), jnp.float32)
    pres = jnp.zeros((3, 50), bool)
    two = SamplingParams.stack([SamplingParams.create(1.0)] * 2)
    with pytest.raises(ValueError, match="cannot broadcast"):
        sample(jax.random.key(0), x, pres, two)
    with pytest.raises(ValueError, match="2 keys for 3 rows"):
        sample(jax.random.split(jax.random.key(0), 2), x, pres, SamplingParams.create(1.0))
    with pytest.raises(ValueError, match="scalar or have shape"):
        apply_top_k(x, jnp.zeros((2,), jnp.int32))


def test_per_row_sample_compiles_once_for_any_values():
    traces = []

    @jax.jit
    def step(keys, logits, presence, params):
        traces.append(1)
        return sample(keys, logits, presence, params)

    rng = np.random.default_rng(12)
    x = jnp.asarray(rng.normal(size=(3, 300)).astype(np.float32))
    pres = jnp.zeros(x.shape, bool)
    outs = []
    params = SamplingParams.stack([SamplingParams.create()] * 3)
    for seed in range(5):  # every row gets new values, one row at a time as an engine would
        params = params.with_row(seed % 3, _row_params(rng))
        outs.append(step(jax.random.split(jax.random.key(seed), 3), x, pres, params))
    jax.block_until_ready(outs)
    assert len(traces) == 1
