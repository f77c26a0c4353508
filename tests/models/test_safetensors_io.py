"""Our safetensors reader/writer against the `safetensors` library, and its failures naming the file."""

from __future__ import annotations

import json
import os

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy as st

from ruvllm_jax.errors import ModelError, NotFoundError
from ruvllm_jax.models.safetensors_io import SafetensorsFile, open_checkpoint, save_file


def _tensors():
    rng = np.random.default_rng(0)
    return {
        "a.f32": rng.standard_normal((3, 5)).astype(np.float32),
        "b.f16": rng.standard_normal((7,)).astype(np.float16),
        "c.i64": np.arange(6, dtype=np.int64).reshape(2, 3),
        "d.u8": np.arange(5, dtype=np.uint8),
        "e.scalar": np.array(2.5, np.float32),
    }


def test_reads_what_the_safetensors_library_writes(tmp_path):
    path = str(tmp_path / "x.safetensors")
    st.save_file(_tensors(), path, metadata={"format": "pt"})
    f = SafetensorsFile(path)
    assert sorted(f.keys()) == sorted(_tensors()) and f.metadata == {"format": "pt"}
    for name, a in _tensors().items():
        assert f.shape(name) == a.shape
        np.testing.assert_array_equal(f.get(name), a)
        assert f.get(name).dtype == a.dtype


def test_bf16_roundtrip_through_the_library(tmp_path):
    a = np.random.default_rng(1).standard_normal((4, 4)).astype(ml_dtypes.bfloat16)
    path = str(tmp_path / "bf.safetensors")
    save_file({"w": a}, path)
    back = SafetensorsFile(path).get("w")
    assert back.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(back.astype(np.float32), a.astype(np.float32))
    # The library reads our file too (it checks the header and alignment rules); numpy has no bf16.
    import safetensors.torch
    import torch

    raw = safetensors.torch.load_file(path)["w"]
    assert raw.dtype == torch.bfloat16
    np.testing.assert_array_equal(raw.view(torch.int16).numpy().view(np.uint16), a.view(np.uint16))


def test_library_reads_what_we_write(tmp_path):
    path = str(tmp_path / "ours.safetensors")
    save_file(_tensors(), path, metadata={"k": "v"})
    back = st.load_file(path)
    for name, a in _tensors().items():
        np.testing.assert_array_equal(back[name], a)


def test_missing_file_and_tensor(tmp_path):
    with pytest.raises(NotFoundError, match="absent.safetensors"):
        SafetensorsFile(tmp_path / "absent.safetensors")
    path = str(tmp_path / "x.safetensors")
    st.save_file(_tensors(), path)
    with pytest.raises(ModelError, match="'zzz'.*x.safetensors"):
        SafetensorsFile(path).get("zzz")


def test_header_lying_about_a_tensor_size_is_named(tmp_path):
    path = str(tmp_path / "x.safetensors")
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}}).encode()
    with open(path, "wb") as f:
        f.write(len(header).to_bytes(8, "little") + header + bytes(12))
    with pytest.raises(ModelError, match="x.safetensors.*'w'.*12 bytes, expected 16"):
        SafetensorsFile(path)


def test_unsupported_dtype_is_named(tmp_path):
    path = str(tmp_path / "x.safetensors")
    header = json.dumps({"w": {"dtype": "F8_E4M3", "shape": [4], "data_offsets": [0, 4]}}).encode()
    with open(path, "wb") as f:
        f.write(len(header).to_bytes(8, "little") + header + bytes(4))
    with pytest.raises(ModelError, match="'w'.*F8_E4M3"):
        SafetensorsFile(path)


def test_open_checkpoint_single_index_and_odd_name(tmp_path):
    t = _tensors()
    st.save_file({"a": t["a.f32"]}, str(tmp_path / "one.safetensors"))
    assert list(open_checkpoint(str(tmp_path))) == ["a"]  # the only safetensors file, any name
    st.save_file({"b": t["b.f16"]}, str(tmp_path / "two.safetensors"))
    with pytest.raises(NotFoundError, match="one.safetensors"):  # two candidates, no index
        open_checkpoint(str(tmp_path))
    index = {"weight_map": {"a": "one.safetensors", "b": "two.safetensors", "c": "two.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelError, match="'c'.*two.safetensors"):
        open_checkpoint(str(tmp_path))
    del index["weight_map"]["c"]
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    files = open_checkpoint(str(tmp_path))
    np.testing.assert_array_equal(files["b"].get("b"), t["b.f16"])
    (tmp_path / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(ModelError, match="index"):
        open_checkpoint(str(tmp_path))


def test_empty_folder_is_not_found(tmp_path):
    os.makedirs(tmp_path / "empty")
    with pytest.raises(NotFoundError, match="no model.safetensors"):
        open_checkpoint(str(tmp_path / "empty"))
