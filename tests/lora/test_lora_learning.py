"""Learning in the model: feedback moves log p(response | prompt) the way it says, EWC++ protects what
was learned, and adaptation changes the text greedy generation writes (without recompiling)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ruvllm_jax.backend import engine
from ruvllm_jax.lora import AdaptFeedback, MicroLoRA, TargetModule, objective
from ruvllm_jax.models import llama
from ruvllm_jax.types import GenerateParams

GREEDY = GenerateParams(max_tokens=8, temperature=0.0, repetition_penalty=1.0)


def _pair(seed: int, n_prompt: int = 6, n_resp: int = 8):
    ids = np.random.default_rng(seed).choice(np.arange(2, 384), n_prompt + n_resp, replace=False)
    return [int(t) for t in ids[:n_prompt]], [int(t) for t in ids[n_prompt:]]


def test_per_position_adapt_with_the_models_gradient_estimate_equals_grad_of_log_likelihood(lora_backend):
    """Oracle: jax.grad of log p(response|prompt) w.r.t. the adapter, vs per-vector `adapt` calls fed
    g_t = dJ/dy_t captured with a zero probe on layer 0's q output."""
    cfg, params = lora_backend.config, lora_backend.params
    lora = MicroLoRA.for_model(cfg, seed=7)
    q0 = lora.state.params["layers"][0]["q"]
    b = 0.3 * jax.random.normal(jax.random.PRNGKey(1), q0["B"].shape)  # non-zero B: dA is non-zero too
    layers = list(lora.state.params["layers"])
    layers[0] = {**layers[0], "q": {"A": q0["A"], "B": b}}
    lora.state = lora.state.replace(params={"layers": tuple(layers)})
    prompt, resp = _pair(0, 6, 10)  # 16 tokens: exactly one bucket, no padding
    tokens, weights = objective.pack(prompt, resp, cfg.vocab_size)
    x = llama.rms_norm(params["embed"][tokens], params["layers"][0]["attn_norm"], cfg.rms_norm_eps)  # q's input [16, D]
    s = lora.state.scaling
    # probe: A' = [s·A | pinv(X)], B' = [B ; 0] -> same forward; d J / d B'[r:] row t = g_t.
    probe_a = jnp.concatenate([s * q0["A"], jnp.linalg.pinv(x)], axis=1)
    probe_b0 = jnp.concatenate([b, jnp.zeros((16, cfg.q_size))], axis=0)

    def j_of(probe_b):
        ads = [{"v": {**m["v"], "scaling": s}} for m in lora.state.params["layers"]]
        ads[0]["q"] = {"A": probe_a, "B": probe_b, "scaling": jnp.float32(1.0)}
        logits = llama.forward(params, cfg, jnp.asarray(tokens)[None], adapters={"layers": ads})[0]
        lp = jax.nn.log_softmax(logits[:-1])
        return jnp.sum(jnp.take_along_axis(lp, jnp.asarray(tokens)[1:, None], axis=-1)[:, 0] * weights[:-1])

    g = np.asarray(jax.jit(jax.grad(j_of))(probe_b0)[2:])  # [16, q_size]
    assert np.abs(g).max() > 1e-4
    per_vector = MicroLoRA.for_model(cfg, seed=7)
    per_vector.state = lora.state
    for t in range(16):
        per_vector.adapt(np.asarray(x[t]), AdaptFeedback(quality=0.5, gradient_estimate=g[t], reward=1.0),
                         module=TargetModule.QProj, layer=0)
    lora.adapt_sequence(params, prompt, resp, AdaptFeedback(quality=0.5, reward=1.0))
    want, got = lora.state.grad["layers"][0]["q"], per_vector.state.grad["layers"][0]["q"]
    for k in ("A", "B"):
        scale = np.abs(np.asarray(want[k])).max()
        assert scale > 0
        np.testing.assert_allclose(np.asarray(got[k]), np.asarray(want[k]), atol=2e-3 * scale)


@pytest.mark.parametrize("optimizer, lr", [("sgd", 0.05), ("adam", 1e-3)])
def test_positive_reward_raises_and_negative_lowers_the_response_log_likelihood(lora_backend, optimizer, lr):
    cfg, params = lora_backend.config, lora_backend.params
    for seed in range(6):
        prompt, resp = _pair(100 + seed)
        start = MicroLoRA.for_model(cfg, seed=seed, optimizer=optimizer).state
        j0 = None
        for reward in (1.0, -1.0):
            lora = MicroLoRA.for_model(cfg, seed=seed, optimizer=optimizer)
            lora.state = start
            j0 = lora.log_likelihood(params, prompt, resp)
            for _ in range(2):  # the 2nd step also moves A (B is no longer zero)
                lora.adapt_sequence(params, prompt, resp, AdaptFeedback(quality=0.5, reward=reward))
                lora.apply_updates(lr)
            delta = lora.log_likelihood(params, prompt, resp) - j0
            assert np.sign(delta) == np.sign(reward) and abs(delta) > 1e-4, (seed, reward, delta)


def test_quality_above_the_baseline_raises_and_below_lowers_it(lora_backend):
    cfg, params = lora_backend.config, lora_backend.params
    prompt, resp = _pair(7)
    for quality, sign in ((0.95, 1.0), (0.05, -1.0)):
        lora = MicroLoRA.for_model(cfg, seed=1, optimizer="adam")
        j0 = lora.log_likelihood(params, prompt, resp)
        lora.adapt_sequence(params, prompt, resp, AdaptFeedback.from_quality(quality))
        lora.apply_updates(1e-3)
        assert sign * (lora.log_likelihood(params, prompt, resp) - j0) > 0


def _train(lora, params, pair, steps, lr, ewc=None, lam=0.0):
    for _ in range(steps):
        lora.adapt_sequence(params, *pair, AdaptFeedback(quality=1.0, reward=1.0))
        if ewc is None:
            lora.apply_updates(lr)
        else:
            lora.apply_updates_with_ewc(lr, ewc, lam)


def test_fisher_is_an_ema_of_squared_gradients_and_really_changes(lora_backend):
    cfg, params = lora_backend.config, lora_backend.params
    lora = MicroLoRA.for_model(cfg, seed=2, optimizer="adam")
    ewc = lora.ewc_states()
    assert lora.stats(ewc).fisher_mass == 0.0
    masses = []
    for step in range(3):
        lora.adapt_sequence(params, *_pair(step), AdaptFeedback(quality=1.0, reward=1.0))
        g2 = np.asarray(lora.state.grad["layers"][1]["v"]["B"]) ** 2  # one sample: its squared gradient
        before = np.asarray(ewc[TargetModule.VProj].fisher["layers"][1]["B"])
        ewc = lora.update_fisher(ewc, decay=0.25)
        np.testing.assert_allclose(ewc[TargetModule.VProj].fisher["layers"][1]["B"], 0.25 * g2 + 0.75 * before,
                                   rtol=1e-5, atol=1e-12)
        lora.apply_updates(1e-2)
        masses.append(lora.stats(ewc).fisher_mass)
    assert masses[0] > 0 and len(set(masses)) == 3
    assert int(ewc[TargetModule.QProj].fisher_updates) == 3


def test_ewc_keeps_task_a_parameters_closer_while_learning_task_b(lora_backend):
    cfg, params = lora_backend.config, lora_backend.params
    task_a, task_b = _pair(21), _pair(22)
    lr = 0.1
    lora = MicroLoRA.for_model(cfg, seed=3)  # SGD: the penalty acts as the quadratic pull it is
    ewc = lora.ewc_states()
    for _ in range(8):  # task A, folding its squared gradients into the Fisher
        lora.adapt_sequence(params, *task_a, AdaptFeedback(quality=1.0, reward=1.0))
        ewc = lora.update_fisher(ewc, decay=0.3)
        lora.apply_updates(lr)
    ewc = lora.consolidate(ewc)  # anchor θ* = θ_A
    theta_a, after_a = lora.state, lora.log_likelihood(params, *task_a)

    def flat(tree_of_modules):
        return np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree.leaves(tree_of_modules)])

    fisher = flat([e.fisher for e in ewc.values()])
    anchor = flat([e.anchor for e in ewc.values()])
    important = fisher >= 0.25 * fisher.max()  # the parameters task A's Fisher marks as important
    assert 0 < important.sum() < important.size

    def important_drift(state):
        theta = flat([{"layers": tuple(l[m.key] for l in state.params["layers"])} for m in ewc])
        return float(np.sum((theta - anchor)[important] ** 2))

    f_max = float(fisher.max())
    drift, ll_a = {}, {}
    for name, lam in (("plain", None), ("ewc", 1.0 / (lr * f_max))):  # lr·λ·F <= 1: a stable pull
        lora.state = theta_a
        _train(lora, params, task_b, 8, lr, None if lam is None else ewc, lam or 0.0)
        drift[name], ll_a[name] = important_drift(lora.state), lora.log_likelihood(params, *task_a)
    assert drift["plain"] > 0
    assert drift["ewc"] / drift["plain"] < 0.5, drift
    assert after_a - ll_a["ewc"] < after_a - ll_a["plain"], (after_a, ll_a)


def test_adapting_towards_a_response_makes_greedy_generation_write_it_without_recompiling(lora_backend):
    backend = lora_backend
    cfg, params = backend.config, backend.params
    prompt, resp = _pair(5, 6, 5)
    backend.detach_adapters()
    before = backend.generate_tokens(prompt, GREEDY)
    lora = MicroLoRA.for_model(cfg, seed=1, optimizer="adam")
    backend.attach_adapters(lora)
    assert backend.generate_tokens(prompt, GREEDY) == before  # B = 0: attached but no change yet
    compiled = (engine.prefill_slots._cache_size(), engine.generate_slots._cache_size())
    j0 = lora.log_likelihood(params, prompt, resp)
    _train(lora, params, (prompt, resp), 60, 5e-2)
    after = backend.generate_tokens(prompt, GREEDY)

    def common(a):
        n = 0
        while n < min(len(a), len(resp)) and a[n] == resp[n]:
            n += 1
        return n

    assert lora.log_likelihood(params, prompt, resp) > j0 + 1.0
    assert common(before) == 0 and after[: len(resp)] == resp, (before, after, resp)
    assert (engine.prefill_slots._cache_size(), engine.generate_slots._cache_size()) == compiled
    swapped = MicroLoRA.for_model(cfg, seed=9, optimizer="adam")  # same structure: a swap reuses the executables
    backend.attach_adapters(swapped)
    assert backend.generate_tokens(prompt, GREEDY) == before
    assert (engine.prefill_slots._cache_size(), engine.generate_slots._cache_size()) == compiled
    backend.detach_adapters()
    assert backend.adapters is None and backend.generate_tokens(prompt, GREEDY) == before


def test_gradient_checkpointing_rematerializes_and_gives_the_same_gradients(lora_backend):
    cfg, params = lora_backend.config, lora_backend.params
    state = MicroLoRA.for_model(cfg, seed=3).state
    # B starts at 0; shift every leaf so that gradients reach A as well.
    state_params = jax.tree_util.tree_map(lambda x: x + 0.05, state.params)
    tokens, weights = objective.pack(*_pair(11), cfg.vocab_size)
    args = (state_params, state.scaling, params, jnp.asarray(tokens), jnp.asarray(weights))
    j0, g0 = objective.sequence_gradients(*args, cfg=cfg, remat=False)
    j1, g1 = objective.sequence_gradients(*args, cfg=cfg, remat=True)
    np.testing.assert_allclose(float(j1), float(j0), rtol=1e-6)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), g1, g0)
    jaxprs = {remat: str(jax.make_jaxpr(functools.partial(objective.sequence_gradients, cfg=cfg, remat=remat))(*args))
              for remat in (False, True)}
    assert "remat" in jaxprs[True] and "remat" not in jaxprs[False]  # the rematerialized backward
