"""Orbax save/restore of adapters, accumulators, optimizer and EWC++ state is bit-identical."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from ruvllm_jax.errors import AdapterError
from ruvllm_jax.lora import AdaptFeedback, MicroLoRA, MicroLoraConfig, TargetModule


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_orbax_round_trip_is_bit_identical(tmp_path, optimizer):
    lora = MicroLoRA(MicroLoraConfig.for_hidden_dim(16), seed=3, optimizer=optimizer)
    rng = np.random.default_rng(0)
    ewc = lora.ewc_states()
    for step in range(3):
        lora.adapt(rng.normal(size=16).astype(np.float32), AdaptFeedback.from_quality(0.2 + 0.3 * step))
        ewc = lora.update_fisher(ewc)
        lora.apply_updates_with_ewc(0.1, ewc, 2.0)
    lora.adapt(rng.normal(size=16).astype(np.float32), AdaptFeedback.from_quality(0.9))  # pending accumulators
    ewc = lora.consolidate(ewc)
    lora.save(str(tmp_path / "ck"), ewc)

    other = MicroLoRA(MicroLoraConfig.for_hidden_dim(16), seed=99, optimizer=optimizer)
    ewc2 = other.restore(str(tmp_path / "ck"))
    assert jax.tree.structure(other.state) == jax.tree.structure(lora.state)
    for a, b in zip(jax.tree.leaves(other.state), jax.tree.leaves(lora.state), strict=True):
        assert np.asarray(a).dtype == np.asarray(b).dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert set(ewc2) == {TargetModule.QProj, TargetModule.VProj}
    for m in ewc:
        for a, b in zip(jax.tree.leaves(ewc2[m]), jax.tree.leaves(ewc[m]), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert other.stats() == lora.stats()


def test_restore_into_other_dims_raises(tmp_path):
    MicroLoRA(MicroLoraConfig.for_hidden_dim(16)).save(str(tmp_path / "ck"))
    with pytest.raises(AdapterError, match="holds adapters"):
        MicroLoRA(MicroLoraConfig.for_hidden_dim(8)).restore(str(tmp_path / "ck"))
