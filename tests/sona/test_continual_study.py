"""The continual-learning study's pieces run and measure what they say: its data (passages that
re-tokenize exactly, held-out text disjoint from them), the equal-gain interpolation, and one SONA
row on a few passages (a short stream, so the suite stays fast; the full study is the experiment)."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "experiments"))

import continual_data as cd  # noqa: E402
import sona_continual as study  # noqa: E402

from ruvllm_jax.assets import DEFAULT_MODEL_PATH  # noqa: E402
from ruvllm_jax.training import bpe  # noqa: E402


@pytest.fixture(scope="module")
def tok():
    return bpe.load_tokenizer(DEFAULT_MODEL_PATH)


@pytest.mark.parametrize("domain", ["alice", "milton"])
def test_passages_round_trip_and_are_not_held_out(tok, domain):
    ps = cd.passages(domain, tok, 12, request_tokens=16, response_tokens=24, seed=0)
    assert len(ps) == 12
    for p in ps:
        assert (len(p.request_ids), len(p.response_ids)) == (16, 24)
        assert list(bpe.encode(tok, p.request + p.response)) == p.request_ids + p.response_ids
    train, held = cd.parts(domain)
    assert all(p.request + p.response in train for p in ps)
    assert not any(p.response in held for p in ps)
    assert "\r" not in train + held  # cleaned: the model is not taught line endings


def test_heldout_ids_are_a_fixed_prefix(tok):
    a = cd.heldout_ids(cd.SHAKESPEARE, tok, 300)
    b = cd.heldout_ids(cd.SHAKESPEARE, tok, 500)
    np.testing.assert_array_equal(a, b[:300])


def test_forgetting_at_gain_interpolates_between_the_runs_around_it():
    rows = [{"gain_pct": 10.0, "forgetting_pct": 1.0}, {"gain_pct": 30.0, "forgetting_pct": 5.0},
            {"gain_pct": 50.0, "forgetting_pct": 20.0}]
    assert study.forgetting_at_gain(rows, 20.0) == pytest.approx(3.0)
    assert study.forgetting_at_gain(rows, 40.0) == pytest.approx(12.5)
    assert study.forgetting_at_gain(rows, 60.0) is None


def test_a_sona_row_learns_the_new_domain(tok):
    from ml_collections import ConfigDict

    from ruvllm_jax import JaxBackend

    backend = JaxBackend()
    backend.load_model()
    ps = cd.passages("alice", tok, 8, request_tokens=16, response_tokens=48, seed=0)
    evals = {"alice": cd.heldout_ids("alice", tok, 512), cd.SHAKESPEARE: cd.heldout_ids(cd.SHAKESPEARE, tok, 512)}
    s = study.Study(backend.params, backend.config, "alice", ps, evals)
    c = ConfigDict({"seed": 0, "sona": {
        "instant_optimizer": "adam", "instant_lr": 1e-2, "background_min_samples": 4, "background_lr": 3e-3,
        "background_epochs": 1, "batch_size": 2, "deep_trigger_threshold": 1e9, "deep_lr": 3e-3, "deep_warmup": 1,
        "deep_decay_to": 0.1, "deep_epochs": 1, "ewc_lambda": 0.0, "kl_lambda": 0.0, "replay_batch": 2,
        "fisher_samples": 0, "fisher_sample_tokens": 16}})
    # Average merges without a training step (the deep and EwcMerge steps are tested in test_sona_loops)
    row = s.run_method("sona instant + background Average", study.sona_stream(
        backend, study._sona_config(c, consolidation_strategy="Average"), background=True, deep=False))
    assert row["new_ppl_after"] < row["new_ppl_before"]
    assert row["gain_pct"] == pytest.approx(100 * (1 - row["new_ppl_after"] / row["new_ppl_before"]))
    # the row's own numbers agree with a fresh evaluation of the base model
    assert row["new_ppl_before"] == pytest.approx(cd.perplexity(backend.params, backend.config, evals["alice"]),
                                                  rel=1e-5)
