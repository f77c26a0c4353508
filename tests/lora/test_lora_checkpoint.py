"""Orbax save/restore of adapters, accumulators, optimizer and EWC++ state is bit-identical; missing,
partial, corrupt or mismatched checkpoints raise StorageError naming the path and leave the MicroLoRA
as it was; saving onto a file, a folder of other files or (without overwrite) a checkpoint raises RuvIoError."""

from __future__ import annotations

import gc
import json
import shutil
import time

import jax
import numpy as np
import pytest

from ruvllm_jax.errors import RuvIoError, StorageError
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
    with pytest.raises(StorageError, match=r"ck' holds other adapters than this MicroLoRA: .*modules \(in, out\)"):
        MicroLoRA(MicroLoraConfig.for_hidden_dim(8)).restore(str(tmp_path / "ck"))


def test_missing_folder_or_unfinished_save_raises_and_saving_over_a_checkpoint_refuses(tmp_path):
    lora = MicroLoRA(MicroLoraConfig.for_hidden_dim(16))
    before = lora.state
    with pytest.raises(StorageError, match=r"'.*nowhere' is not a MicroLoRA checkpoint: it does not exist"):
        lora.restore(str(tmp_path / "nowhere"))
    lora.save(str(tmp_path / "ck"))
    with pytest.raises(RuvIoError, match="already holds a checkpoint; pass overwrite=True"):
        lora.save(str(tmp_path / "ck"))
    (tmp_path / "ck" / "meta.json").unlink()  # a folder whose meta.json is gone is no checkpoint
    with pytest.raises(StorageError, match=r"no meta.json"):
        lora.restore(str(tmp_path / "ck"))
    assert lora.state is before


def _edit_meta(**changes):
    def edit(folder):
        meta = json.loads((folder / "meta.json").read_text())
        (folder / "meta.json").write_text(json.dumps({**meta, **changes}))
    return edit


def _truncate_data(folder):
    chunks = [p for p in (folder / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    assert chunks
    for p in chunks:
        p.write_bytes(p.read_bytes()[:2])


CORRUPTIONS = {
    "meta_not_json": lambda f: (f / "meta.json").write_text("{not json"),
    "meta_not_an_object": lambda f: (f / "meta.json").write_text("[1, 2]"),
    "meta_missing_fields": lambda f: (f / "meta.json").write_text("{}"),
    "meta_dims_disagree_with_the_arrays": _edit_meta(dims={"q": [8, 8], "v": [8, 8]}),
    "state_folder_missing": lambda f: shutil.rmtree(f / "state"),
    "state_metadata_emptied": lambda f: (f / "state" / "_METADATA").write_text(""),
    "array_data_truncated": _truncate_data,
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("saved") / "ck"
    lora = MicroLoRA(MicroLoraConfig.for_hidden_dim(16), seed=1)
    lora.adapt(np.ones(16, np.float32), AdaptFeedback.from_quality(0.9))
    lora.save(str(folder), lora.ewc_states())
    return folder


# orbax leaves the other reads of a failed restore in flight; they end (noisily) on a closed event loop
ORBAX_STRAGGLERS = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@pytest.mark.parametrize("corrupt", [pytest.param(c, marks=ORBAX_STRAGGLERS) if c == "array_data_truncated" else c
                                     for c in CORRUPTIONS])
def test_corrupt_or_partial_checkpoint_raises_storage_error_and_leaves_the_state(saved, tmp_path, corrupt):
    folder = tmp_path / "ck"
    shutil.copytree(saved, folder)
    MicroLoRA(MicroLoraConfig.for_hidden_dim(16)).restore(str(folder))  # the copy is sound before the damage
    CORRUPTIONS[corrupt](folder)
    lora = MicroLoRA(MicroLoraConfig.for_hidden_dim(16))
    before = lora.state
    with pytest.raises(StorageError, match="holds a corrupt or partial MicroLoRA checkpoint"):
        lora.restore(str(folder))
    assert lora.state is before
    if corrupt == "array_data_truncated":  # let those reads end inside this test, not in a later one
        time.sleep(0.5)
        gc.collect()
