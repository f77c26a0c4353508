"""Our safetensors reader/writer against the `safetensors` library, and its failures naming the file."""

from __future__ import annotations

import json
import os

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy as st
from safetensors import SafetensorError, safe_open

from ruvllm_jax.errors import ModelError, NotFoundError
from ruvllm_jax.models.safetensors_io import SafetensorsFile, _diagnose, open_checkpoint, save_file


def _tensors():
    rng = np.random.default_rng(0)
    return {
        "a.f32": rng.standard_normal((3, 5)).astype(np.float32),
        "b.f16": rng.standard_normal((7,)).astype(np.float16),
        "c.i64": np.arange(6, dtype=np.int64).reshape(2, 3),
        "d.u8": np.arange(5, dtype=np.uint8),
        "d.u32": np.arange(3, dtype=np.uint32),
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


def _raw(path, header, data: bytes, *, text: str | None = None) -> str:
    """Write a safetensors file byte by byte: `header` as JSON (or `text` verbatim), then `data`."""
    blob = (json.dumps(header) if text is None else text).encode("utf-8", "surrogatepass")
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little") + blob + data)
    return str(path)


def _package_rejects(path: str) -> bool:
    try:
        safe_open(path, framework="numpy")
    except SafetensorError:
        return True
    return False


def F32(begin: int, end: int, shape=None) -> dict:
    return {"dtype": "F32", "shape": [(end - begin) // 4] if shape is None else shape, "data_offsets": [begin, end]}


def test_overlapping_offsets_are_rejected_as_the_package_rejects_them(tmp_path):
    """Regression: `b` reusing bytes of `a` used to load (two tensors, one storage) while the package refuses it."""
    path = _raw(tmp_path / "x.safetensors", {"a": F32(0, 8), "b": F32(4, 12)}, bytes(12))
    assert _package_rejects(path)
    with pytest.raises(ModelError, match=r"x\.safetensors.*'b' data_offsets \[4, 12\] overlap tensor 'a'"):
        SafetensorsFile(path)
    same = _raw(tmp_path / "same.safetensors", {"a": F32(0, 8), "b": F32(0, 8)}, bytes(8))
    assert _package_rejects(same)
    with pytest.raises(ModelError, match=r"same\.safetensors.*overlap"):
        SafetensorsFile(same)


BAD_HEADERS = [  # (header or raw text, data length, what the message must say)
    ({"a": F32(0, 4), "b": F32(8, 12)}, 12, r"gap in the data section: tensor 'a' ends at byte 4 but tensor 'b'"),
    ({"a": F32(4, 8)}, 8, r"the data section starts at byte 0 but tensor 'a' starts at 4"),
    ({"a": F32(0, 4)}, 9, r"5 bytes after the last tensor's data .* not covered"),
    ({"a": F32(0, 8)}, 4, r"truncated: tensor 'a' ends at byte 8 of the data section, which has only 4"),
    ({"a": F32(8, 4, [1])}, 8, r"'a' has data_offsets \[8, 4\], which are reversed"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4, 4]}}, 4, r"'a' has data_offsets \[0, 4, 4\]"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4.0]}}, 4, r"'a' has data_offsets \[0, 4.0\]"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [-4, 0]}}, 4, r"'a' has data_offsets \[-4, 0\]"),
    ({"a": {"dtype": "F 32", "shape": [1], "data_offsets": [0, 4]}}, 4, r"'a' has dtype 'F 32', expected one of"),
    ({"a": {"dtype": 32, "shape": [1], "data_offsets": [0, 4]}}, 4, r"'a' has dtype 32"),
    ({"a": F32(0, 4, [-1])}, 4, r"'a' has shape \[-1\], expected a list of non-negative 64-bit ints"),
    ({"a": F32(0, 4, [1.0])}, 4, r"'a' has shape \[1.0\]"),
    ({"a": F32(0, 4, [True])}, 4, r"'a' has shape \[True\]"),
    ({"a": F32(0, 4, ["1"])}, 4, r"'a' has shape \['1'\]"),
    ({"a": F32(0, 4, [2**64])}, 4, r"'a' has shape \[18446744073709551616\]"),
    ({"a": F32(0, 0, [2**40, 2**40, 0])}, 0, r"'a' F32\[1099511627776, 1099511627776, 0\] is too large for 64-bit"),
    ({"a": F32(0, 4, [2])}, 4, r"'a' F32\[2\] spans 4 bytes, expected 8"),
    ({"a": {"dtype": "F32", "shape": [1]}}, 4, r"'a' lacks field 'data_offsets'"),
    ({"a": [1, 2]}, 4, r"tensor 'a' is \[1, 2\], expected an object"),
    ({"a": F32(0, 4), "__metadata__": {"format": 1}}, 4, r"__metadata__\['format'\] is 1, expected a string"),
    ({"a": F32(0, 4), "__metadata__": ["pt"]}, 4, r"field '__metadata__' is \['pt'\]"),
    ([1, 2], 0, r"header that is \[1, 2\], expected an object of tensors"),
    ('{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4], "x": NaN}}', 4, r"unreadable header: NaN"),
    ('{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4], "x": 1e999}}', 4, r"unreadable header: number"),
    ('{"a": {"dtype": "F32", "shape": [-0], "data_offsets": [0, 0]}}', 0, r"'a' has shape \[-0\]"),
    ('\ufeff{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}', 4, r"unreadable header"),
    ('{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}\x00', 4, r"unreadable header: Extra data"),
    ('{"a\\ud800": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}', 4, r"not valid Unicode"),
    ('{"a\ud800": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}', 4, r"not UTF-8"),
    ('{"a": {"dtype": "F32", "dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}', 4,
     r"'a' has field 'dtype' more than once"),
    ('{"__metadata__": {}, "__metadata__": {}}', 0, r"'__metadata__' appears more than once"),
    ('{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4], "x": ' + "[" * 126 + "]" * 126 + "}}", 4,
     r"nested 128 levels deep; the format allows 127"),
    ('{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4], "x": ' + "[" * 5000 + "]" * 5000 + "}}", 4,
     r"nested deeper than 127"),
    ('{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4], "x": ' + "9" * 5000 + "}}", 4,
     r"unreadable header"),
]


@pytest.mark.parametrize("header, data_len, message", BAD_HEADERS, ids=range(len(BAD_HEADERS)))
def test_every_header_the_package_rejects_is_a_model_error_naming_file_tensor_and_value(
    tmp_path, header, data_len, message
):
    raw = isinstance(header, str)
    path = _raw(tmp_path / "bad.safetensors", None if raw else header, bytes(data_len), text=header if raw else None)
    assert _package_rejects(path)
    with pytest.raises(ModelError, match=r"bad\.safetensors.*" + message) as e:
        SafetensorsFile(path)
    assert "[safetensors: " in str(e.value)  # the package's own words come along


def test_header_length_limits(tmp_path):
    path = str(tmp_path / "h.safetensors")
    with open(path, "wb") as f:
        f.write((100_000_001).to_bytes(8, "little"))
        f.truncate(8 + 100_000_001)  # a sparse file: neither reader gets as far as the header's bytes
    assert _package_rejects(path)
    with pytest.raises(ModelError, match="100000001-byte header, over the format's limit of 100000000"):
        SafetensorsFile(path)
    os.remove(path)
    with open(path, "wb") as f:
        f.write((2**64 - 1).to_bytes(8, "little") + b"{}")
    with pytest.raises(ModelError, match="corrupt or truncated: header claims 18446744073709551615 bytes"):
        SafetensorsFile(path)
    with open(path, "wb") as f:
        f.write(b"\x02\x00")
    with pytest.raises(ModelError, match="truncated: 2 bytes, no 8-byte header length"):
        SafetensorsFile(path)


ODD_BUT_VALID = [  # files the package accepts, so we must too, with the same arrays
    {},
    {"a": ["F32", [1], [0, 4]]},  # serde reads a struct from a sequence
    {"a": {**F32(0, 4), "extra": {"any": [1, 2]}}},  # unknown fields are ignored
    {"a": F32(0, 0, [0]), "b": F32(0, 0, [3, 0]), "c": F32(0, 4)},  # empty tensors share an offset
    {"a": F32(0, 4), "__metadata__": None},
    {"a": {"dtype": "F32", "shape": [], "data_offsets": [0, 4]}},  # a scalar
]


@pytest.mark.parametrize("header", ODD_BUT_VALID, ids=range(len(ODD_BUT_VALID)))
def test_odd_headers_the_package_accepts_load_the_same_arrays(tmp_path, header):
    size = max([0] + [(e[2] if isinstance(e, list) else e["data_offsets"])[1] for n, e in header.items()
                      if n != "__metadata__"])
    path = _raw(tmp_path / "ok.safetensors", header, np.arange(size, dtype=np.uint8).tobytes())
    ref = safe_open(path, framework="numpy")
    ours = SafetensorsFile(path)
    assert _diagnose(path) is None
    assert sorted(ours.keys()) == sorted(ref.keys())
    for name in ref.keys():
        a, b = ref.get_tensor(name), ours.get(name)
        assert a.dtype == b.dtype and a.shape == b.shape == ours.shape(name) and a.tobytes() == b.tobytes()
    whitespace = _raw(tmp_path / "ws.safetensors", None, b"", text="  {}\n\t ")
    assert SafetensorsFile(whitespace).keys() == []


@pytest.mark.parametrize(
    "index, message",
    [
        ("[1]", r"holds \[1\], expected an object with a 'weight_map'"),
        ('{"metadata": {}}', r"lacks the field 'weight_map'"),
        ('{"weight_map": ["a"]}', r"field 'weight_map' is \['a'\], expected an object"),
        ('{"weight_map": {"a": 3}}', r"tensor 'a' maps to shard 3, expected a file name inside"),
        ('{"weight_map": {"a": "../one.safetensors"}}', r"tensor 'a' maps to shard '../one.safetensors', expected"),
        ('{"weight_map": {"a": "/etc/passwd"}}', r"tensor 'a' maps to shard '/etc/passwd', expected"),
        ('{"weight_map": {"a": "one.safetensors\\u0000"}}', r"tensor 'a' maps to shard 'one.safetensors\\x00'"),
        ('{"weight_map": {"a": ""}}', r"tensor 'a' maps to shard '', expected"),
        ('{"weight_map": {"a": "sub/"}}', r"tensor 'a' maps to shard 'sub/', expected"),
        ('{"weight_map": {"a": "gone.safetensors"}}', r"'a' maps to shard 'gone.safetensors', which is not a file"),
        ('{"weight_map": {"a": ' + "1" * 5000 + "}}", r"is not valid JSON"),
        ("[" * 100_000 + "]" * 100_000, r"is not valid JSON"),
        (b"\xff\xfe", r"is not valid JSON"),
    ],
)
def test_bad_shard_index_names_index_tensor_and_shard(tmp_path, index, message):
    st.save_file({"a": np.zeros(2, np.float32)}, str(tmp_path / "one.safetensors"))
    path = tmp_path / "model.safetensors.index.json"
    path.write_bytes(index if isinstance(index, bytes) else index.encode())
    with pytest.raises(ModelError, match=r"model\.safetensors\.index\.json.*" + message):
        open_checkpoint(str(tmp_path))
    path.write_text('{"weight_map": {"a": "one.safetensors"}, "metadata": {"total_size": 8}}')
    assert list(open_checkpoint(str(tmp_path))) == ["a"]


def test_missing_folder_and_bad_metadata_on_save(tmp_path):
    with pytest.raises(NotFoundError, match="nowhere"):
        open_checkpoint(str(tmp_path / "nowhere"))
    with pytest.raises(ModelError, match="metadata must map str to str"):
        save_file({"a": np.zeros(1, np.float32)}, tmp_path / "m.safetensors", {"format": 1})
    with pytest.raises(ModelError, match="names are strings"):
        save_file({"__metadata__": np.zeros(1, np.float32)}, tmp_path / "m.safetensors")
