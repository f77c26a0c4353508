"""What the loops learn is what the model serves: greedy text changes with learning, and `reset()` brings
the original text back exactly."""

from __future__ import annotations

from ruvllm_jax.types import GenerateParams

GREEDY = GenerateParams(max_tokens=12, temperature=0.0, repetition_penalty=1.0)


def test_learning_changes_the_served_text_and_reset_restores_it(make_sona, oracle, sona_backend):
    sona = make_sona(instant_lr=0.3)
    req, resp = oracle.REQUEST, oracle.RESPONSE
    original = sona_backend.generate(req, GREEDY)
    assert original and sona.generate(req, GREEDY) == original
    lp0 = oracle.logprob(sona.adapters, req, resp)
    for _ in range(30):
        sona.instant_adapt(req, resp, 1.0)
    assert oracle.logprob(sona.adapters, req, resp) > lp0 + 0.5
    learned = sona_backend.generate(req, GREEDY)
    assert learned != original
    assert sona.generate(req, GREEDY) == learned  # the facade and the backend serve the same adapters
    sona.reset()
    assert sona.pending == [] and sona.stats().instant_updates == 0 and sona.stats().instant_norm == 0.0
    assert sona_backend.generate(req, GREEDY) == original
