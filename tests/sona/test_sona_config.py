"""SONA's configuration: RuvLLM's defaults, strategy names, and every field checked on creation."""

from __future__ import annotations

import dataclasses

import pytest

from ruvllm_jax.errors import ConfigError, SonaError
from ruvllm_jax.lora.config import MicroLoraConfig
from ruvllm_jax.sona import ConsolidationStrategy, SonaLlm, SonaLlmConfig, TrainingConfig


def test_defaults_are_ruvllms():
    c = SonaLlmConfig()
    assert (c.instant_lr, c.background_interval_ms, c.background_min_samples, c.deep_trigger_threshold,
            c.max_pending_samples) == (0.01, 100, 10, 100.0, 1000)
    assert c.consolidation_strategy is ConsolidationStrategy.EwcMerge
    assert c.neutral_quality == 0.5 and c.micro_lora is None and isinstance(c.training, TrainingConfig)
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.instant_lr = 1.0


@pytest.mark.parametrize("name, want", [
    ("Average", ConsolidationStrategy.Average), ("average", ConsolidationStrategy.Average),
    ("QualityWeighted", ConsolidationStrategy.QualityWeighted),
    ("quality_weighted", ConsolidationStrategy.QualityWeighted),
    ("BestOnly", ConsolidationStrategy.BestOnly), ("best_only", ConsolidationStrategy.BestOnly),
    ("Ensemble", ConsolidationStrategy.Ensemble), ("ewc_merge", ConsolidationStrategy.EwcMerge),
    (ConsolidationStrategy.Ensemble, ConsolidationStrategy.Ensemble),
])
def test_strategy_is_parsed_from_its_name_or_value(name, want):
    assert SonaLlmConfig(consolidation_strategy=name).consolidation_strategy is want


@pytest.mark.parametrize("field, value", [
    ("instant_lr", -0.1), ("instant_lr", float("nan")), ("instant_lr", float("inf")), ("instant_lr", True),
    ("instant_lr", "0.01"), ("background_interval_ms", -1), ("background_interval_ms", 1.5),
    ("background_min_samples", 0), ("deep_trigger_threshold", -1.0), ("max_pending_samples", 0),
    ("consolidation_strategy", "median"), ("consolidation_strategy", 3), ("neutral_quality", 1.5),
    ("neutral_quality", -0.01), ("instant_layers", 0), ("instant_layers", 2.0), ("instant_optimizer", "rmsprop"),
    ("background_lr", -1e-3), ("background_epochs", 0), ("ensemble_size", 0), ("fisher_decay", 0.0),
    ("fisher_decay", 1.5), ("fisher_samples", -1), ("fisher_sample_tokens", 0), ("fisher_prompt", ""),
    ("fisher_prompt", 7), ("seed", -1), ("seed", 2 ** 32), ("training", {"learning_rate": 1e-3}),
    ("micro_lora", "rank-2"),
])
def test_bad_sona_config_field_raises_config_error_naming_it(field, value):
    with pytest.raises(ConfigError, match=field):
        SonaLlmConfig(**{field: value})


@pytest.mark.parametrize("field, value", [
    ("learning_rate", -1e-3), ("learning_rate", float("nan")), ("warmup_steps", -1), ("warmup_steps", 2.5),
    ("decay_to", 1.5), ("decay_to", -0.1), ("grad_clip", 0.0), ("weight_decay", -0.1), ("batch_size", 0),
    ("batch_size", 4.0), ("epochs", 0), ("ewc_lambda", -1.0), ("ewc_lambda", float("inf")), ("epochs", False),
    ("kl_lambda", -1.0), ("kl_lambda", "10"), ("replay_batch", 0), ("replay_batch", 1.5),
])
def test_bad_training_config_field_raises_config_error_naming_it(field, value):
    with pytest.raises(ConfigError, match=f"TrainingConfig.{field}"):
        TrainingConfig(**{field: value})


def test_boundary_values_are_accepted():
    TrainingConfig(learning_rate=0.0, warmup_steps=0, decay_to=1.0, weight_decay=0.0, ewc_lambda=0.0, kl_lambda=0.0,
                   replay_batch=1)
    SonaLlmConfig(instant_lr=0.0, background_interval_ms=0, neutral_quality=1.0, fisher_decay=1.0, fisher_samples=0,
                  seed=2 ** 32 - 1, instant_layers=1, instant_optimizer="adam")


def test_sona_llm_rejects_a_wrong_config_backend_or_adapter_shape(sona_backend):
    with pytest.raises(SonaError, match="config must be a SonaLlmConfig"):
        SonaLlm({"instant_lr": 0.1}, backend=sona_backend)
    with pytest.raises(SonaError, match="backend must be a JaxBackend"):
        SonaLlm(SonaLlmConfig(), backend="the model")
    with pytest.raises(SonaError, match="instant_layers 5 exceeds the model's 4 layers"):
        SonaLlm(SonaLlmConfig(instant_layers=5), backend=sona_backend)
    with pytest.raises(SonaError, match="hidden size 256"):
        SonaLlm(SonaLlmConfig(micro_lora=MicroLoraConfig.for_hidden_dim(128)), backend=sona_backend)
