"""PEFT export against peft itself: what SONA serves, exported, loads into transformers + PEFT on the embedded
model and gives the same logits. (The Ensemble export, one rank K·r adapter for K rank-r members, is checked
at the end of the Ensemble test in test_sona_strategies.py, where the 2-member state already exists.)"""

from __future__ import annotations

import numpy as np
import pytest

from ruvllm_jax.errors import RuvIoError


def test_exported_adapter_gives_peft_the_served_logits(make_sona, oracle, hf_base, tmp_path):
    sona = make_sona(instant_lr=1.0, consolidation_strategy="Average")
    for pair in oracle.PAIRS[:3]:
        sona.instant_adapt(*pair, 1.0)
    sona.background_consolidate()
    sona.instant_adapt(*oracle.PAIRS[3], 0.9)  # the live member and an instant delta on it
    assert np.abs(np.asarray(sona.state.members[-1]["layers"][0]["q"]["B"])).max() > 1e-3
    oracle.check_peft_export(sona, hf_base, str(tmp_path / "single"), rank=2)
    with pytest.raises(RuvIoError, match="overwrite=True"):
        sona.export_peft(str(tmp_path / "single"))
    sona.export_peft(str(tmp_path / "single"), overwrite=True)
