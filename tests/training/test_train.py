"""The train step learns, is deterministic, jits once, and resumes from orbax bit-identically; the
optimizer is clip-by-global-norm then AdamW with decay on matrices only, checked against NumPy."""

from __future__ import annotations

import dataclasses
import json
import math
import os

import jax
import numpy as np
import optax
import pytest

from ruvllm_jax.errors import ConfigError, RuvLLMError
from ruvllm_jax.models import llama
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


# --- the optimizer against NumPy float64 --------------------------------------------------------

TINY_OC = train.OptimConfig(peak_lr=0.1, end_lr_fraction=0.2, warmup_steps=1, total_steps=3, b1=0.8, b2=0.9,
                            weight_decay=0.5, grad_clip=1.0)


def _np_lr(oc, t):
    """Linear warmup from 0 to peak over warmup_steps, then cosine to end_lr_fraction·peak at total_steps."""
    if t < oc.warmup_steps:
        return oc.peak_lr * t / oc.warmup_steps
    end = oc.peak_lr * oc.end_lr_fraction
    frac = min(1.0, (t - oc.warmup_steps) / (oc.total_steps - oc.warmup_steps))
    return end + (oc.peak_lr - end) * 0.5 * (1 + math.cos(math.pi * frac))


def _np_adamw(params, grads_seq, oc, *, clip=True, decay_all=False):
    """Clip the global norm to grad_clip, then AdamW (eps 1e-8) with decay on ndim >= 2 leaves."""
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v2 = {k: np.zeros_like(v) for k, v in p.items()}
    for t, grads in enumerate(grads_seq):
        g = {k: np.asarray(x, np.float64) for k, x in grads.items()}
        norm = math.sqrt(sum(float(np.sum(x * x)) for x in g.values()))
        if clip and norm > oc.grad_clip:
            g = {k: x * oc.grad_clip / norm for k, x in g.items()}
        for k in p:
            m[k] = oc.b1 * m[k] + (1 - oc.b1) * g[k]
            v2[k] = oc.b2 * v2[k] + (1 - oc.b2) * g[k] ** 2
            direction = (m[k] / (1 - oc.b1 ** (t + 1))) / (np.sqrt(v2[k] / (1 - oc.b2 ** (t + 1))) + 1e-8)
            decay = oc.weight_decay * p[k] if (p[k].ndim >= 2 or decay_all) else 0.0
            p[k] = p[k] - _np_lr(oc, t) * (direction + decay)
    return p


def _run(opt, params, grads_seq):
    state = opt.init(params)
    for g in grads_seq:
        updates, state = opt.update(g, state, params)
        params = optax.apply_updates(params, updates)
    return params, state


def test_optimizer_is_clipped_adamw_with_decay_on_matrices_only():
    rng = np.random.default_rng(0)
    params = {"w": rng.normal(size=(3, 4)), "norm": 1 + rng.normal(size=4), "b": rng.normal(size=3)}
    params = {k: v.astype(np.float32) for k, v in params.items()}
    grads = [{k: (scale * rng.normal(size=v.shape)).astype(np.float32) for k, v in params.items()}
             for scale in (1e4, 0.05, 3.0)]  # clipped, not clipped, clipped
    got, _ = _run(train.make_optimizer(TINY_OC), params, grads)
    want = _np_adamw(params, grads, TINY_OC)
    for k in params:
        np.testing.assert_allclose(np.asarray(got[k]), want[k], rtol=1e-5, atol=1e-6, err_msg=k)
    # the reference has the power to tell: decaying vectors too, or not clipping, is far off
    for other in (_np_adamw(params, grads, TINY_OC, decay_all=True), _np_adamw(params, grads, TINY_OC, clip=False)):
        assert max(np.max(np.abs(np.asarray(got[k]) - other[k])) for k in params) > 1e-3


def test_a_huge_gradient_is_clipped_to_the_configured_global_norm():
    params = {"w": np.ones((2, 3), np.float32), "b": np.ones(3, np.float32)}
    for clip in (1.0, 0.25):
        oc = train.OptimConfig(**{**TINY_OC.__dict__, "grad_clip": clip})
        huge = {"w": np.full((2, 3), 1e6, np.float32), "b": np.arange(3, dtype=np.float32) * 1e6}
        _, state = _run(train.make_optimizer(oc), params, [huge])
        mu = optax.tree_utils.tree_get(state, "mu")  # (1 - b1) · the clipped gradient
        clipped = {k: np.asarray(x, np.float64) / (1 - oc.b1) for k, x in mu.items()}
        norm = math.sqrt(sum(float(np.sum(x * x)) for x in clipped.values()))
        np.testing.assert_allclose(norm, clip, rtol=1e-5)
        total = math.sqrt(sum(float(np.sum(np.float64(x) ** 2)) for x in huge.values()))
        for k in huge:  # same direction: scaled by clip / ||g||
            np.testing.assert_allclose(clipped[k], huge[k] * clip / total, rtol=1e-5, atol=1e-9)
        small = {k: np.full_like(v, 1e-3) for k, v in params.items()}
        _, state = _run(train.make_optimizer(oc), params, [small])
        for k, x in optax.tree_utils.tree_get(state, "mu").items():  # under the norm: untouched
            np.testing.assert_allclose(np.asarray(x) / (1 - oc.b1), small[k], rtol=1e-5)


def test_on_the_llama_tree_norms_and_biases_get_no_decay_and_every_matrix_does():
    cfg = dataclasses.replace(CFG, attention_bias=True)
    params = llama.init_params(cfg, jax.random.PRNGKey(0))
    keys = iter(jax.random.split(jax.random.PRNGKey(1), 64))
    params = jax.tree.map(lambda p: p + jax.random.normal(next(keys), p.shape), params)  # biases non-zero too
    zeros = jax.tree.map(np.zeros_like, params)
    got, _ = _run(train.make_optimizer(TINY_OC), params, [zeros, zeros])  # no gradient: only the decay moves
    lr1 = _np_lr(TINY_OC, 1)  # step 0 has lr 0 (warmup)
    paths = jax.tree_util.tree_flatten_with_path(params)[0]
    kinds = set()
    for (path, p), q in zip(paths, jax.tree.leaves(got), strict=True):
        name = jax.tree_util.keystr(path)
        p, q = np.asarray(p, np.float64), np.asarray(q, np.float64)
        want = p * (1 - lr1 * TINY_OC.weight_decay) if p.ndim >= 2 else p
        np.testing.assert_allclose(q, want, rtol=1e-6, err_msg=name)
        kinds.add((name.split("'")[-2], p.ndim))
    assert {("attn_norm", 1), ("bqkv", 1), ("final_norm", 1), ("wqkv", 2), ("embed", 2)} <= kinds


@pytest.mark.parametrize("field, value, match", [
    ("peak_lr", -1e-3, "peak_lr must be a finite number >= 0, got -0.001"),
    ("peak_lr", float("nan"), "peak_lr must be a finite number >= 0, got nan"),
    ("weight_decay", -0.1, "weight_decay must be a finite number >= 0, got -0.1"),
    ("grad_clip", 0.0, "grad_clip must be a finite number > 0, got 0.0"),
    ("b2", 1.0, r"b2 must be in \[0, 1\), got 1.0"),
    ("warmup_steps", -5, "warmup_steps must be an integer >= 0, got -5"),
    ("total_steps", 2.5, "total_steps must be an integer >= 0, got 2.5"),
], ids=["negative_lr", "nan_lr", "negative_decay", "zero_clip", "b2_one", "negative_warmup", "fractional_steps"])
def test_bad_optim_config_raises_config_error_naming_the_value(field, value, match):
    with pytest.raises(ConfigError, match=match) as e:
        train.OptimConfig(**{field: value})
    assert isinstance(e.value, RuvLLMError)
    train.OptimConfig(**{field: getattr(TINY_OC, field)})  # the same field with a good value is fine
