"""MicroLoRA's RuvLLM API: config rules, forward/forward_add, adapt's direction, errors that leave state alone."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ruvllm_jax.errors import AdapterError, ConfigError
from ruvllm_jax.lora import AdaptFeedback, MicroLoRA, MicroLoraConfig, TargetModule, functional


def _same_state(a, b) -> bool:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb, strict=True))


def test_for_hidden_dim_is_rank2_alpha4_on_q_and_v():
    c = MicroLoraConfig.for_hidden_dim(4096)
    assert (c.in_features, c.out_features, c.rank, c.alpha) == (4096, 4096, 2, 4.0)
    assert c.target_modules == (TargetModule.QProj, TargetModule.VProj)
    assert c.scaling == 2.0


@pytest.mark.parametrize("rank", [0, -1])
def test_rank_not_positive_raises_config_error_naming_it(rank):
    with pytest.raises(ConfigError, match=f"rank must be a positive integer, got {rank}"):
        MicroLoraConfig(in_features=8, out_features=8, rank=rank)


def test_unknown_optimizer_raises_config_error_in_the_facade_and_the_functional_layer():
    with pytest.raises(ConfigError, match="optimizer must be one of .*got 'rmsprop'"):
        MicroLoRA(MicroLoraConfig.for_hidden_dim(8), optimizer="rmsprop")
    with pytest.raises(ConfigError, match="optimizer must be one of .*got 'rmsprop'"):
        functional.init(jax.random.PRNGKey(0), {"q": (8, 8)}, 1, 2, 4.0, optimizer="rmsprop")


def test_research_ranks_above_two_are_allowed():
    lora = MicroLoRA.new(MicroLoraConfig(in_features=8, out_features=8, rank=5, alpha=10.0))
    assert lora.state.params["layers"][0]["q"]["A"].shape == (8, 5)


def test_unknown_module_raises_adapter_error_naming_it():
    with pytest.raises(AdapterError, match="'w_pack'"):
        MicroLoraConfig(in_features=8, out_features=8, target_modules=("w_pack",))


def test_starts_with_b_zero_and_random_a_so_output_is_zero():
    lora = MicroLoRA.new(MicroLoraConfig.for_hidden_dim(16))
    layer = lora.state.params["layers"][0]
    assert np.all(np.asarray(layer["q"]["B"]) == 0) and np.std(np.asarray(layer["q"]["A"])) > 0
    assert not np.array_equal(layer["q"]["A"], layer["v"]["A"])
    x = np.random.default_rng(0).normal(size=16).astype(np.float32)
    np.testing.assert_array_equal(lora.forward(x, TargetModule.QProj), np.zeros(16))


def test_forward_is_scaling_x_a_b_and_forward_add_adds_it():
    lora = MicroLoRA.new(MicroLoraConfig(in_features=6, out_features=6, rank=2, alpha=3.0))
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(6, 2)).astype(np.float32), rng.normal(size=(2, 6)).astype(np.float32)
    params = {"layers": ({**lora.state.params["layers"][0], "v": {"A": a, "B": b}},)}
    lora.state = lora.state.replace(params=jax.tree.map(np.asarray, params))
    x, out = rng.normal(size=6).astype(np.float32), rng.normal(size=6).astype(np.float32)
    want = 1.5 * (x @ a) @ b
    np.testing.assert_allclose(lora.forward(x, TargetModule.VProj), want, rtol=1e-5)
    np.testing.assert_allclose(lora.forward_add(x, TargetModule.VProj, out), out + want, rtol=1e-5)


def test_hebbian_adapt_moves_output_towards_input_for_good_and_away_for_bad():
    x = np.random.default_rng(2).normal(size=8).astype(np.float32)
    for quality, sign in ((0.9, 1.0), (0.1, -1.0)):
        lora = MicroLoRA.new(MicroLoraConfig.for_hidden_dim(8))
        for _ in range(3):
            lora.adapt(x, AdaptFeedback.from_quality(quality))
            lora.apply_updates(0.05)
        assert sign * float(x @ np.asarray(lora.forward(x, TargetModule.QProj))) > 0


def test_advantage_is_quality_minus_a_running_baseline():
    lora = MicroLoRA.new(MicroLoraConfig.for_hidden_dim(4))
    x = np.ones(4, np.float32)
    lora.adapt(x, AdaptFeedback.from_quality(0.8), module=TargetModule.QProj)  # baseline 0.5 -> adv 0.3
    g1 = np.asarray(lora.state.grad["layers"][0]["q"]["B"])
    lora2 = MicroLoRA.new(MicroLoraConfig.for_hidden_dim(4))
    lora2.adapt(x, AdaptFeedback(quality=0.0, reward=0.3), module=TargetModule.QProj)
    np.testing.assert_allclose(g1, np.asarray(lora2.state.grad["layers"][0]["q"]["B"]), rtol=1e-6)
    assert abs(lora.stats().baseline - (0.9 * 0.5 + 0.1 * 0.8)) < 1e-6


def test_adapt_gradient_is_that_of_advantage_times_g_dot_lora_output():
    cfg = MicroLoraConfig(in_features=5, out_features=3, rank=2, alpha=2.0, target_modules=("k",))
    lora = MicroLoRA.new(cfg)
    rng = np.random.default_rng(3)
    b = rng.normal(size=(2, 3)).astype(np.float32)
    a = lora.state.params["layers"][0]["k"]["A"]
    lora.state = lora.state.replace(params={"layers": ({"k": {"A": a, "B": b}},)})
    a = np.asarray(a)
    x, g = rng.normal(size=5).astype(np.float32), rng.normal(size=3).astype(np.float32)
    lora.adapt(x, AdaptFeedback(quality=0.5, gradient_estimate=g, reward=-2.0))
    got = lora.state.grad["layers"][0]["k"]
    np.testing.assert_allclose(got["B"], -2.0 * np.outer(x @ a, g), rtol=1e-5)  # scaling 1
    np.testing.assert_allclose(got["A"], -2.0 * np.outer(x, b @ g), rtol=1e-5)


@pytest.mark.parametrize(
    "feedback, x_len, match",
    [
        (AdaptFeedback.from_quality(float("nan")), 8, "quality must be a finite real number, got nan"),
        (AdaptFeedback.from_quality(float("inf")), 8, "got inf"),
        (AdaptFeedback.from_quality(1.5), 8, r"quality must be in \[0, 1\], got 1.5"),
        (AdaptFeedback.from_quality(-0.1), 8, "got -0.1"),
        (AdaptFeedback(quality=0.5, reward=float("nan")), 8, "reward must be a finite real number, got nan"),
        (AdaptFeedback.from_quality(0.9), 7, r"input of shape \(7,\) fits no target module"),
        (AdaptFeedback(quality=0.9, gradient_estimate=np.ones(5)), 8, r"shape \(8,\) fits no target"),
    ],
)
def test_bad_feedback_raises_and_accumulates_nothing(feedback, x_len, match):
    lora = MicroLoRA.new(MicroLoraConfig.for_hidden_dim(8))
    lora.adapt(np.ones(8, np.float32), AdaptFeedback.from_quality(0.7))
    before = lora.state
    with pytest.raises(AdapterError, match=match):
        lora.adapt(np.ones(x_len, np.float32), feedback)
    assert _same_state(before, lora.state)


def test_nan_input_and_wrong_gradient_length_for_named_module_raise():
    lora = MicroLoRA.new(MicroLoraConfig.for_hidden_dim(8))
    before = lora.state
    with pytest.raises(AdapterError, match="NaN or infinite"):
        lora.adapt(np.full(8, np.nan, np.float32), AdaptFeedback.from_quality(0.7))
    fb = AdaptFeedback(quality=0.7, gradient_estimate=np.ones(3), source_module=TargetModule.VProj)
    with pytest.raises(AdapterError, match=r"gradient_estimate for VProj must have length 8, got shape \(3,\)"):
        lora.adapt(np.ones(8, np.float32), fb)
    with pytest.raises(AdapterError, match="module KProj is not adapted"):
        lora.adapt(np.ones(8, np.float32), AdaptFeedback.from_quality(0.7), module=TargetModule.KProj)
    assert _same_state(before, lora.state)


def test_hebbian_on_non_square_module_raises(lora_backend):
    lora = MicroLoRA.for_model(lora_backend.config, target_modules=("k",))  # 64 -> 32 under GQA
    with pytest.raises(AdapterError, match=r"KProj is not square \(64 -> 32\)"):
        lora.adapt(np.ones(64, np.float32), AdaptFeedback.from_quality(0.9))


def test_model_adapters_with_mismatched_dims_raise_and_leave_the_backend_as_it_was(llama_dir):
    from ruvllm_jax.backend import JaxBackend

    backend = JaxBackend()  # its own backend: the shared fixture's adapters depend on other tests
    backend.load_model(llama_dir[1])
    with pytest.raises(AdapterError, match="do not match the model's hidden size 64"):
        MicroLoRA(MicroLoraConfig.for_hidden_dim(32), model_config=backend.config)
    bad = MicroLoRA.new(MicroLoraConfig.for_hidden_dim(64)).adapters  # one layer; the model has two
    assert backend.adapters is None
    with pytest.raises(AdapterError, match="adapters have 1 layers, the model has 2"):
        backend.attach_adapters(bad)
    assert backend.adapters is None
    good = MicroLoRA.for_model(backend.config, seed=1).adapters
    backend.attach_adapters(good)
    with pytest.raises(AdapterError, match="adapters have 1 layers, the model has 2"):
        backend.attach_adapters(bad)
    assert backend.adapters is good  # a rejected swap keeps the adapters attached before


def test_reset_and_stats_count_what_happened():
    lora = MicroLoRA.new(MicroLoraConfig.for_hidden_dim(8))
    a0 = np.asarray(lora.state.params["layers"][0]["q"]["A"])
    x = np.linspace(-1, 1, 8).astype(np.float32)
    lora.adapt(x, AdaptFeedback.from_quality(0.9))
    lora.adapt(x, AdaptFeedback.from_quality(0.95))
    s = lora.stats()
    assert (s.samples_accumulated, s.pending_samples, s.updates_applied) == (2, 2, 0) and s.grad_norm > 0
    lora.apply_updates(0.1)
    s = lora.stats()
    assert (s.pending_samples, s.updates_applied, s.grad_norm) == (0, 1, 0.0) and s.b_norm > 0
    lora.reset()
    s = lora.stats()
    assert (s.samples_accumulated, s.updates_applied, s.b_norm) == (0, 0, 0.0)
    np.testing.assert_array_equal(lora.state.params["layers"][0]["q"]["A"], a0)


def _np_grads(a, b, scaling, x, g, adv):
    """NumPy float64 ∇_{A,B} of adv·Σ_t <g_t, scaling·(x_t @ A) @ B> (rows of x [T, in], g [T, out])."""
    a, b, x, g = (np.atleast_2d(np.asarray(v, np.float64)) for v in (a, b, x, g))
    return adv * scaling * x.T @ (g @ b.T), adv * scaling * (x @ a).T @ g


class _NpOptimizer:
    """The documented update θ ← θ − lr·direction(loss_grad), loss_grad = −mean gradient, in float64;
    direction: identity (SGD) or Adam's (optax defaults b1 0.9, b2 0.999, eps 1e-8)."""

    def __init__(self, optimizer, params):
        self.optimizer, self.t = optimizer, 0
        self.m = {k: np.zeros_like(v) for k, v in params.items()}
        self.v = {k: np.zeros_like(v) for k, v in params.items()}

    def step(self, params, mean_grad, lr):
        self.t += 1
        out = {}
        for k, p in params.items():
            lg = -mean_grad[k]
            if self.optimizer == "adam":
                self.m[k] = 0.9 * self.m[k] + 0.1 * lg
                self.v[k] = 0.999 * self.v[k] + 0.001 * lg ** 2
                m_hat, v_hat = self.m[k] / (1 - 0.9 ** self.t), self.v[k] / (1 - 0.999 ** self.t)
                lg = m_hat / (np.sqrt(v_hat) + 1e-8)
            out[k] = p - lr * lg
        return out


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_jitted_functional_steps_match_numpy_and_new_values_do_not_retrace(optimizer):
    rng = np.random.default_rng(4)
    want = {"A": rng.normal(size=(5, 2)), "B": rng.normal(size=(2, 3))}  # non-zero B: dA is non-zero
    st = functional.from_params({"layers": ({"k": {k: v.astype(np.float32) for k, v in want.items()}},)}, 1.5,
                                optimizer=optimizer)
    traces = []

    def step(state, x, g, reward, lr):
        traces.append(None)  # runs once per trace, not per call
        state = functional.adapt(state, x, g, 0.5, reward, True, modules=("k",), layer=0)
        state = functional.adapt(state, 2.0 * x, g, 0.5, reward, True, modules=("k",), layer=0)
        return functional.apply_updates(state, lr)

    jitted = jax.jit(step)
    ref = _NpOptimizer(optimizer, want)
    sizes = []
    for i in range(3):
        x, g = rng.normal(size=(4, 5)).astype(np.float32), rng.normal(size=(4, 3)).astype(np.float32)
        reward, lr = float(rng.uniform(-2, 2)), 0.05 * (i + 1)
        st = jitted(st, jnp.asarray(x), jnp.asarray(g), reward, lr)
        grads = [_np_grads(want["A"], want["B"], 1.5, xs, g, reward) for xs in (x, 2.0 * x)]
        mean = {"A": (grads[0][0] + grads[1][0]) / 2, "B": (grads[0][1] + grads[1][1]) / 2}
        want = ref.step(want, mean, lr)
        got = st.params["layers"][0]["k"]
        for k in ("A", "B"):
            np.testing.assert_allclose(np.asarray(got[k]), want[k], rtol=2e-4, atol=2e-5)
        # the module-level jits alone: new values (x, g, reward, lr) reuse the first executable
        probe = functional.apply_updates(functional.adapt(st, jnp.asarray(x), jnp.asarray(g), 0.5, reward, True,
                                                          modules=("k",), layer=0), lr)
        sizes.append((functional.adapt._cache_size(), functional.apply_updates._cache_size()))
        assert np.all(np.isfinite(np.asarray(probe.params["layers"][0]["k"]["A"])))
    assert len(traces) == 1 and jitted._cache_size() == 1
    assert sizes[0] == sizes[-1], sizes
    assert (int(st.pending), int(st.samples), int(st.updates)) == (0, 6, 3)


def test_facade_hebbian_step_is_the_numpy_update_on_every_fitting_module():
    rng = np.random.default_rng(5)
    lora = MicroLoRA.new(MicroLoraConfig.for_hidden_dim(8))
    start = {m: {"A": rng.normal(size=(8, 2)), "B": rng.normal(size=(2, 8))} for m in ("q", "v")}
    lora.state = functional.from_params({"layers": ({m: {k: v.astype(np.float32) for k, v in p.items()}
                                                      for m, p in start.items()},)}, 2.0)
    x = np.linspace(-1, 1, 8).astype(np.float32)
    lora.adapt(x, AdaptFeedback.from_quality(0.9))  # advantage 0.9 - 0.5, g = x, on q and v
    lora.adapt(-x, AdaptFeedback.from_quality(0.2))  # advantage 0.2 - (0.9·0.5 + 0.1·0.9)
    lora.apply_updates(0.1)
    for m, p in start.items():
        grads = [_np_grads(p["A"], p["B"], 2.0, xs, xs, adv) for xs, adv in ((x, 0.4), (-x, 0.2 - 0.54))]
        for j, k in enumerate(("A", "B")):
            want = p[k] + 0.1 * (grads[0][j] + grads[1][j]) / 2
            np.testing.assert_allclose(np.asarray(lora.state.params["layers"][0][m][k]), want, rtol=1e-4, atol=1e-6)


def test_dropout_masks_the_adapt_input_with_inverted_scaling_and_never_the_forward():
    """PEFT's lora_dropout: B(A(dropout(x))) while training, identity at inference. Ours: `adapt`
    sees x·mask/(1 − p) (mask ~ Bernoulli(1 − p), fresh each call); forward never drops."""
    p, d = 0.25, 256
    rng = np.random.default_rng(6)
    a, b = rng.normal(size=(d, 1)).astype(np.float32), rng.normal(size=(1, 3)).astype(np.float32)
    x, g = rng.normal(size=d).astype(np.float32), rng.normal(size=3).astype(np.float32)
    lora = MicroLoRA.new(MicroLoraConfig(in_features=d, out_features=3, rank=1, alpha=1.0, dropout=p,
                                         target_modules=("k",)))
    assert lora.state.dropout == p
    lora.state = lora.state.replace(params=jax.device_put({"layers": ({"k": {"A": a, "B": b}},)}))
    want_out = (x.astype(np.float64) @ a) @ b
    for _ in range(2):  # inference: the same, exact output every call
        np.testing.assert_allclose(np.asarray(lora.forward(x, "k")), want_out, rtol=1e-5)
    masks = []
    for _ in range(2):
        lora.adapt(x, AdaptFeedback(quality=0.5, gradient_estimate=g, reward=1.0))
        got = lora.state.grad["layers"][0]["k"]
        x_seen = np.asarray(got["A"])[:, 0] / float(b[0] @ g)  # dA = outer(x_seen, B @ g) at adv 1, scaling 1
        kept = x_seen != 0
        np.testing.assert_allclose(x_seen[kept], x[kept] / (1 - p), rtol=1e-4)
        np.testing.assert_allclose(np.asarray(got["B"]), np.outer(x_seen @ a, g), rtol=1e-4, atol=1e-5)
        assert 0.6 < kept.mean() < 0.9, kept.mean()
        masks.append(kept)
        lora.apply_updates(0.0)  # clears the accumulators, moves nothing
    assert not np.array_equal(masks[0], masks[1])  # a fresh mask per call
    np.testing.assert_allclose(np.asarray(lora.forward(x, "k")), want_out, rtol=1e-5)
