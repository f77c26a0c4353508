"""EWC++ against its formulas in NumPy float64: the penalty λ/2·Σ F·(θ − θ*)², its gradient
λ·F·(θ − θ*) (also jax.grad of the penalty), the step that adds it, the Fisher EMA, bad λ / lr."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ruvllm_jax.errors import AdapterError, RuvLLMError
from ruvllm_jax.lora import AdaptFeedback, MicroLoRA, MicroLoraConfig, TargetModule, ewc, functional

DIMS = {"q": (4, 3), "v": (4, 5)}


def _module_tree(rng, shift=0.0, positive=False):
    """{"layers": ({"A": [4, 2], "B": [2, 3]}, x2)}: one module ("q") over two layers, float32."""
    draw = (lambda s: np.abs(rng.normal(size=s))) if positive else (lambda s: rng.normal(size=s) + shift)
    return {"layers": tuple({"A": draw((4, 2)).astype(np.float32), "B": draw((2, 3)).astype(np.float32)}
                            for _ in range(2))}


def _ewc_state(rng):
    return ewc.EwcState(fisher=_module_tree(rng, positive=True), anchor=_module_tree(rng), fisher_updates=jnp.int32(1))


def _f64(tree):
    return [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]


def test_penalty_and_its_gradient_are_the_ewc_formulas():
    rng = np.random.default_rng(0)
    state, theta, lam = _ewc_state(rng), _module_tree(rng, shift=0.5), 3.5
    f, anchor, th = _f64(state.fisher), _f64(state.anchor), _f64(theta)
    want_grad = [lam * fi * (t - a) for fi, t, a in zip(f, th, anchor, strict=True)]
    want_pen = 0.5 * lam * sum(float(np.sum(fi * (t - a) ** 2)) for fi, t, a in zip(f, th, anchor, strict=True))
    got = ewc.penalty_grad(state, theta, lam)
    assert jax.tree.structure(got) == jax.tree.structure(theta)
    for g, w in zip(_f64(got), want_grad, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(float(ewc.penalty(state, theta, lam)), want_pen, rtol=1e-5)
    auto = jax.grad(lambda p: ewc.penalty(state, p, lam))(jax.tree.map(jnp.asarray, theta))
    for g, w in zip(_f64(auto), _f64(got), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7)
    at_anchor = ewc.penalty_grad(state, state.anchor, lam)  # no pull at θ = θ*
    assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(at_anchor))


def test_apply_updates_with_ewc_adds_the_pull_only_to_modules_with_a_state():
    rng = np.random.default_rng(1)
    st = functional.init(jax.random.PRNGKey(2), DIMS, 2, 2, 4.0)
    params = jax.tree.map(lambda p: p + jnp.asarray(rng.normal(size=p.shape), jnp.float32), st.params)
    st = functional.from_params(params, 2.0)
    for layer in (0, 1):
        x, g = rng.normal(size=4).astype(np.float32), rng.normal(size=3).astype(np.float32)
        st = functional.adapt(st, x, g, 0.5, 1.5, True, modules=("q",), layer=layer)
    x, g = rng.normal(size=4).astype(np.float32), rng.normal(size=5).astype(np.float32)
    st = functional.adapt(st, x, g, 0.5, -0.5, True, modules=("v",), layer=1)  # pending = 3
    e = _ewc_state(rng)
    lr, lam = 0.2, 2.5
    out = functional.apply_updates_with_ewc(st, lr, {"q": e}, lam)
    f, anchor = e.fisher["layers"], e.anchor["layers"]
    for i in (0, 1):
        for m in ("q", "v"):
            for k in ("A", "B"):
                theta = np.asarray(st.params["layers"][i][m][k], np.float64)
                mean_grad = np.asarray(st.grad["layers"][i][m][k], np.float64) / 3
                pull = lam * np.float64(f[i][k]) * (theta - np.float64(anchor[i][k])) if m == "q" else 0.0
                want = theta - lr * (-mean_grad + pull)  # SGD on loss = -objective + penalty
                np.testing.assert_allclose(np.asarray(out.params["layers"][i][m][k]), want, rtol=1e-5, atol=1e-6,
                                           err_msg=f"layer {i} {m}.{k}")
    plain = functional.apply_updates(st, lr)
    got_a, plain_a = (np.asarray(s.params["layers"][0]["q"]["A"]) for s in (out, plain))
    assert not np.allclose(got_a, plain_a)


def test_fisher_folds_the_mean_squared_per_sample_gradient():
    lora = MicroLoRA.new(MicroLoraConfig(in_features=4, out_features=3, rank=2, target_modules=("k",)))
    lora.state = lora.state.replace(params=jax.tree.map(lambda p: p + 0.3, lora.state.params))
    rng = np.random.default_rng(2)
    states = lora.ewc_states()
    sq = []
    for _ in range(2):
        before = {k: np.asarray(v) for k, v in lora.state.grad["layers"][0]["k"].items()}
        lora.adapt(rng.normal(size=4), AdaptFeedback(quality=0.5, gradient_estimate=rng.normal(size=3), reward=1.0))
        after = lora.state.grad["layers"][0]["k"]
        sq.append({k: (np.asarray(v, np.float64) - before[k]) ** 2 for k, v in after.items()})
    old = {k: np.full(v.shape, 0.7) for k, v in sq[0].items()}
    states = {m: e.replace(fisher={"layers": (jax.tree.map(jnp.float32, old),)}) for m, e in states.items()}
    new = lora.update_fisher(states, decay=0.3)[TargetModule.KProj]
    for k in ("A", "B"):
        want = 0.3 * (sq[0][k] + sq[1][k]) / 2 + 0.7 * old[k]
        np.testing.assert_allclose(np.asarray(new.fisher["layers"][0][k]), want, rtol=1e-4, atol=1e-7)
    assert int(new.fisher_updates) == 1


@pytest.mark.parametrize("lr, lam, match", [
    (0.1, -1.0, "ewc_lambda must be >= 0, got -1.0"),
    (0.1, float("nan"), "ewc_lambda must be a finite real number, got nan"),
    (-0.1, 1.0, "learning_rate must be >= 0, got -0.1"),
    (float("inf"), 1.0, "learning_rate must be a finite real number, got inf"),
], ids=["negative_lambda", "nan_lambda", "negative_lr", "inf_lr"])
def test_negative_or_non_finite_lambda_or_learning_rate_raise_and_change_nothing(lr, lam, match):
    lora = MicroLoRA.new(MicroLoraConfig.for_hidden_dim(8))
    lora.adapt(np.ones(8, np.float32), AdaptFeedback.from_quality(0.9))
    states = lora.ewc_states()
    before = lora.state
    with pytest.raises(AdapterError, match=match) as e:
        lora.apply_updates_with_ewc(lr, states, lam)
    assert isinstance(e.value, RuvLLMError)
    if lam >= 0:
        with pytest.raises(AdapterError, match=match):
            lora.apply_updates(lr)
    assert lora.state is before
