"""The functional core against hand-written numpy: compose, the merges, consolidate, EWC++, batches."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ruvllm_jax.lora.config import MicroLoraConfig
from ruvllm_jax.sona import ConsolidationStrategy as S
from ruvllm_jax.sona import functional as F

D_IN, D_OUT, R, LAYERS = 6, 5, 2, 2


def _member(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {"layers": tuple({k: {"A": jnp.asarray(rng.normal(size=(D_IN, R)), jnp.float32),
                                 "B": jnp.asarray(rng.normal(size=(R, D_OUT)), jnp.float32)} for k in ("q", "v")}
                            for _ in range(LAYERS))}


def _state(members, delta, scaling=1.0):
    zeros = F.zeros_like(delta)
    return F.SonaState(members=tuple(members), delta=delta, scaling=jnp.float32(scaling), instant_opt=(),
                       fisher=zeros, anchor=members[-1], fisher_updates=jnp.int32(0),
                       replay_tokens=jnp.zeros((0, 1), jnp.int32), replay_weights=jnp.zeros((0, 1), jnp.float32))


def _lora_out(x, m, scaling) -> np.ndarray:
    return scaling * (np.asarray(x, np.float64) @ np.asarray(m["A"], np.float64)) @ np.asarray(m["B"], np.float64)


def _leaves64(tree):
    return [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]


def test_init_is_one_member_with_b_zero_no_delta_and_scaling_alpha_over_rank(sona_backend):
    cfg = sona_backend.config
    st = F.init(jax.random.PRNGKey(3), cfg, MicroLoraConfig.for_model(cfg, rank=2, alpha=6.0))
    assert len(st.members) == 1 and float(st.scaling) == 3.0 and int(st.fisher_updates) == 0
    layers = st.members[0]["layers"]
    assert len(layers) == cfg.num_layers and set(layers[0]) == {"q", "v"}
    assert layers[0]["q"]["A"].shape == (cfg.hidden_size, 2) and layers[0]["q"]["B"].shape == (2, cfg.hidden_size)
    for layer in layers:
        for m in layer.values():
            assert np.all(np.asarray(m["B"]) == 0) and np.std(np.asarray(m["A"])) > 0
    assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves((st.delta, st.fisher)))
    for a, b in zip(jax.tree.leaves(st.anchor), jax.tree.leaves(st.members[0]), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_compose_output_is_the_mean_of_the_members_outputs(k):
    members = [_member(10 + i) for i in range(k)]
    scaling = 1.5
    ads = F.compose(members[:-1], members[-1], jnp.float32(scaling))
    x = np.random.default_rng(0).normal(size=(4, D_IN))
    for layer in range(LAYERS):
        for key in ("q", "v"):
            m = ads["layers"][layer][key]
            assert m["A"].shape == (D_IN, k * R) and m["B"].shape == (k * R, D_OUT)
            got = (x @ np.asarray(m["A"], np.float64)) @ np.asarray(m["B"], np.float64) * float(m["scaling"])
            want = np.mean([_lora_out(x, mem["layers"][layer][key], scaling) for mem in members], axis=0)
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_served_adapters_apply_the_delta_to_the_live_member_only():
    old, live, delta = _member(1), _member(2), _member(3)
    st = _state([old, live], delta, scaling=2.0)
    x = np.random.default_rng(1).normal(size=(3, D_IN))
    for key in ("q", "v"):
        lv = {p: np.asarray(live["layers"][1][key][p], np.float64) + np.asarray(delta["layers"][1][key][p], np.float64)
              for p in ("A", "B")}
        want = 0.5 * (_lora_out(x, old["layers"][1][key], 2.0) + _lora_out(x, lv, 2.0))
        np.testing.assert_allclose(np.asarray(F.adapter_output(st, jnp.asarray(x, jnp.float32), key, 1)), want,
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("strategy, q, want", [
    (S.Average, [0.2, 0.8, 0.8, 0.0], [0.25, 0.25, 0.25, 0.25]),
    (S.Ensemble, [0.9, 0.1], [0.5, 0.5]),
    (S.QualityWeighted, [0.2, 0.8, 0.8, 0.0], [0.2 / 1.8, 0.8 / 1.8, 0.8 / 1.8, 0.0]),
    (S.QualityWeighted, [0.0, 0.0, 0.0], [1 / 3, 1 / 3, 1 / 3]),  # all zero: uniform
    (S.BestOnly, [0.2, 0.8, 0.8, 0.0], [0.0, 1.0, 0.0, 0.0]),  # the earliest among equals
    (S.BestOnly, [0.3], [1.0]),
    (S.EwcMerge, [0.3, 0.6], [0.5, 0.5]),
])
def test_merge_weights_by_strategy(strategy, q, want):
    w = F.merge_weights(strategy, q)
    np.testing.assert_allclose(w, want, rtol=1e-12, atol=1e-15)


def test_merge_updates_is_the_weighted_sum():
    ups = [_member(20 + i) for i in range(3)]
    w = np.array([0.5, 0.2, 0.3])
    got = _leaves64(F.merge_updates(ups, w))
    for j, g in enumerate(got):
        want = sum(w[i] * _leaves64(ups[i])[j] for i in range(3))
        np.testing.assert_allclose(g, want, rtol=1e-6, atol=1e-6)


def test_consolidate_folds_into_the_live_member_or_appends_a_new_one():
    a, b, merged, delta = _member(1), _member(2), _member(3), _member(4)
    st = _state([a, b], delta)
    folded = F.consolidate(st, merged, new_member=False)
    assert len(folded.members) == 2
    for x, y, z in zip(_leaves64(folded.members[-1]), _leaves64(b), _leaves64(merged), strict=True):
        np.testing.assert_allclose(x, y + z, rtol=1e-6, atol=1e-6)
    for x, y in zip(_leaves64(folded.members[0]), _leaves64(a), strict=True):
        np.testing.assert_array_equal(x, y)
    assert all(np.all(x == 0) for x in _leaves64(folded.delta))
    grown = F.consolidate(st, merged, new_member=True, ensemble_size=3)
    assert len(grown.members) == 3
    capped = F.consolidate(st, merged, new_member=True, ensemble_size=2)  # the oldest (a) is dropped
    assert len(capped.members) == 2
    for x, y in zip(_leaves64(capped.members[0]), _leaves64(b), strict=True):
        np.testing.assert_array_equal(x, y)
    for x, y, z in zip(_leaves64(capped.members[1]), _leaves64(b), _leaves64(merged), strict=True):
        np.testing.assert_allclose(x, y + z, rtol=1e-6, atol=1e-6)


def test_set_live_replaces_the_live_member_and_clears_the_delta():
    a, b, theta = _member(1), _member(2), _member(5)
    st = F.set_live(_state([a, b], _member(4)), theta)
    for x, y in zip(_leaves64(st.members[-1]), _leaves64(theta), strict=True):
        np.testing.assert_array_equal(x, y)
    assert all(np.all(x == 0) for x in _leaves64(st.delta))


def test_ewc_penalty_is_half_lambda_fisher_weighted_squared_distance():
    theta, anchor = _member(1), _member(2)
    fisher = jax.tree.map(jnp.abs, _member(3))
    want = 0.5 * 7.0 * sum(np.sum(f * (t - a) ** 2) for f, t, a in
                           zip(_leaves64(fisher), _leaves64(theta), _leaves64(anchor), strict=True))
    np.testing.assert_allclose(float(F.ewc_penalty(theta, fisher, anchor, 7.0)), want, rtol=1e-5)
    assert float(F.ewc_penalty(theta, fisher, anchor, 0.0)) == 0.0


def test_refresh_fisher_takes_the_first_estimate_then_an_ema_and_anchors_at_the_live_member():
    live, delta = _member(1), _member(2)
    st = _state([live], delta)
    f1, f2 = jax.tree.map(jnp.abs, _member(3)), jax.tree.map(jnp.abs, _member(4))
    st = F.refresh_fisher(st, f1, 0.25)
    assert int(st.fisher_updates) == 1
    for x, y in zip(_leaves64(st.fisher), _leaves64(f1), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-6)
    for x, m, d in zip(_leaves64(st.anchor), _leaves64(live), _leaves64(delta), strict=True):
        np.testing.assert_allclose(x, m + d, rtol=1e-6, atol=1e-6)
    assert st.replay_tokens.shape == (0, 1)  # no replay set given: none kept
    tokens, weights = np.arange(12, dtype=np.int32).reshape(2, 6), np.ones((2, 6), np.float32)
    st = F.refresh_fisher(st, f2, 0.25, tokens, weights)
    assert int(st.fisher_updates) == 2
    for x, a, b in zip(_leaves64(st.fisher), _leaves64(f1), _leaves64(f2), strict=True):
        np.testing.assert_allclose(x, 0.75 * a + 0.25 * b, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(st.replay_tokens, tokens)
    np.testing.assert_array_equal(st.replay_weights, weights)


def test_batches_pad_rows_and_mask_the_padding():
    samples = [(np.arange(1, 5, dtype=np.int32), np.array([0, 1, 1, 0], np.float32), 0.4),
               (np.arange(1, 9, dtype=np.int32), np.ones(8, np.float32), -0.2),
               (np.arange(1, 3, dtype=np.int32), np.array([1, 0], np.float32), 0.1)]
    out = F.batches(samples, 2, order=np.array([2, 0, 1]))
    assert len(out) == 2
    first, last = out
    assert first["tokens"].shape == (2, 4) and last["tokens"].shape == (2, 8)
    np.testing.assert_array_equal(first["tokens"], [[1, 2, 0, 0], [1, 2, 3, 4]])
    np.testing.assert_array_equal(first["weights"], [[1, 0, 0, 0], [0, 1, 1, 0]])
    np.testing.assert_allclose(first["advantage"], [0.1, 0.4])
    np.testing.assert_array_equal(first["mask"], [1, 1])
    np.testing.assert_array_equal(last["tokens"][0], np.arange(1, 9))
    np.testing.assert_array_equal(last["mask"], [1, 0])  # the padding row
    np.testing.assert_array_equal(last["tokens"][1], np.zeros(8))
    assert last["advantage"][1] == 0.0
