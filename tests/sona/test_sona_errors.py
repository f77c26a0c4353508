"""Rejected calls raise `SonaError` and leave the state's arrays, the pending samples and the counters
exactly as they were; accepted rating types work."""

from __future__ import annotations

import numpy as np
import pytest

from ruvllm_jax.errors import SonaError
from ruvllm_jax.sona import TrainingSample

REQ = "ROMEO:\nWhat say you, good friar?\n"
RESP = "I say the night is come, my lord."
GOOD = TrainingSample(REQ, RESP, 0.9)
X = np.ones(256, np.float32)

BAD_CALLS = {
    "quality_nan": lambda s: s.instant_adapt(REQ, RESP, float("nan")),
    "quality_inf": lambda s: s.instant_adapt(REQ, RESP, float("inf")),
    "quality_minus_inf": lambda s: s.instant_adapt(REQ, RESP, -float("inf")),
    "quality_1.5": lambda s: s.instant_adapt(REQ, RESP, 1.5),
    "quality_-0.1": lambda s: s.instant_adapt(REQ, RESP, -0.1),
    "quality_true": lambda s: s.instant_adapt(REQ, RESP, True),
    "quality_str": lambda s: s.instant_adapt(REQ, RESP, "0.9"),
    "quality_none": lambda s: s.instant_adapt(REQ, RESP, None),
    "quality_vector": lambda s: s.instant_adapt(REQ, RESP, np.array([0.9])),
    "quality_np_nan": lambda s: s.instant_adapt(REQ, RESP, np.float32("nan")),
    "empty_response": lambda s: s.instant_adapt(REQ, "", 0.9),
    "empty_request": lambda s: s.instant_adapt("", RESP, 0.9),  # the tokenizer adds no BOS
    "request_int": lambda s: s.instant_adapt(123, RESP, 0.9),
    "request_bytes": lambda s: s.instant_adapt(REQ.encode(), RESP, 0.9),
    "response_none": lambda s: s.instant_adapt(REQ, None, 0.9),
    "too_long": lambda s: s.instant_adapt("ROMEO: " * 400, RESP, 0.9),
    "dataset_empty": lambda s: s.deep_optimize([]),
    "dataset_str": lambda s: s.deep_optimize("ROMEO"),
    "dataset_none": lambda s: s.deep_optimize(None),
    "dataset_foreign_item": lambda s: s.deep_optimize([GOOD, (REQ, RESP, 0.9)]),
    "dataset_bad_quality": lambda s: s.deep_optimize([GOOD, TrainingSample(REQ, RESP, 1.5)]),
    "dataset_nan_quality": lambda s: s.deep_optimize([TrainingSample(REQ, RESP, float("nan")), GOOD]),
    "dataset_empty_response": lambda s: s.deep_optimize([GOOD, TrainingSample(REQ, "", 0.9)]),
    "forward_unadapted_module": lambda s: s.forward(X, "k_proj"),
    "forward_unknown_module": lambda s: s.forward(X, "w_pack"),
    "forward_wrong_length": lambda s: s.forward(np.ones(255, np.float32), "q_proj"),
    "forward_3d": lambda s: s.forward(np.ones((2, 2, 256), np.float32), "q_proj"),
    "forward_nan": lambda s: s.forward(np.full(256, np.nan, np.float32), "q_proj"),
    "forward_layer_4": lambda s: s.forward(X, "q_proj", layer=4),
    "forward_layer_-1": lambda s: s.forward(X, "q_proj", layer=-1),
    "forward_str_input": lambda s: s.forward("x", "q_proj"),
    "fisher_texts_str": lambda s: s.estimate_fisher("I say the night is come."),
    "fisher_texts_empty": lambda s: s.estimate_fisher([]),
    "fisher_texts_empty_text": lambda s: s.estimate_fisher(["Good day.", ""]),
}


@pytest.fixture(scope="module")
def learned(sona_backend, oracle):
    """A SonaLlm with consolidated, instant, Fisher and pending state, so 'unchanged' has something to check
    (one for the module: each test compares its own before and after)."""
    from ruvllm_jax.sona import SonaLlm, SonaLlmConfig

    sona = SonaLlm(SonaLlmConfig(instant_lr=0.1, consolidation_strategy="Average", fisher_samples=0),
                   backend=sona_backend)
    sona.estimate_fisher(oracle.TEXTS)
    sona.instant_adapt(*oracle.PAIRS[1], 0.9)
    sona.background_consolidate()
    sona.instant_adapt(*oracle.PAIRS[2], 0.8)
    sona.instant_adapt(*oracle.PAIRS[3], 0.2)
    return sona


@pytest.mark.parametrize("name", list(BAD_CALLS))
def test_rejected_call_raises_sona_error_and_changes_nothing(learned, oracle, name):
    before = oracle.snapshot(learned)
    with pytest.raises(SonaError):
        BAD_CALLS[name](learned)
    oracle.assert_same(before, oracle.snapshot(learned))


@pytest.mark.parametrize("quality", [np.float32(0.9), np.float64(0.9), 1, 0, np.array(0.75), np.int64(1)],
                         ids=["f32", "f64", "int1", "int0", "0d", "np_int"])
def test_numeric_ratings_of_any_real_type_are_accepted(learned, oracle, quality):
    res = learned.instant_adapt(oracle.REQUEST, oracle.RESPONSE, quality)
    assert res.applied and learned.pending[-1].quality == float(quality)
    assert learned.pending[-1].advantage == pytest.approx(float(quality) - 0.5)


@pytest.mark.parametrize("kw", [{"dropout": 0.1}, {"gradient_checkpointing": True}])
def test_micro_lora_options_sona_does_not_apply_are_refused(kw):
    from ruvllm_jax import JaxBackend, MicroLoraConfig, SonaError, SonaLlm, SonaLlmConfig

    backend = JaxBackend()
    backend.load_model()
    lora = MicroLoraConfig.for_model(backend.config, **({"dropout": kw["dropout"]} if "dropout" in kw else {}))
    if "gradient_checkpointing" in kw:
        import dataclasses

        lora = dataclasses.replace(lora, gradient_checkpointing=True)
    with pytest.raises(SonaError, match="do not apply them yet"):
        SonaLlm(SonaLlmConfig(micro_lora=lora, fisher_samples=0), backend=backend)
    assert backend.adapters is None  # nothing attached
