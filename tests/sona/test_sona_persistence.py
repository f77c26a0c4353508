"""Checkpoints: save then restore is bit-identical (adapters, instant delta, Fisher, anchor, pending samples
with their updates, counters); a foreign or damaged checkpoint is refused and changes nothing; unwritable
targets raise `RuvIoError` and overwriting must be asked for."""

from __future__ import annotations

import json
import os

import jax
import pytest

from ruvllm_jax.errors import RuvIoError, StorageError
from ruvllm_jax.lora.config import MicroLoraConfig


@pytest.fixture
def learned(make_sona, oracle):
    """A consolidated member, a Fisher, anchor and replay set, an instant delta and two pending samples."""
    sona = make_sona(instant_lr=0.1, consolidation_strategy="Average")
    # make_sona estimated the Fisher on oracle.TEXTS
    sona.instant_adapt(*oracle.PAIRS[1], 0.9)
    sona.background_consolidate()
    sona.instant_adapt(*oracle.PAIRS[2], 0.8)
    sona.instant_adapt(*oracle.PAIRS[3], 0.3)
    assert len(sona.pending) == 2 and int(sona.state.fisher_updates) == 1 and sona.state.replay_tokens.size
    return sona


def _change(sona, oracle):
    sona.instant_adapt(*oracle.PAIRS[4], 0.9)
    sona.background_consolidate()
    sona.instant_adapt(*oracle.PAIRS[5], 0.1)


def test_save_then_restore_is_bit_identical(learned, oracle, tmp_path, make_sona):
    ckpt = str(tmp_path / "ckpt")
    saved = oracle.snapshot(learned)
    learned.save(ckpt)
    assert os.path.isfile(os.path.join(ckpt, "meta.json"))
    _change(learned, oracle)
    changed = oracle.snapshot(learned)
    with pytest.raises(AssertionError):
        oracle.assert_same(saved, changed)
    learned.restore(ckpt)
    oracle.assert_same(saved, oracle.snapshot(learned))
    assert [p.quality for p in learned.pending] == [0.8, 0.3]
    # into a fresh SonaLlm of the same configuration (one member, nothing learned) too
    fresh = make_sona(instant_lr=0.1, consolidation_strategy="Average")
    fresh.restore(ckpt)
    oracle.assert_same(saved, oracle.snapshot(fresh))
    # and learning goes on from there exactly as it would have
    a = learned.instant_adapt(*oracle.PAIRS[0], 0.9)
    b = fresh.instant_adapt(*oracle.PAIRS[0], 0.9)
    assert (a.logprob_before, a.logprob_after) == (b.logprob_before, b.logprob_after)


def test_ensemble_members_round_trip(learned, oracle, tmp_path, make_sona):
    older = jax.tree.map(lambda x: 0.5 * x + 0.01, learned.state.members[-1])
    learned.state = learned.state.replace(members=(older, *learned.state.members))  # two members, delta kept
    saved = oracle.snapshot(learned)
    learned.save(str(tmp_path / "two"))
    fresh = make_sona(instant_lr=0.1, consolidation_strategy="Average")
    fresh.restore(str(tmp_path / "two"))
    assert len(fresh.state.members) == 2
    oracle.assert_same(saved, oracle.snapshot(fresh))


def test_an_empty_state_round_trips(make_sona, oracle, tmp_path):
    sona = make_sona(fisher=False)  # no replay set yet: zero-size arrays, which orbax cannot write
    saved = oracle.snapshot(sona)
    sona.save(str(tmp_path / "empty"))
    sona.estimate_fisher(oracle.TEXTS)  # Fisher, anchor and replay set change
    sona.counters["samples_seen"] += 1
    sona.restore(str(tmp_path / "empty"))
    oracle.assert_same(saved, oracle.snapshot(sona))


def test_a_checkpoint_of_other_adapters_is_refused_and_changes_nothing(learned, oracle, make_sona, sona_backend,
                                                                       tmp_path):
    other = make_sona(fisher=False, micro_lora=MicroLoraConfig.for_model(sona_backend.config, rank=4))
    other.save(str(tmp_path / "rank4"))
    adam = make_sona(fisher=False, instant_optimizer="adam")
    adam.save(str(tmp_path / "adam"))
    before = oracle.snapshot(learned)
    for name in ("rank4", "adam"):
        with pytest.raises(StorageError, match="holds other adapters"):
            learned.restore(str(tmp_path / name))
        oracle.assert_same(before, oracle.snapshot(learned))


def test_missing_or_damaged_checkpoints_raise_storage_error_and_change_nothing(learned, oracle, tmp_path):
    before = oracle.snapshot(learned)
    good = tmp_path / "good"
    learned.save(str(good))
    cases = {tmp_path / "nowhere": "no readable SONA checkpoint", tmp_path / "empty": "no readable SONA checkpoint"}
    (tmp_path / "empty").mkdir()
    bad_json = tmp_path / "bad_json"
    bad_json.mkdir()
    (bad_json / "meta.json").write_text("{not json")
    cases[bad_json] = "no readable SONA checkpoint"
    other_format = tmp_path / "other_format"
    other_format.mkdir()
    (other_format / "meta.json").write_text(json.dumps({"format": "something/2"}))
    cases[other_format] = "format 'something/2'"
    no_state = tmp_path / "no_state"
    no_state.mkdir()
    (no_state / "meta.json").write_text((good / "meta.json").read_text())
    cases[no_state] = "cannot read the SONA checkpoint"
    for path, match in cases.items():
        with pytest.raises(StorageError, match=match):
            learned.restore(str(path))
        oracle.assert_same(before, oracle.snapshot(learned))


def test_save_refuses_files_and_foreign_folders_and_overwrites_only_when_asked(learned, oracle, tmp_path):
    afile = tmp_path / "a_file"
    afile.write_text("keep me")
    with pytest.raises(RuvIoError, match="not a folder"):
        learned.save(str(afile))
    assert afile.read_text() == "keep me"
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(RuvIoError, match="not a SONA checkpoint"):
        learned.save(str(foreign))
    assert os.listdir(foreign) == ["notes.txt"]
    with pytest.raises(RuvIoError):
        learned.save(str(afile / "below_a_file"))
    empty = tmp_path / "empty"
    empty.mkdir()
    learned.save(str(empty))  # an empty folder is fine
    first = oracle.snapshot(learned)
    _change(learned, oracle)
    with pytest.raises(RuvIoError, match="overwrite=True"):
        learned.save(str(empty))
    learned.restore(str(empty))
    oracle.assert_same(first, oracle.snapshot(learned))  # the refused save left the checkpoint alone
    _change(learned, oracle)
    second = oracle.snapshot(learned)
    learned.save(str(empty), overwrite=True)
    _change(learned, oracle)
    learned.restore(str(empty))
    oracle.assert_same(second, oracle.snapshot(learned))
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".sona-")]  # no temporary folder left behind
