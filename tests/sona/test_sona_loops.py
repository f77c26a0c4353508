"""The background loop's trigger and thread, and the deep loop: its loss, its schedule (against optax itself),
the Fisher and anchor it refreshes, and the accumulated-quality trigger."""

from __future__ import annotations

import time

import jax
import numpy as np
import optax
import pytest

from ruvllm_jax.sona import TrainingConfig, TrainingSample
from ruvllm_jax.types import GenerateParams

GREEDY4 = GenerateParams(max_tokens=4, temperature=0.0, repetition_penalty=1.0)


def test_maybe_background_waits_for_enough_samples(make_sona, oracle):
    sona = make_sona(consolidation_strategy="Average", background_interval_ms=0, background_min_samples=3)
    for pair in oracle.PAIRS[:2]:
        sona.instant_adapt(*pair, 0.9)
    assert sona.maybe_background() is None
    assert len(sona.pending) == 2 and sona.counters["background_runs"] == 0
    sona.instant_adapt(*oracle.PAIRS[2], 0.9)
    res = sona.maybe_background()
    assert res is not None and res.applied and res.loop == "background" and res.samples_used == 3
    assert sona.pending == [] and sona.counters["background_runs"] == 1
    assert sona.maybe_background() is None  # nothing pending any more


def test_maybe_background_waits_for_the_interval(make_sona, oracle):
    sona = make_sona(consolidation_strategy="Average", background_interval_ms=10 ** 9, background_min_samples=1)
    for pair in oracle.PAIRS[:3]:
        sona.instant_adapt(*pair, 0.9)
    assert sona.maybe_background() is None
    assert len(sona.pending) == 3 and sona.counters["background_runs"] == 0
    sona.background_consolidate()  # an explicit run is always allowed
    assert sona.counters["background_runs"] == 1


def test_background_thread_consolidates_while_the_model_serves(make_sona, oracle, sona_backend):
    sona = make_sona(consolidation_strategy="Average", background_interval_ms=20, background_min_samples=2)
    sona.generate(oracle.REQUEST, GREEDY4)  # compile generation before the thread starts
    sona.start_background()
    thread = sona._thread
    assert thread is not None and thread.is_alive()
    sona.start_background()  # a second start keeps the one thread
    assert sona._thread is thread
    errors = []
    try:
        for pair in oracle.PAIRS[:3]:
            sona.instant_adapt(*pair, 0.9)
        deadline = time.monotonic() + 10.0
        while sona.counters["background_runs"] < 1 and time.monotonic() < deadline:
            try:  # serving from this thread while the loop consolidates
                assert isinstance(sona.generate(oracle.REQUEST, GREEDY4), str)
                assert isinstance(sona_backend.generate(oracle.PAIRS[1][0], GREEDY4), str)
            except Exception as e:  # noqa: BLE001 - any failure here is the finding
                errors.append(e)
            time.sleep(0.01)
    finally:
        sona.stop_background()
    assert errors == []
    assert sona.counters["background_runs"] >= 1 and len(sona.pending) < 2
    assert not thread.is_alive() and sona._thread is None
    runs = sona.counters["background_runs"]
    for pair in oracle.PAIRS[:3]:
        sona.instant_adapt(*pair, 0.9)
    time.sleep(0.2)
    assert sona.counters["background_runs"] == runs and len(sona.pending) >= 3  # stopped means stopped


def test_deep_loop_trains_on_the_warmup_cosine_schedule_and_refreshes_the_fisher(make_sona, oracle):
    lr, warmup, decay_to = 1e-2, 2, 0.1
    sona = make_sona(deep_trigger_threshold=2.0, training=TrainingConfig(
        learning_rate=lr, warmup_steps=warmup, decay_to=decay_to, batch_size=8, epochs=3, ewc_lambda=50.0,
        kl_lambda=0.0))  # the anchor KL is tested in EwcMerge's test; here it would cost a second big compile
    req, resp = oracle.REQUEST, oracle.RESPONSE
    sona.instant_adapt(*oracle.PAIRS[1], 1.0)
    assert not sona.should_trigger_deep()
    sona.instant_adapt(*oracle.PAIRS[2], 1.0)
    assert sona.should_trigger_deep()  # 2.0 accumulated reaches the threshold
    dataset = [TrainingSample(req, resp, 0.9)] * 16
    start = oracle.np64(jax.tree.map(lambda m, d: m + d, sona.state.members[-1], sona.state.delta))
    lp0 = oracle.logprob(sona.adapters, req, resp)
    reg0 = oracle.regularizer(sona, 50.0, 0.0)  # the EWC penalty on make_sona's Fisher (on oracle.TEXTS)
    assert reg0 > 0
    fisher_before = [np.asarray(f, np.float64) for f in jax.tree.leaves(sona.state.fisher)]
    res = sona.deep_optimize(dataset)
    assert res.applied and res.loop == "deep" and res.samples_used == 16
    hist = sona.last_training_history
    total = 3 * 2  # epochs x batches of 8
    assert [h["step"] for h in hist] == list(range(total))
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, total, lr * decay_to)
    np.testing.assert_allclose([h["lr"] for h in hist], [float(schedule(i)) for i in range(total)], rtol=1e-6,
                               atol=1e-9)
    # The first batch is eight copies of one sample at the starting adapter, plus the EWC penalty there.
    assert hist[0]["loss"] == pytest.approx(-0.4 * lp0 + reg0, rel=1e-5)
    assert hist[-1]["loss"] < hist[0]["loss"] - 0.05
    assert all(np.isfinite(h["grad_norm"]) and h["grad_norm"] > 0 for h in hist)
    lp1 = oracle.logprob(sona.adapters, req, resp)
    assert res.logprob_before == pytest.approx(lp0, abs=1e-5) and res.logprob_after == pytest.approx(lp1, abs=1e-5)
    assert lp1 > lp0
    # The merged instant delta was the starting point; the trained member is live, the delta is cleared.
    assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(sona.state.delta))
    assert any(np.abs(a - b).max() > 0 for a, b in zip(_leaves(sona.state.members[-1]), jax.tree.leaves(start),
                                                        strict=True))
    # Fisher and anchor refreshed at the new adapter: EWC++'s EMA (decay 0.5) with the dataset's (∇ Σ_t log p)² / T.
    assert int(sona.state.fisher_updates) == 2
    for a, m in zip(jax.tree.leaves(sona.state.anchor), jax.tree.leaves(sona.state.members[-1]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(m))
    g, n = oracle.grad_sum(sona.state.members[-1], float(sona.state.scaling), req, resp)
    for f, gs, old in zip(jax.tree.leaves(sona.state.fisher), jax.tree.leaves(g), fisher_before, strict=True):
        want = 0.5 * old + 0.5 * np.asarray(gs, np.float64) ** 2 / n
        np.testing.assert_allclose(np.asarray(f, np.float64), want, rtol=1e-3, atol=1e-4 * want.max())
    prompt, r = oracle.ids(req, resp)  # the dataset is the replay set of the anchor KL now
    replay = np.asarray(sona.state.replay_tokens)
    assert replay.shape[0] == 16 and all(row[:len(prompt) + len(r)].tolist() == prompt + r for row in replay)
    assert sona.pending == [] and not sona.should_trigger_deep()
    st = sona.stats()
    assert (st.deep_runs, st.accumulated_quality, st.pending_samples) == (1, 0.0, 0)


def _leaves(tree):
    return [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]
