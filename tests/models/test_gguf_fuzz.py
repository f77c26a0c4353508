"""Hypothesis: mutated GGUF files fail only with `RuvLLMError`s, never a crash, a hang or a huge allocation.

A small valid GGUF (a 1-layer Qwen2 with biases, Q8_0 and F32 tensors, and a byte-level BPE tokenizer)
is written once by `save_gguf`; a walk of its header, written here independently of the loader, records
where every count, length, type, dimension and offset lives. Each example overwrites some of those
fields with extreme or random values, flips header bytes, or truncates the file, then parses it and
loads it: anything but success or a `RuvLLMError` fails the test, as does taking longer than a few
seconds (the loader must check sizes against the file before looping or allocating).
"""

from __future__ import annotations

import itertools
import os
import signal
import struct
import warnings

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from ruvllm_jax.errors import ModelError, RuvLLMError
from ruvllm_jax.models import gguf_io, loader
from ruvllm_jax.testing import build_hf_model, save_hf_model

EXAMPLES = 150
HYP = dict(derandomize=True, database=None, deadline=None, suppress_health_check=[HealthCheck.too_slow])
_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
EXTREMES = [0, 1, 2, 3, 7, 8, 9, 12, 13, 31, 32, 255, 256, 2**16, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**62,
            2**63 - 1, 2**63, 2**64 - 1]
_counter = itertools.count()


def walk(data: bytes) -> tuple[list[tuple[int, int, str]], int, int]:
    """(fields as (offset, width, label), end of the header, end of the last tensor's data)."""
    fields = [(4, 4, "version"), (8, 8, "tensor_count"), (16, 8, "kv_count")]
    n_tensors, n_kv = struct.unpack_from("<QQ", data, 8)
    o = 24

    def u(width: int, label: str) -> int:
        nonlocal o
        fields.append((o, width, label))
        (v,) = struct.unpack_from("<I" if width == 4 else "<Q", data, o)
        o += width
        return v

    def string(label: str) -> None:
        nonlocal o
        n = u(8, label + " length")
        o += n

    for _ in range(n_kv):
        string("key")
        t = u(4, "value type")
        if t == 8:
            string("string value")
        elif t == 9:
            item, count = u(4, "array item type"), u(8, "array count")
            if item == 8:
                for _ in range(count):
                    string("array string")
            else:
                o += count * _SIZES[item]
        else:  # scalars: dimensions, layer counts, token ids, eps, ...
            fields.append((o, _SIZES[t], f"{_SIZES[t]}-byte scalar value"))
            o += _SIZES[t]
    infos = []
    for _ in range(n_tensors):
        string("tensor name")
        dims = [u(8, "tensor dim") for _ in range(u(4, "tensor n_dims"))]
        infos.append((dims, u(4, "tensor type"), u(8, "tensor offset")))
    start = -(-o // 32) * 32
    sizes = {0: (1, 4), 8: (32, 34)}
    end = max(start + off + dims[0] // sizes[t][0] * sizes[t][1] * (dims[1] if len(dims) > 1 else 1)
              for dims, t, off in infos)
    return fields, o, end


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """(bytes of a valid GGUF, its header fields, header end, data end, a scratch folder)."""
    folder = str(tmp_path_factory.mktemp("gguf_fuzz"))
    model = build_hf_model("qwen2", hidden_size=32, intermediate_size=64, num_attention_heads=2,
                           num_key_value_heads=1, num_hidden_layers=1)
    save_hf_model(model, folder)
    cfg = loader.load_config(folder)
    path = os.path.join(folder, "base.gguf")
    gguf_io.save_gguf(loader.load_params(folder, cfg), cfg, path, qtype="Q8_0",
                      tokenizer=os.path.join(folder, "tokenizer.json"))
    data = open(path, "rb").read()
    fields, header_end, data_end = walk(data)
    gguf_io.load_gguf(path)  # the base file is valid
    assert data_end == len(data) and len(fields) > 500
    return data, fields, header_end, data_end, folder


class _Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise _Timeout("loading a mutated GGUF took more than 10 s: a hang or a huge loop")


def _load(folder: str, blob: bytes):
    """Parse then load `blob` as a fresh file (a new inode each time); return the RuvLLMError raised, if any."""
    path = os.path.join(folder, f"m{next(_counter)}.gguf")
    with open(path, "wb") as f:
        f.write(blob)
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, 10)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gguf_io.read_gguf(path)
            gguf_io.load_gguf(path)
        return None
    except RuvLLMError as e:
        return e
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        os.remove(path)


def _mutations(base):
    data, fields, header_end, _, _ = base
    by_label: dict[str, list] = {}
    for f in fields:
        by_label.setdefault(f[2], []).append(f)
    # A kind of field first (counts, types, dims, ...), then one of them: the ~500 token-string lengths
    # would otherwise crowd out the few fields that matter most.
    some_field = st.sampled_from(sorted(by_label)).flatmap(lambda label: st.sampled_from(by_label[label]))
    field = st.tuples(st.just("field"), some_field,
                      st.one_of(st.sampled_from(EXTREMES), st.integers(0, 2**64 - 1)), st.integers(-2, 2))
    flip = st.tuples(st.just("bytes"), st.integers(0, header_end - 1), st.binary(min_size=1, max_size=8))
    cut = st.tuples(st.just("truncate"), st.integers(0, len(data) - 1))
    return st.lists(st.one_of(field, field, flip, cut), min_size=1, max_size=3)


def _apply(data: bytes, mutations) -> bytes:
    blob = bytearray(data)
    for m in mutations:
        if m[0] == "field":
            (offset, width, _), value, delta = m[1], m[2], m[3]
            if offset + width > len(blob):
                continue
            if delta:  # near the original value: off-by-one lengths and counts
                value = int.from_bytes(blob[offset : offset + width], "little") + delta
            blob[offset : offset + width] = (value % (1 << (8 * width))).to_bytes(width, "little")
        elif m[0] == "bytes":
            blob[m[1] : m[1] + len(m[2])] = m[2]
        else:
            del blob[m[1] :]
    return bytes(blob)


@settings(max_examples=EXAMPLES, **HYP)
@given(st.data())
def test_mutated_files_raise_only_ruvllm_errors(base, data):
    mutations = data.draw(_mutations(base), label="mutations")
    err = _load(base[4], _apply(base[0], mutations))
    event("loaded" if err is None else f"{type(err).__name__}: {str(err).split(': ', 2)[-1][:40]}")
    if err is not None:
        assert "GGUF file" in str(err), str(err)  # every message names the file


def test_every_truncation_before_the_data_end_is_a_model_error(base):
    data, _, header_end, data_end, folder = base
    cuts = sorted({*range(0, 64), *range(0, header_end, 97), *range(header_end, data_end, 1013),
                   data_end - 1})
    for n in cuts:
        err = _load(folder, data[:n])
        assert isinstance(err, ModelError), (n, err)
        assert "truncated" in str(err) or "magic" in str(err) or "past the end" in str(err), (n, str(err))


def _kv(key: str, vtype: int, payload: bytes) -> bytes:
    return struct.pack("<Q", len(key)) + key.encode() + struct.pack("<I", vtype) + payload


@pytest.mark.parametrize("header, match", [
    (struct.pack("<IQQ", 3, 0, 2) + _kv("a", 0, b"\x01") + _kv("a", 0, b"\x02"), "'a' appears twice"),
    (struct.pack("<IQQ", 3, 0, 1) + _kv("n", 9, struct.pack("<IQ", 9, 1) + struct.pack("<IQ", 0, 0)),
     "array of arrays"),
    (struct.pack("<IQQ", 3, 0, 1) + _kv("n", 9, struct.pack("<IQ", 4, 2**61)), "metadata array 'n' of 2305843009"),
    (struct.pack("<IQQ", 3, 0, 1) + _kv("general.alignment", 4, struct.pack("<I", 24)), "power of two"),
    (struct.pack("<IQQ", 3, 0, 1) + _kv("general.alignment", 5, struct.pack("<i", 32)), "expected uint32"),
    (struct.pack(">IQQ", 3, 0, 0), "big-endian"),
    (struct.pack("<IQQ", 1, 0, 0), "version 1 is not supported"),
    (struct.pack("<IQQ", 3, 2**40, 0), "tensor_count=1099511627776"),
])
def test_hand_made_headers(tmp_path, header, match):
    path = tmp_path / "h.gguf"
    path.write_bytes(b"GGUF" + header + b"\0" * 8)
    with pytest.raises(ModelError, match=match):
        gguf_io.read_gguf(path)
