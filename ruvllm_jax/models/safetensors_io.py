"""Read and write safetensors files, so every failure names the file, the tensor, the field and the value.

The format is an 8-byte little-endian header length N, N bytes of UTF-8 JSON
{name: {dtype, shape, data_offsets}, "__metadata__": {str: str}}, then the data section, which the
tensors' `data_offsets` must tile exactly: sorted, they start at 0, each begins where the previous
ends, and the last ends at the end of the file.

Reading goes through the `safetensors` package (`safe_open`, numpy framework; bf16 comes back as an
`ml_dtypes.bfloat16` array): it is the reference implementation of the format, so a file it rejects
is rejected here and a file it accepts loads the same arrays. What stays ours:

* `_diagnose`, a header checker that runs only after the package rejected a file. The package's
  errors often name neither the tensor nor the field ("invalid shape, data type, or offset for
  tensor", "incomplete metadata, file not fully covered"); `_diagnose` re-reads the header with the
  package's rules (header size limit 100,000,000 bytes, UTF-8, strict JSON with serde_json's nesting
  limit, known dtype strings, shapes and offsets of non-negative 64-bit ints, offsets that tile the
  data section) and names the file, the tensor, the field and the value. The `ModelError` carries
  both its explanation and the package's message. tests/models/test_model_files_fuzz.py checks on
  mutated headers that it flags every file the package rejects and none that it accepts.
* a dtype allow-list: the package accepts F8/F6/F4/C64 tensors, which this loader cannot use
  (an FP8 checkpoint needs its scales), so those are rejected at open, naming the tensor.
* `save_file`, which writes bf16 without torch; the package reads what it writes (tested).

Never pickle.
"""

from __future__ import annotations

import json
import math
import os
import struct as _struct
from typing import Any, Mapping, Optional

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open

from ruvllm_jax.errors import ModelError, NotFoundError, RuvIoError
from ruvllm_jax.models.json_io import read_json

# The dtypes this loader reads, as numpy dtypes.
_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U64": np.uint64,
    "U32": np.uint32,
    "U16": np.uint16,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")

# Every dtype string the format knows (the package's `Dtype` enum), with its size in bits.
_FORMAT_BITS = {
    "BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8,
    "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32, "C64": 64, "F64": 64, "I64": 64, "U64": 64,
}
MAX_HEADER_BYTES = 100_000_000  # the package's MAX_HEADER_SIZE
_MAX_DEPTH = 127  # serde_json's recursion limit, as the package's header parser applies it
_U64 = 1 << 64  # shapes, offsets and byte sizes are Rust usize (64-bit)
_ENTRY_FIELDS = ("dtype", "shape", "data_offsets")


class SafetensorsFile:
    """A validated view of one safetensors file; `get(name)` returns a numpy array."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise NotFoundError(f"safetensors file {self.path!r} does not exist")
        try:
            handle = safe_open(self.path, framework="numpy")
        except (SafetensorError, ValueError, TypeError, OverflowError) as e:
            reason = _diagnose(self.path)
            if reason is None:
                reason = f"safetensors file {self.path!r} is rejected by the safetensors package"
            raise ModelError(f"{reason} [safetensors: {e}]") from None
        except OSError as e:
            raise RuvIoError(f"cannot read safetensors file {self.path!r}: {e}") from None
        self.metadata: dict[str, str] = dict(handle.metadata() or {})
        entries: dict[str, tuple[str, tuple[int, ...]]] = {}
        for name in handle.keys():
            view = handle.get_slice(name)
            dtype, shape = view.get_dtype(), tuple(view.get_shape())
            if dtype not in _DTYPES:
                raise ModelError(
                    f"safetensors file {self.path!r}: tensor {name!r} has dtype {dtype}, which this loader "
                    f"does not read; expected one of {sorted(_DTYPES)}"
                )
            entries[name] = (dtype, shape)
        self._handle = handle
        self._entries = entries
        self._offsets: Optional[dict[str, int]] = None

    def data_offset(self, name: str) -> int:
        """Where the tensor's bytes begin in the file (the package validated the header at open)."""
        self._known(name)
        if self._offsets is None:
            try:
                with open(self.path, "rb") as f:
                    (n,) = _struct.unpack("<Q", f.read(8))
                    header = json.loads(f.read(n))
            except (OSError, ValueError) as e:
                raise ModelError(f"safetensors file {self.path!r}: cannot re-read its header: {e}") from None
            # serde, which the package parses with, also reads an entry from a [dtype, shape, data_offsets] list.
            self._offsets = {k: 8 + n + int((v["data_offsets"] if isinstance(v, dict) else v[2])[0])
                             for k, v in header.items() if k != "__metadata__"}
        return self._offsets[name]

    def keys(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[self._known(name)][1]

    def dtype(self, name: str) -> str:
        """The tensor's dtype as the format names it ("F32", "BF16", ...)."""
        return self._entries[self._known(name)][0]

    def get(self, name: str) -> np.ndarray:
        self._known(name)
        try:
            return self._handle.get_tensor(name)
        except (SafetensorError, OSError, ValueError, TypeError, AttributeError) as e:
            raise ModelError(
                f"safetensors file {self.path!r}: reading tensor {name!r} failed: {type(e).__name__}: {e}"
            ) from None

    def _known(self, name: str) -> str:
        if name not in self._entries:
            raise ModelError(f"tensor {name!r} is missing from {self.path!r}")
        return name


def _show(value: Any, limit: int = 80) -> str:
    r = repr(value)
    return r if len(r) <= limit else r[: limit - 3] + "..."


class _NegativeZero:
    """JSON's `-0`: Python reads it as the int 0, serde_json as the float -0.0 (not a usize)."""

    def __repr__(self) -> str:
        return "-0"


class _Object(dict):
    """A JSON object that remembers which keys it saw more than once (serde rejects some duplicates)."""

    duplicates: frozenset = frozenset()


def _object_pairs(pairs: list[tuple[str, Any]]) -> _Object:
    obj = _Object(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        obj.duplicates = frozenset(k for k, _ in pairs if k in seen or seen.add(k))
    return obj


def _parse_int(s: str) -> Any:
    return _NegativeZero() if s == "-0" else int(s)


def _parse_float(s: str) -> float:
    f = float(s)
    if not math.isfinite(f):
        raise ValueError(f"number {s[:40]} is out of range")
    return f


def _parse_constant(s: str) -> Any:
    raise ValueError(f"{s} is not JSON")


def _depth_and_strings(value: Any) -> tuple[int, Optional[str]]:
    """The nesting depth (a scalar is 0) and the first string that is not valid Unicode (a lone surrogate)."""
    depth, bad = 0, None
    stack = [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, dict):
            depth = max(depth, d)
            for k, x in v.items():
                if bad is None and not _encodable(k):
                    bad = k
                stack.append((x, d + 1))
        elif isinstance(v, list):
            depth = max(depth, d)
            stack.extend((x, d + 1) for x in v)
        elif isinstance(v, str) and bad is None and not _encodable(v):
            bad = v
    return depth, bad


def _encodable(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _u64(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < _U64


def _diagnose(path: str) -> Optional[str]:
    """Why `path` breaks the safetensors format, naming tensor, field and value; None if it does not.

    Run only after the package rejected the file, to say why: it follows the package's rules.
    """
    p = repr(path)
    size = os.path.getsize(path)
    if size < 8:
        return f"safetensors file {p} is truncated: {size} bytes, no 8-byte header length"
    with open(path, "rb") as f:
        (n,) = _struct.unpack("<Q", f.read(8))
        if n > size - 8:
            return (
                f"safetensors file {p} is corrupt or truncated: header claims {n} bytes, "
                f"file has {size - 8} after the length"
            )
        if n > MAX_HEADER_BYTES:
            return f"safetensors file {p} has a {n}-byte header, over the format's limit of {MAX_HEADER_BYTES}"
        raw = f.read(n)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return f"safetensors file {p} has an unreadable header: not UTF-8 ({e})"
    try:
        header = json.loads(
            text, object_pairs_hook=_object_pairs, parse_int=_parse_int, parse_float=_parse_float,
            parse_constant=_parse_constant,
        )
    except RecursionError:
        return f"safetensors file {p} has an unreadable header: nested deeper than {_MAX_DEPTH} levels"
    except ValueError as e:  # JSONDecodeError, and the hooks' out-of-range numbers
        return f"safetensors file {p} has an unreadable header: {e}"
    depth, bad_string = _depth_and_strings(header)
    if depth > _MAX_DEPTH:
        return f"safetensors file {p} has a header nested {depth} levels deep; the format allows {_MAX_DEPTH}"
    if bad_string is not None:
        return f"safetensors file {p} has an unreadable header: string {_show(bad_string)} is not valid Unicode"
    if not isinstance(header, dict):
        return f"safetensors file {p} has a header that is {_show(header)}, expected an object of tensors"
    if "__metadata__" in header.duplicates:
        return f"safetensors file {p}: header field '__metadata__' appears more than once"
    meta = header.pop("__metadata__", None)
    if meta is not None:
        if not isinstance(meta, dict):
            return f"safetensors file {p}: field '__metadata__' is {_show(meta)}, expected an object of strings"
        for k, v in meta.items():
            if not isinstance(v, str):
                return f"safetensors file {p}: __metadata__[{k!r}] is {_show(v)}, expected a string"
    spans = []
    for name, e in header.items():
        if isinstance(e, list) and len(e) == len(_ENTRY_FIELDS):  # serde reads a struct from a sequence too
            e = dict(zip(_ENTRY_FIELDS, e, strict=True))
        elif not isinstance(e, dict):
            return (
                f"safetensors file {p}: tensor {name!r} is {_show(e)}, expected an object with "
                f"dtype, shape and data_offsets"
            )
        for field in _ENTRY_FIELDS:
            if field not in e:
                return f"safetensors file {p}: tensor {name!r} lacks field {field!r}"
            if field in getattr(e, "duplicates", ()):
                return f"safetensors file {p}: tensor {name!r} has field {field!r} more than once"
        dtype, shape, offsets = e["dtype"], e["shape"], e["data_offsets"]
        if not isinstance(dtype, str) or dtype not in _FORMAT_BITS:
            return (
                f"safetensors file {p}: tensor {name!r} has dtype {_show(dtype)}, "
                f"expected one of {sorted(_FORMAT_BITS)}"
            )
        if not isinstance(shape, list) or not all(_u64(d) for d in shape):
            return (
                f"safetensors file {p}: tensor {name!r} has shape {_show(shape)}, "
                f"expected a list of non-negative 64-bit ints"
            )
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_u64(o) for o in offsets):
            return (
                f"safetensors file {p}: tensor {name!r} has data_offsets {_show(offsets)}, "
                f"expected [begin, end], two non-negative 64-bit ints"
            )
        spans.append((offsets[0], offsets[1], name, dtype, shape))
    spans.sort(key=lambda s: (s[0], s[1]))
    end_prev, name_prev = 0, None
    for start, end, name, dtype, shape in spans:
        if end < start:
            return f"safetensors file {p}: tensor {name!r} has data_offsets [{start}, {end}], which are reversed"
        if start < end_prev:
            return (
                f"safetensors file {p}: tensor {name!r} data_offsets [{start}, {end}] overlap tensor "
                f"{name_prev!r}, which ends at byte {end_prev}"
            )
        if start > end_prev:
            after = f"tensor {name_prev!r} ends" if name_prev is not None else "the data section starts"
            return (
                f"safetensors file {p}: gap in the data section: {after} at byte {end_prev} but tensor "
                f"{name!r} starts at {start} (data_offsets [{start}, {end}]); bytes must not be left uncovered"
            )
        count = 1
        for d in shape:  # as the package folds it: an overflow before a later 0 still overflows
            count *= d
            if count >= _U64:
                break
        bits = count * _FORMAT_BITS[dtype]
        if bits >= _U64:
            return f"safetensors file {p}: tensor {name!r} {dtype}{_show(shape)} is too large for 64-bit sizes"
        if bits % 8:
            return (
                f"safetensors file {p}: tensor {name!r} {dtype}{_show(shape)} "
                f"does not fill whole bytes ({bits} bits)"
            )
        if end - start != bits // 8:
            return (
                f"safetensors file {p}: tensor {name!r} {dtype}{_show(shape)} spans {end - start} bytes, "
                f"expected {bits // 8}"
            )
        end_prev, name_prev = end, name
    data_len = size - 8 - n
    if end_prev > data_len:
        return (
            f"safetensors file {p} is truncated: tensor {name_prev!r} ends at byte {end_prev} of the data "
            f"section, which has only {data_len}"
        )
    if end_prev < data_len:
        return (
            f"safetensors file {p}: {data_len - end_prev} bytes after the last tensor's data (byte "
            f"{end_prev} of {data_len}) are not covered by any tensor"
        )
    return None


def save_file(
    tensors: Mapping[str, np.ndarray], path: str | os.PathLike, metadata: Mapping[str, str] | None = None
) -> None:
    """Write tensors (numpy arrays, any supported dtype) as one safetensors file, names sorted."""
    header: dict = {}
    if metadata:
        bad = {k: v for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)}
        if bad:
            raise ModelError(f"safetensors metadata must map str to str, got {_show(bad)}")
        header["__metadata__"] = dict(metadata)
    offset = 0
    arrays = []
    bad_names = [n for n in tensors if not isinstance(n, str) or n == "__metadata__"]
    if bad_names:
        raise ModelError(f"cannot save tensors named {_show(bad_names)} as safetensors; names are strings")
    for name in sorted(tensors):
        a = np.ascontiguousarray(np.asarray(tensors[name]))
        if a.dtype not in _NAMES:
            raise ModelError(f"cannot save tensor {name!r} of dtype {a.dtype} as safetensors")
        header[name] = {"dtype": _NAMES[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
        arrays.append(a)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(_struct.pack("<Q", len(blob)))
        f.write(blob)
        for a in arrays:
            f.write(a.tobytes())


def _plain_relative(name: str) -> bool:
    """A file name inside the folder: relative, no `..` (symlinks, as in the HF cache, are fine)."""
    parts = name.replace(os.sep, "/").split("/")
    return bool(name) and "\x00" not in name and not os.path.isabs(name) and ".." not in parts and parts[-1] != ""


def read_shard_index(index: str, folder: str) -> dict[str, str]:
    """A `model.safetensors.index.json`'s weight_map {tensor: shard file}, every shard inside `folder` and present."""
    data = read_json(index, "shard index")
    if not isinstance(data, dict):
        raise ModelError(f"shard index {index!r} holds {_show(data)}, expected an object with a 'weight_map'")
    if "weight_map" not in data:
        raise ModelError(f"shard index {index!r} lacks the field 'weight_map'")
    weight_map = data["weight_map"]
    if not isinstance(weight_map, dict):
        raise ModelError(
            f"shard index {index!r}: field 'weight_map' is {_show(weight_map)}, "
            f"expected an object mapping tensor names to shard files"
        )
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or not _plain_relative(shard):
            raise ModelError(
                f"shard index {index!r}: tensor {name!r} maps to shard {_show(shard)}, "
                f"expected a file name inside {folder!r}"
            )
        if not os.path.isfile(os.path.join(folder, shard)):
            raise ModelError(
                f"shard index {index!r}: tensor {name!r} maps to shard {shard!r}, which is not a file in {folder!r}"
            )
    return weight_map


def open_checkpoint(folder: str) -> dict[str, SafetensorsFile]:
    """Map every tensor name to its file for `model.safetensors` or a sharded index."""
    if not os.path.isdir(folder):
        raise NotFoundError(f"model folder {folder!r} does not exist")
    index = os.path.join(folder, "model.safetensors.index.json")
    single = os.path.join(folder, "model.safetensors")
    if os.path.isfile(index):
        weight_map = read_shard_index(index, folder)
        files = {fn: SafetensorsFile(os.path.join(folder, fn)) for fn in sorted(set(weight_map.values()))}
        out = {}
        for name, fn in weight_map.items():
            if name not in files[fn]:
                raise ModelError(f"tensor {name!r} is listed in {index!r} but missing from shard {fn!r}")
            out[name] = files[fn]
        return out
    if os.path.isfile(single):
        f = SafetensorsFile(single)
        return {name: f for name in f.keys()}
    found = sorted(x for x in os.listdir(folder) if x.endswith(".safetensors"))
    if len(found) == 1:
        f = SafetensorsFile(os.path.join(folder, found[0]))
        return {name: f for name in f.keys()}
    raise NotFoundError(
        f"no model.safetensors or model.safetensors.index.json in {folder!r} (found {found or 'no safetensors files'})"
    )


