"""Each consolidation strategy does what its name says, checked against the recorded per-sample updates in
float64 numpy; the Ensemble's served output is the members' mean; EwcMerge's penalty holds the anchor."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from ruvllm_jax.sona import ConsolidationStrategy

QUALITIES = [0.9, 0.7, 0.2, 0.95]


def _leaves64(tree):
    return [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]


def _adapt_all(sona, oracle, qualities=QUALITIES):
    pairs = oracle.PAIRS[:len(qualities)]
    for (req, resp), q in zip(pairs, qualities, strict=True):
        sona.instant_adapt(req, resp, q)
    return pairs


def _check_cleared(sona, res, n):
    assert res.applied and res.loop == "background" and res.samples_used == n
    assert sona.pending == [] and sona.counters["background_runs"] >= 1
    assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(sona.state.delta))


@pytest.mark.parametrize("strategy, weights", [
    ("Average", np.full(4, 0.25)),
    ("QualityWeighted", np.array(QUALITIES) / np.sum(QUALITIES)),
    ("BestOnly", np.array([0.0, 0.0, 0.0, 1.0])),  # 0.95 is the best rating
])
def test_merging_strategy_adds_its_combination_of_the_updates(make_sona, oracle, strategy, weights):
    sona = make_sona(instant_lr=0.1, consolidation_strategy=strategy)
    sona.instant_adapt(*oracle.PAIRS[5], 1.0)  # a first round: the member is no longer the initial one
    sona.background_consolidate()
    prev = _leaves64(sona.state.members[-1])
    pairs = _adapt_all(sona, oracle)
    updates = [_leaves64(p.update) for p in sona.pending]
    assert [p.quality for p in sona.pending] == QUALITIES
    res = sona.background_consolidate()
    _check_cleared(sona, res, 4)
    assert res.message == strategy and len(sona.state.members) == 1
    for j, got in enumerate(_leaves64(sona.state.members[-1])):
        want = prev[j] + sum(w * u[j] for w, u in zip(weights, updates, strict=True))
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    assert res.logprob_after == pytest.approx(oracle.mean_logprob(sona.adapters, pairs), abs=1e-5)
    assert sona.counters["background_runs"] == 2


def test_background_with_nothing_pending_does_nothing(make_sona):
    sona = make_sona(consolidation_strategy="Average")
    before = [np.array(x) for x in jax.tree.leaves(sona.state)]
    res = sona.background_consolidate()
    assert not res.applied and res.samples_used == 0 and sona.counters["background_runs"] == 0
    for x, y in zip(before, jax.tree.leaves(sona.state), strict=True):
        np.testing.assert_array_equal(x, y)


def _member_out(x, member, layer, key, scaling):
    m = member["layers"][layer][key]
    return scaling * (x @ np.asarray(m["A"], np.float64)) @ np.asarray(m["B"], np.float64)


def test_ensemble_grows_to_its_size_drops_the_oldest_and_serves_the_members_mean(make_sona, oracle, hf_base,
                                                                                   tmp_path):
    sona = make_sona(instant_lr=1.0, consolidation_strategy=ConsolidationStrategy.Ensemble, ensemble_size=2)
    initial = _leaves64(sona.state.members[0])
    # Round 1: the first consolidation replaces the untrained initial member (no member is kept for it).
    _adapt_all(sona, oracle, [0.9, 0.8])
    ups = [_leaves64(p.update) for p in sona.pending]
    _check_cleared(sona, sona.background_consolidate(), 2)
    assert len(sona.state.members) == 1
    for j, got in enumerate(_leaves64(sona.state.members[0])):
        np.testing.assert_allclose(got, initial[j] + (ups[0][j] + ups[1][j]) / 2, rtol=0, atol=1e-6)
    m1 = _leaves64(sona.state.members[0])
    # Round 2: a new member = the live one + the mean update.
    _adapt_all(sona, oracle, [0.3])
    u = _leaves64(sona.pending[0].update)
    _check_cleared(sona, sona.background_consolidate(), 1)
    assert len(sona.state.members) == 2
    for j, (old, new) in enumerate(zip(_leaves64(sona.state.members[0]), _leaves64(sona.state.members[1]),
                                       strict=True)):
        np.testing.assert_array_equal(old, m1[j])
        np.testing.assert_allclose(new, m1[j] + u[j], rtol=0, atol=1e-6)
    m2 = _leaves64(sona.state.members[1])
    # Round 3: beyond ensemble_size the oldest member goes.
    _adapt_all(sona, oracle, [1.0, 0.9])
    ups = [_leaves64(p.update) for p in sona.pending]
    _check_cleared(sona, sona.background_consolidate(), 2)
    assert len(sona.state.members) == 2 and sona.stats().ensemble_members == 2
    for j, (old, new) in enumerate(zip(_leaves64(sona.state.members[0]), _leaves64(sona.state.members[1]),
                                       strict=True)):
        np.testing.assert_array_equal(old, m2[j])
        np.testing.assert_allclose(new, m2[j] + (ups[0][j] + ups[1][j]) / 2, rtol=0, atol=1e-6)
    # The served adapter: the mean of the members' own LoRA outputs, the live one with the instant delta.
    sona.instant_adapt(*oracle.PAIRS[4], 0.9)
    members = [oracle.np64(m) for m in sona.state.members]
    delta = oracle.np64(sona.state.delta)
    members[-1] = jax.tree.map(lambda a, b: a + b, members[-1], delta)
    scaling = float(sona.state.scaling)
    x = np.random.default_rng(0).normal(size=(3, 256))
    for layer in (0, 3):
        for key, name in (("q", "q_proj"), ("v", "v_proj")):
            want = np.mean([_member_out(x, m, layer, key, scaling) for m in members], axis=0)
            assert np.abs(want).max() > 1e-5
            got = np.asarray(sona.forward(x, name, layer=layer), np.float64)
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
            one = np.asarray(sona.forward(x[1], name, layer=layer), np.float64)  # a single vector
            np.testing.assert_allclose(one, want[1], rtol=1e-4, atol=1e-5 * np.abs(want).max())
    # Exported, the 2 members of rank 2 are one PEFT adapter of rank 4 that gives the served logits (here,
    # not in test_sona_peft, so that the 2-member shapes compile once).
    oracle.check_peft_export(sona, hf_base, str(tmp_path / "ensemble"), rank=4)


def _ewc_run(make_sona, oracle, ewc_lambda, kl_lambda):
    from ruvllm_jax.sona import TrainingConfig

    sona = make_sona(instant_lr=0.3, background_lr=1e-3, background_epochs=3,
                     training=TrainingConfig(ewc_lambda=ewc_lambda, kl_lambda=kl_lambda))
    # make_sona estimated the Fisher on oracle.TEXTS: anchored at the initial member, the texts to replay
    replay = [("\n", t) for t in oracle.TEXTS]  # each text is a response to fisher_prompt
    assert sona.state.replay_tokens.shape[0] == 2 and int(sona.state.fisher_updates) == 1
    pairs = _adapt_all(sona, oracle)
    anchor_ads = oracle.member_adapters(sona.state.anchor, float(sona.state.scaling))
    adv = np.array(QUALITIES) - 0.5
    lps = np.array([oracle.logprob(sona.adapters, r, s) for r, s in pairs])
    reg = oracle.regularizer(sona, ewc_lambda, kl_lambda)
    kl0 = oracle.kl(anchor_ads, sona.adapters, replay)
    res = sona.background_consolidate()
    _check_cleared(sona, res, 4)
    assert res.message == "EwcMerge" and len(sona.last_training_history) == 3  # 3 epochs of one batch
    # The first step's loss at the merged instant adapter: -mean(adv * log p) + EWC penalty + λ_KL · KL.
    want = -np.mean(adv * lps) + reg
    assert sona.last_training_history[0]["loss"] == pytest.approx(want, rel=1e-4, abs=1e-6)
    assert all(h["lr"] == pytest.approx(1e-3) for h in sona.last_training_history)
    fisher, anchor = _leaves64(sona.state.fisher), _leaves64(sona.state.anchor)
    dist = sum(np.sum(f * (t - a) ** 2) for f, t, a in zip(fisher, _leaves64(sona.state.members[-1]), anchor,
                                                           strict=True))
    return fisher + anchor, dist, oracle.kl(anchor_ads, sona.adapters, replay), kl0


# kl_lambda 1e-9 is off in effect, but keeps the one compiled step (with replay rows) of the KL run.
def test_ewc_merge_with_a_large_lambda_stays_closer_to_the_anchor(make_sona, oracle):
    reg0, d_free, kl_free, kl0 = _ewc_run(make_sona, oracle, 0.0, 1e-9)
    reg1, d_held, _, _ = _ewc_run(make_sona, oracle, 1e5, 1e-9)
    for x, y in zip(reg0, reg1, strict=True):  # same seed, same samples: same Fisher and anchor
        np.testing.assert_array_equal(x, y)
    assert sum(np.sum(f) for f in reg0[:len(reg0) // 2]) > 0 and kl0 > 0
    assert d_held < 0.9 * d_free, (d_held, d_free)
    # the anchor KL does the same in function space: KL(anchor ‖ θ) on the replayed texts stays smaller
    _, _, kl_held, _ = _ewc_run(make_sona, oracle, 0.0, 1e3)
    assert kl_held < 0.9 * kl_free, (kl_held, kl_free)


def test_with_fisher_samples_the_model_is_sampled_before_the_first_change(make_sona, oracle):
    sona = make_sona(fisher=False, fisher_samples=2, fisher_sample_tokens=12, instant_lr=0.1,
                     consolidation_strategy="Average")
    initial = _leaves64(sona.state.members[-1])
    sona.instant_adapt(*oracle.PAIRS[0], 0.9)
    assert int(sona.state.fisher_updates) == 1 and sona.stats().fisher_mass > 0
    for a, m in zip(_leaves64(sona.state.anchor), initial, strict=True):  # what the untouched model knows
        np.testing.assert_array_equal(a, m)
    prompt = oracle.tok.encode("\n")
    tokens, weights = np.asarray(sona.state.replay_tokens), np.asarray(sona.state.replay_weights)
    assert tokens.shape[0] == 2
    for row, w in zip(tokens, weights, strict=True):  # fisher_prompt, then up to 12 sampled tokens scored
        assert row[:len(prompt)].tolist() == prompt
        assert 1 <= w.sum() <= 12 and np.flatnonzero(w)[0] == len(prompt) - 1
    sona.instant_adapt(*oracle.PAIRS[1], 0.6)
    _check_cleared(sona, sona.background_consolidate(), 2)
    assert int(sona.state.fisher_updates) == 1  # estimated once, not at every change
