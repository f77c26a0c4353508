"""Read and write safetensors files ourselves, so every failure names the file and tensor.

The format is an 8-byte little-endian header length, a JSON header {name: {dtype, shape,
data_offsets}}, then raw bytes. Reading through a memmap lets bf16/f16 checkpoints load (via
ml_dtypes) and lets us detect truncation before touching any tensor. Never pickle.
"""

from __future__ import annotations

import json
import os
import struct as _struct
from typing import Mapping

import ml_dtypes
import numpy as np

from ruvllm_jax.errors import ModelError, NotFoundError

_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}


class SafetensorsFile:
    """A validated view of one safetensors file; `get(name)` returns a numpy array (memmapped)."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise NotFoundError(f"safetensors file {self.path!r} does not exist")
        size = os.path.getsize(self.path)
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ModelError(f"safetensors file {self.path!r} is truncated: {size} bytes, no header")
            (n,) = _struct.unpack("<Q", head)
            if n > size - 8:
                raise ModelError(
                    f"safetensors file {self.path!r} is corrupt or truncated: header claims {n} bytes, "
                    f"file has {size - 8} after the length"
                )
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ModelError(f"safetensors file {self.path!r} has an unreadable header: {e}") from None
        if not isinstance(header, dict):
            raise ModelError(f"safetensors file {self.path!r} has a header that is not an object")
        self.metadata = header.pop("__metadata__", None) or {}
        self._data_start = 8 + n
        self._entries = header
        data_len = size - self._data_start
        for name, e in header.items():
            try:
                dtype, shape, (start, end) = e["dtype"], tuple(e["shape"]), e["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise ModelError(f"safetensors file {self.path!r}: entry {name!r} is malformed: {e!r}") from None
            if dtype not in _DTYPES:
                raise ModelError(f"safetensors file {self.path!r}: tensor {name!r} has unsupported dtype {dtype}")
            expected = int(np.prod(shape, dtype=np.int64)) * np.dtype(_DTYPES[dtype]).itemsize
            if end - start != expected or start < 0:
                raise ModelError(
                    f"safetensors file {self.path!r}: tensor {name!r} {dtype}{list(shape)} spans "
                    f"{end - start} bytes, expected {expected}"
                )
            if end > data_len:
                raise ModelError(
                    f"safetensors file {self.path!r} is truncated: tensor {name!r} ends at byte {end} "
                    f"of the data section, which has only {data_len}"
                )
        self._mmap = None

    def keys(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name]["shape"])

    def get(self, name: str) -> np.ndarray:
        if name not in self._entries:
            raise ModelError(f"tensor {name!r} is missing from {self.path!r}")
        if self._mmap is None:
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        e = self._entries[name]
        start, end = e["data_offsets"]
        raw = self._mmap[self._data_start + start : self._data_start + end]
        return raw.view(_DTYPES[e["dtype"]]).reshape(e["shape"])


def save_file(
    tensors: Mapping[str, np.ndarray], path: str | os.PathLike, metadata: Mapping[str, str] | None = None
) -> None:
    """Write tensors (numpy arrays, any supported dtype) as one safetensors file, names sorted."""
    header: dict = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    arrays = []
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


def open_checkpoint(folder: str) -> dict[str, SafetensorsFile]:
    """Map every tensor name to its file for `model.safetensors` or a sharded index."""
    index = os.path.join(folder, "model.safetensors.index.json")
    single = os.path.join(folder, "model.safetensors")
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ModelError(f"shard index {index!r} is not a valid safetensors index: {e!r}") from None
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


