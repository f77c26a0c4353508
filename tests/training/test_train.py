"""The train step learns, is deterministic, jits once, and resumes from orbax bit-identically."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

from ruvllm_jax.models.config import LlamaConfig
from ruvllm_jax.training import data, train

CFG = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=8, max_position_embeddings=64)
OC = train.OptimConfig(peak_lr=1e-2, warmup_steps=5, total_steps=40)
LC = train.LoopConfig(seed=1, batch_size=4, seq_len=32, steps=40, log_every=5, eval_every=20, eval_windows=4,
                      checkpoint_every=10, progress=False, short_seq_len=16, short_fraction=0.25)


@pytest.fixture(scope="module")
def corpus():
    """Characters of real text as token ids (a learnable stream)."""
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    text = data.read_text(os.path.join(repo, "data", "tinyshakespeare.txt"))[:20_000]
    ids = np.frombuffer(text.encode("ascii", "replace"), np.uint8).astype(np.int32) % CFG.vocab_size
    return ids[:18_000], ids[18_000:]


def _leaves(state):
    return [np.asarray(x) for x in jax.tree.leaves(state.as_dict())]


def _assert_same(a, b):
    la, lb = _leaves(a), _leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb, strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def full_run(corpus):
    return train.train(CFG, OC, LC, *corpus)


def test_loss_goes_down(full_run):
    _, hist = full_run
    assert hist[-1]["train_loss"] < hist[0]["train_loss"] - 0.5
    assert hist[-1]["val_loss"] < np.log(CFG.vocab_size) - 0.5
    assert [h["step"] for h in hist] == list(range(5, 41, 5))


def test_same_seed_same_state_other_seed_differs(corpus, full_run):
    again, _ = train.train(CFG, OC, LC, *corpus)
    _assert_same(again, full_run[0])
    first5 = train.LoopConfig(**{**LC.__dict__, "stop_after": 5})
    a, _ = train.train(CFG, OC, first5, *corpus)
    b, _ = train.train(CFG, OC, train.LoopConfig(**{**first5.__dict__, "seed": 2}), *corpus)
    assert not np.array_equal(np.asarray(a.params["embed"]), np.asarray(b.params["embed"]))


def test_interrupted_run_resumes_to_the_identical_state(corpus, full_run, tmp_path):
    stopped = train.LoopConfig(**{**LC.__dict__, "stop_after": 15})
    half, _ = train.train(CFG, OC, stopped, *corpus, workdir=str(tmp_path))
    assert int(half.step) == 15
    assert sorted(os.listdir(tmp_path / "checkpoints"))[-1] == "15"
    resumed, hist = train.train(CFG, OC, LC, *corpus, workdir=str(tmp_path))
    assert int(resumed.step) == 40
    _assert_same(resumed, full_run[0])
    assert [h["train_loss"] for h in hist] == [h["train_loss"] for h in full_run[1]]
    assert json.load(open(tmp_path / "loss_curve.json")) == hist


def test_train_step_compiles_once_per_batch_shape(corpus):
    opt = train.make_optimizer(OC)
    step = train.make_train_step(CFG, opt)
    state = train.init_train_state(CFG, opt, 0)
    for i in range(3):
        batch = data.sample_windows(corpus[0], seed=0, step=i, batch_size=2, window=17)
        state, metrics = step(state, batch)
    assert step._cache_size() == 1
    assert int(state.step) == 3 and np.isfinite(float(metrics["loss"]))


def test_schedule_warms_up_then_decays_to_the_floor():
    s = train.lr_schedule(OC)
    assert float(s(0)) == 0.0
    np.testing.assert_allclose(float(s(OC.warmup_steps)), OC.peak_lr, rtol=1e-6)
    np.testing.assert_allclose(float(s(OC.total_steps)), OC.peak_lr * OC.end_lr_fraction, rtol=1e-5)


def test_curriculum_keeps_tokens_per_step():
    assert LC.batch_shape(0) == (8, 16)
    assert LC.batch_shape(9) == (8, 16)
    assert LC.batch_shape(10) == (4, 32)
