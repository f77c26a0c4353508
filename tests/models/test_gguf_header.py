"""`read_gguf`'s own header walk decodes what gguf's `GGUFReader` decodes (the reference we did not write).

The loader does not run `GGUFReader` (it builds numpy views per array item: 5 s and 0.3 GB for a
151936-token vocabulary); these tests hold the walk's metadata values and tensor infos equal to the
reader's `field.contents()` and `ReaderTensor`s: on random metadata of every GGUF value type written by
`gguf.GGUFWriter` (hypothesis), and on the files our exporter and llama.cpp-style writers produce.
"""

from __future__ import annotations

import math
import os

import gguf
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ruvllm_jax.models import gguf_io, loader
from ruvllm_jax.testing import build_hf_model, save_hf_model

T = gguf.GGUFValueType
_INT_RANGES = {T.UINT8: (0, 2**8 - 1), T.INT8: (-(2**7), 2**7 - 1), T.UINT16: (0, 2**16 - 1),
               T.INT16: (-(2**15), 2**15 - 1), T.UINT32: (0, 2**32 - 1), T.INT32: (-(2**31), 2**31 - 1),
               T.UINT64: (0, 2**64 - 1), T.INT64: (-(2**63), 2**63 - 1)}
_TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=12)


def _scalar(vtype):
    if vtype in _INT_RANGES:
        return st.integers(*_INT_RANGES[vtype])
    if vtype == T.FLOAT32:
        return st.floats(width=32, allow_nan=True, allow_infinity=True)
    if vtype == T.FLOAT64:
        return st.floats(allow_nan=True, allow_infinity=True)
    if vtype == T.BOOL:
        return st.booleans()
    return _TEXT


_SCALAR_TYPES = [*_INT_RANGES, T.FLOAT32, T.FLOAT64, T.BOOL, T.STRING]


@st.composite
def metadata_entries(draw):
    """[(key, value type, sub type or None, value)]: scalars and arrays of every type, unique keys
    (non-empty arrays: gguf's writer refuses empty ones)."""
    entries = []
    for i in range(draw(st.integers(0, 12))):
        vtype = draw(st.sampled_from(_SCALAR_TYPES))
        if draw(st.booleans()):
            entries.append((f"k{i}.array", T.ARRAY, vtype, draw(st.lists(_scalar(vtype), min_size=1, max_size=6))))
        else:
            entries.append((f"k{i}.scalar", vtype, None, draw(_scalar(vtype))))
    return entries


def reader_header(path) -> tuple[dict, dict]:
    """(metadata, tensors) as gguf's reader gives them, float32 scalars by their shortest float32 spelling."""
    reader = gguf.GGUFReader(path)
    metadata = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        value = field.contents()
        if field.types == [T.FLOAT32] and math.isfinite(value):
            value = float(str(np.float32(value)))
        metadata[key] = value
    tensors = {t.name: (int(t.tensor_type), t.tensor_type.name, tuple(reversed([int(d) for d in t.shape])),
                        int(t.data_offset), int(t.n_bytes)) for t in reader.tensors}
    return metadata, tensors


def _same(a, b) -> bool:
    """Equal values of the same Python types, NaN equal to NaN."""
    if type(a) is not type(b):
        return False
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and math.isnan(a):
        return math.isnan(b)
    return a == b


def assert_same_header(path) -> None:
    theirs_md, theirs_t = reader_header(path)
    f = gguf_io.read_gguf(path)
    assert list(f.metadata) == list(theirs_md)
    for key, value in theirs_md.items():
        assert _same(f.metadata[key], value), (key, f.metadata[key], value)
    assert {n: (i.ggml_type, i.type_name, i.shape, i.offset, i.nbytes) for n, i in f.tensors.items()} == theirs_t


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(entries=metadata_entries(), rows=st.integers(1, 3), alignment=st.sampled_from([None, 8, 32, 64]))
def test_metadata_of_every_type_decodes_as_gguf_reader(tmp_path, entries, rows, alignment):
    path = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    if alignment is not None:
        w.add_custom_alignment(alignment)
    for key, vtype, sub, value in entries:
        if vtype == T.ARRAY:
            w.add_key_value(key, value, T.ARRAY, sub_type=sub)
        else:
            w.add_key_value(key, value, vtype)
    w.add_tensor("a", np.arange(rows * 32, dtype=np.float32).reshape(rows, 32))
    w.add_tensor("b", np.ones((3,), np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert_same_header(path)


@pytest.fixture(scope="module")
def exported_files(tmp_path_factory):
    """GGUFs of a tiny Qwen2 with its tokenizer (vocabulary, merges, token types) in every export type."""
    folder = save_hf_model(build_hf_model("qwen2"), str(tmp_path_factory.mktemp("gguf_header")))
    cfg = loader.load_config(folder)
    params = loader.load_params(folder, cfg)
    paths = []
    for qtype in gguf_io.SAVE_QTYPES:
        paths.append(os.path.join(folder, f"{qtype}.gguf"))
        gguf_io.save_gguf(params, cfg, paths[-1], qtype=qtype, tokenizer=os.path.join(folder, "tokenizer.json"))
    return paths


def test_exported_files_decode_as_gguf_reader(exported_files):
    for path in exported_files:
        assert_same_header(path)
        md = gguf_io.read_gguf(path).metadata
        assert len(md["tokenizer.ggml.tokens"]) == len(md["tokenizer.ggml.token_type"]) > 0
