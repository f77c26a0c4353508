"""The instant loop on the real model: the rating's direction, the measured log-prob change, the layers the
gradient reaches, the recorded update, the SGD step against jax.grad, and the pending-sample bound."""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest


def _leaves64(tree):
    return [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]


@pytest.mark.parametrize("quality", [0.9, 0.1])
def test_rating_moves_the_response_log_prob_its_way_by_the_measured_amount(make_sona, oracle, quality):
    sona = make_sona(instant_lr=0.1)
    req, resp = oracle.REQUEST, oracle.RESPONSE
    before = oracle.logprob(sona.adapters, req, resp)
    res = sona.instant_adapt(req, resp, quality)
    after = oracle.logprob(sona.adapters, req, resp)
    assert res.applied and res.loop == "instant" and res.samples_used == 1 and res.latency_us > 0
    if quality > 0.5:
        assert after > before + 1e-4
    else:
        assert after < before - 1e-4
    assert res.logprob_before == pytest.approx(before, abs=1e-5)
    assert res.logprob_after == pytest.approx(after, abs=1e-5)
    assert res.quality_delta == pytest.approx(after - before, abs=1e-5)


def test_neutral_rating_teaches_nothing(make_sona, oracle):
    sona = make_sona(instant_lr=0.1)
    sona.instant_adapt(oracle.REQUEST, oracle.RESPONSE, 0.9)  # a non-trivial start
    ads = [np.array(x) for x in jax.tree.leaves(sona.adapters)]
    res = sona.instant_adapt(*oracle.PAIRS[1], 0.5)
    assert not res.applied and res.quality_delta == 0.0
    for x, y in zip(ads, jax.tree.leaves(sona.adapters), strict=True):
        np.testing.assert_array_equal(x, np.asarray(y))
    assert all(np.all(np.asarray(u) == 0) for u in jax.tree.leaves(sona.pending[-1].update))
    assert sona.pending[-1].advantage == 0.0 and sona.counters["instant_updates"] == 2


def test_a_stream_of_good_ratings_keeps_improving_at_every_step(make_sona, oracle):
    sona = make_sona(instant_lr=0.1)
    req, resp = oracle.REQUEST, oracle.RESPONSE
    start = prev = oracle.logprob(sona.adapters, req, resp)
    for step in range(30):
        res = sona.instant_adapt(req, resp, 0.9)
        assert res.applied and res.quality_delta > 0, step
        assert res.logprob_after > prev, step
        prev = res.logprob_after
    assert oracle.logprob(sona.adapters, req, resp) == pytest.approx(prev, abs=1e-5)
    assert prev > start + 0.05  # thirty steps add up; a baseline converging to 0.9 would have stopped them
    st = sona.stats()
    assert (st.instant_updates, st.samples_seen, st.pending_samples) == (30, 30, 30)
    assert st.accumulated_quality == pytest.approx(27.0)
    assert st.instant_norm == pytest.approx(np.sqrt(sum(np.sum(x ** 2) for x in _leaves64(sona.state.delta))), rel=1e-5)
    assert st.consolidated_norm == pytest.approx(
        np.sqrt(sum(np.sum(x ** 2) for x in _leaves64(sona.state.members[-1]))), rel=1e-5)
    assert st.fisher_mass == pytest.approx(sum(np.sum(f) for f in _leaves64(sona.state.fisher)), rel=1e-5)
    assert st.fisher_mass > 0 and st.ensemble_members == 1 and st.strategy == "EwcMerge"


def test_instant_layers_limits_the_gradient_to_the_last_layers(make_sona, oracle, sona_backend):
    sona = make_sona(instant_lr=0.1, instant_layers=1)
    req, resp = oracle.REQUEST, oracle.RESPONSE
    full = oracle.logprob(sona.adapters, req, resp)
    for _ in range(2):
        res = sona.instant_adapt(req, resp, 0.9)
        assert res.logprob_before == pytest.approx(full, abs=1e-5)  # measured through all four layers
        full = oracle.logprob(sona.adapters, req, resp)
        assert res.logprob_after == pytest.approx(full, abs=1e-5)
    layers = sona.state.delta["layers"]
    last = sona_backend.config.num_layers - 1
    for i, layer in enumerate(layers):
        for m in layer.values():
            moved = np.abs(np.asarray(m["B"])).max()
            if i == last:
                assert moved > 0
            else:
                assert np.all(np.asarray(m["A"]) == 0) and np.all(np.asarray(m["B"]) == 0), i
    assert res.quality_delta > 0


def test_pending_update_is_the_change_of_the_delta(make_sona, oracle):
    sona = make_sona(instant_lr=0.1)
    sona.instant_adapt(oracle.REQUEST, oracle.RESPONSE, 0.9)
    first = _leaves64(sona.state.delta)
    for d, u in zip(first, _leaves64(sona.pending[0].update), strict=True):
        np.testing.assert_array_equal(d, u)  # from a zero delta
    sona.instant_adapt(*oracle.PAIRS[1], 0.2)
    second = _leaves64(sona.state.delta)
    for d1, d2, u in zip(first, second, _leaves64(sona.pending[-1].update), strict=True):
        np.testing.assert_allclose(d2 - d1, u, rtol=0, atol=1e-6 * max(np.abs(d2).max(), 1e-30))
    assert any(np.abs(u).max() > 0 for u in _leaves64(sona.pending[-1].update))


def test_sgd_update_is_lr_times_advantage_times_the_gradient_of_the_mean_log_prob(make_sona, oracle):
    lr = 0.1
    sona = make_sona(instant_lr=lr)
    sona.instant_adapt(*oracle.PAIRS[1], 1.0)  # B != 0 now, so the gradient reaches A too
    req, resp = oracle.REQUEST, oracle.RESPONSE
    live = jax.tree.map(lambda m, d: m + d, sona.state.members[-1], sona.state.delta)
    g, n = oracle.grad_sum(live, float(sona.state.scaling), req, resp)
    sona.instant_adapt(req, resp, 0.8)
    adv = 0.8 - 0.5
    got = jax.tree.leaves(sona.pending[-1].update)
    for u, gs in zip(got, jax.tree.leaves(g), strict=True):
        want = -lr * (-adv) * np.asarray(gs, np.float64) / n
        scale = np.abs(want).max()
        assert scale > 0
        np.testing.assert_allclose(np.asarray(u, np.float64), want, rtol=1e-5, atol=1e-5 * scale)


def test_adam_instant_step_follows_optax_adam_on_the_negated_objective(make_sona, oracle):
    lr = 0.01
    sona = make_sona(instant_lr=lr, instant_optimizer="adam")
    req, resp = oracle.REQUEST, oracle.RESPONSE
    opt = optax.scale_by_adam()
    opt_state = opt.init(sona.state.delta)
    for quality in (0.9, 0.3):
        live = jax.tree.map(lambda m, d: m + d, sona.state.members[-1], sona.state.delta)
        g, n = oracle.grad_sum(live, float(sona.state.scaling), req, resp)
        loss_grad = jax.tree.map(lambda x, q=quality, n=n: -(q - 0.5) * x / n, g)
        direction, opt_state = opt.update(loss_grad, opt_state)
        sona.instant_adapt(req, resp, quality)
        assert max(np.abs(np.asarray(u)).max() for u in jax.tree.leaves(sona.pending[-1].update)) > 0
        for u, dr in zip(jax.tree.leaves(sona.pending[-1].update), jax.tree.leaves(direction), strict=True):
            want, u = -lr * np.asarray(dr, np.float64), np.asarray(u, np.float64)
            scale = np.abs(want).max()  # 0 for A at the first step (B = 0)
            # Adam divides by |g| + eps: where g is ~eps the float32 gradients' last bits show, hence the
            # looser bound on single entries and the tight one on the mean.
            np.testing.assert_allclose(u, want, rtol=1e-3, atol=1e-2 * scale)
            assert np.mean(np.abs(u - want)) <= 1e-4 * scale


def test_pending_keeps_the_latest_samples_and_counts_the_dropped(make_sona, oracle):
    sona = make_sona(max_pending_samples=3)
    qualities = [0.9, 0.8, 0.3, 0.7, 0.6]
    for (req, resp), q in zip(oracle.PAIRS[:5], qualities, strict=True):
        sona.instant_adapt(req, resp, q)
    assert len(sona.pending) == 3
    for p, (req, resp), q in zip(sona.pending, oracle.PAIRS[2:5], qualities[2:], strict=True):
        prompt, r = oracle.ids(req, resp)
        n = len(prompt) + len(r)
        np.testing.assert_array_equal(p.tokens[:n], prompt + r)
        assert np.all(p.tokens[n:] == 0)
        assert np.flatnonzero(p.weights).tolist() == list(range(len(prompt) - 1, n - 1))
        assert p.quality == q and p.advantage == pytest.approx(q - 0.5)
    st = sona.stats()
    assert (st.dropped_samples, st.pending_samples, st.instant_updates, st.samples_seen) == (2, 3, 5, 5)
