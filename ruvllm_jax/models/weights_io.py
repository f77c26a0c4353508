"""Weights from a file to device arrays with one copy: row chunks read straight into the kept buffer.

Why not `jnp.asarray(file.get(name))`: a memory-mapped file keeps every page it touched resident
(a second copy in RSS), a dtype cast or a fused concatenation makes a third, and an unaligned numpy
buffer makes `jax.device_put` copy once more. Here each kept weight is allocated once, 64-byte
aligned, so that on CPU `jax.device_put` adopts it without a copy; its rows are filled chunk by
chunk from plain file reads (the page cache is not this process's memory), converted or quantized
per chunk, so the transient memory of a load is one chunk, not one tensor.

A `RowSource` is one stored 2-D tensor (or a 1-D one, as a single row): `read(start, stop)` returns
rows [start, stop) as stored (float rows as numpy, block formats as a `QuantizedTensor` of numpy
bytes). `materialize` joins the sources of one fused weight (q, k, v -> wqkv) along rows into the
kind the caller asks for.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Callable, Optional, Sequence, Union

import jax
import ml_dtypes
import numpy as np

from ruvllm_jax.errors import ModelError, RuvIoError
from ruvllm_jax.quant.tensor import FORMATS, QuantizedTensor

ALIGN = 64  # XLA:CPU adopts a host buffer without copying only when it is this aligned
CHUNK_BYTES = 32 << 20  # rows read, converted and written per step of a load

FLOAT_KINDS = {"F32": np.dtype(np.float32), "F16": np.dtype(np.float16), "BF16": np.dtype(ml_dtypes.bfloat16)}
_READ_ONLY_KINDS = {"F64": np.dtype(np.float64)}  # read from files, never kept
Kind = str  # "F32" | "F16" | "BF16" | a block format name in `FORMATS`


def _float_dtype(kind: Kind) -> np.dtype:
    return FLOAT_KINDS[kind] if kind in FLOAT_KINDS else _READ_ONLY_KINDS[kind]


def kind_of_dtype(dtype) -> Kind:
    """"F32" / "F16" / "BF16" for a float dtype a model may be kept in."""
    dtype = np.dtype(dtype)
    for kind, dt in FLOAT_KINDS.items():
        if dt == dtype:
            return kind
    raise ModelError(f"weights can be kept as {sorted(FLOAT_KINDS)}, not {dtype}")


_PRECISION_KINDS = {"FP32": "F32", "FP16": "F16", "BF16": "BF16"}


def weight_kind(precision, float_kind: Kind, cols: int) -> Kind:
    """The kind a 2-D weight with rows of `cols` is kept in: `float_kind` when `precision` is None,
    a float `Precision`'s width, or a quantized one's block format (`ruvllm_jax.quant.convert.format_for`;
    float32, with a warning, when no block fits the rows)."""
    if precision is None:
        return float_kind
    if not precision.is_quantized:
        return _PRECISION_KINDS[precision.name]
    from ruvllm_jax.quant import convert

    fmt = convert.format_for(precision, cols)
    if fmt is None:
        warnings.warn(f"weights with rows of {cols} columns stay float32: {cols} is not a multiple of 32, so "
                      f"no block format holds them at {precision.name}", stacklevel=3)
        return "F32"
    return fmt


def aligned_empty(shape: Sequence[int], dtype) -> np.ndarray:
    """An uninitialised numpy array whose data starts on an `ALIGN`-byte boundary."""
    dtype = np.dtype(dtype)
    n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(n + ALIGN, np.uint8)
    off = (-raw.ctypes.data) % ALIGN
    return raw[off : off + n].view(dtype).reshape(tuple(shape))


def read_exact(path: str, offset: int, out: np.ndarray) -> None:
    """Fill the contiguous `out` with the file's bytes at [offset, offset + out.nbytes)."""
    view = memoryview(out.reshape(-1).view(np.uint8))
    try:
        with open(path, "rb", buffering=0) as f:
            f.seek(offset)
            done = 0
            while done < len(view):
                n = f.readinto(view[done:])
                if not n:
                    raise ModelError(
                        f"{path!r} ends inside a tensor: wanted {len(view)} bytes at offset {offset}, got {done}"
                    )
                done += n
    except OSError as e:
        raise RuvIoError(f"cannot read {path!r}: {e}") from None


@dataclasses.dataclass(frozen=True)
class RowSource:
    """Rows of one stored tensor: `kind` is how they are stored, `shape` (rows, cols) logical.

    `read(start, stop)` gives the stored rows [start, stop): a numpy array of the kind's dtype, or a
    `QuantizedTensor` with numpy `data` for a block format. `row_align` > 1 makes every chunk start
    and end on a multiple of it (a row permutation within heads needs whole heads).
    """

    name: str
    kind: Kind
    shape: tuple[int, int]
    read: Callable[[int, int], Union[np.ndarray, QuantizedTensor]]
    row_align: int = 1
    # Optional: fill a kept buffer's rows (float rows, or block bytes) with stored rows [start, stop)
    # in place, when nothing needs converting: no transient copy at all.
    read_into: Optional[Callable[[int, int, np.ndarray], None]] = None

    @property
    def row_bytes(self) -> int:
        if self.kind in FORMATS:
            return FORMATS[self.kind].row_bytes(self.shape[1])
        return self.shape[1] * _float_dtype(self.kind).itemsize


def file_rows(path: str, offset: int, name: str, kind: Kind, shape: tuple[int, int]) -> RowSource:
    """A `RowSource` over a tensor stored contiguously, row-major, at `offset` of `path`."""
    src = RowSource(name, kind, shape, lambda a, b: None)
    row_bytes = src.row_bytes

    def read(start: int, stop: int):
        if kind in FORMATS:
            buf = np.empty((stop - start, row_bytes), np.uint8)
            read_exact(path, offset + start * row_bytes, buf)
            return QuantizedTensor(buf, kind, (stop - start, shape[1]))
        buf = np.empty((stop - start, shape[1]), _float_dtype(kind))
        read_exact(path, offset + start * row_bytes, buf)
        return buf

    def read_into(start: int, stop: int, out: np.ndarray) -> None:
        read_exact(path, offset + start * row_bytes, out)

    return dataclasses.replace(src, read=read, read_into=read_into)


def permuted_rows(src: RowSource, perm: np.ndarray) -> RowSource:
    """`src` with rows reordered inside each group of len(perm) rows: out row g*P + i = in row g*P + perm[i]."""
    p = len(perm)
    if src.shape[0] % p:
        raise ModelError(f"tensor {src.name!r} has {src.shape[0]} rows, not a multiple of the permutation's {p}")

    def read(start: int, stop: int):
        rows = src.read(start, stop)
        idx = (np.arange(start, stop) // p * p + perm[np.arange(start, stop) % p]) - start
        if isinstance(rows, QuantizedTensor):
            return QuantizedTensor(rows.data[idx], rows.qtype, rows.shape)
        return rows[idx]

    return dataclasses.replace(src, read=read, row_align=int(np.lcm(src.row_align, p)), read_into=None)


def _convert(rows, kind: Kind) -> Union[np.ndarray, QuantizedTensor]:
    """Stored rows -> rows of `kind` (float cast, dequantize, or quantize)."""
    from ruvllm_jax.quant import formats

    if isinstance(rows, QuantizedTensor):
        if rows.qtype == kind:
            return rows
        rows = formats.dequantize(rows)
    if kind in FORMATS:
        return formats.quantize(np.asarray(rows, np.float32), kind)
    return np.asarray(rows).astype(FLOAT_KINDS[kind], copy=False)


def materialize(parts: Sequence[RowSource], kind: Kind, device=None) -> Union[jax.Array, QuantizedTensor]:
    """The parts' rows stacked into one kept weight of `kind`, on `device` (see `place`), with one copy.

    `device` may also be a callable (rows, cols, quantized) -> device or sharding, for layouts that
    depend on the weight's shape and kind.

    1-D tensors are parts of shape (1, n) and come back 1-D.
    """
    cols = {p.shape[1] for p in parts}
    if len(cols) != 1:
        raise ModelError(f"cannot stack tensors {[p.name for p in parts]} with row lengths {sorted(cols)}")
    (n_cols,) = cols
    n_rows = sum(p.shape[0] for p in parts)
    quantized = kind in FORMATS
    if quantized:
        out = aligned_empty((n_rows, FORMATS[kind].row_bytes(n_cols)), np.uint8)
    else:
        out = aligned_empty((n_rows, n_cols), FLOAT_KINDS[kind])
    if callable(device):
        device = device(n_rows, n_cols, quantized)
    row0 = 0
    for p in parts:
        if p.kind == kind and p.read_into is not None:
            p.read_into(0, p.shape[0], out[row0 : row0 + p.shape[0]])
            row0 += p.shape[0]
            continue
        step = max(1, CHUNK_BYTES // max(1, p.row_bytes, n_cols * 4))
        step = max(p.row_align, step // p.row_align * p.row_align)
        for start in range(0, p.shape[0], step):
            stop = min(p.shape[0], start + step)
            rows = _convert(p.read(start, stop), kind)
            out[row0 + start : row0 + stop] = rows.data if quantized else rows
        row0 += p.shape[0]
    placed = place(out, device)
    if quantized:
        return QuantizedTensor(placed, kind, (n_rows, n_cols))
    return placed


def materialize_vector(parts: Sequence[RowSource], device=None, kind: Kind = "F32") -> jax.Array:
    """1-D tensors (sources of shape (1, n)) joined end to end as one float vector of `kind` on `device`."""
    out = aligned_empty((sum(p.shape[1] for p in parts),), FLOAT_KINDS[kind])
    at = 0
    for p in parts:
        out[at : at + p.shape[1]] = np.asarray(_convert(p.read(0, 1), kind)).reshape(-1)
        at += p.shape[1]
    return place(out, device)


def place(host: np.ndarray, device=None) -> jax.Array:
    """A host buffer onto `device`: a `jax.Device` (or None, the default), or a `jax.sharding.Sharding`
    of a mesh, where every addressable device gets only its slice `host[index]` (no device holds
    more than its shard, and across hosts each process supplies only its own devices' slices)."""
    if isinstance(device, jax.sharding.Sharding) and not isinstance(device, jax.sharding.SingleDeviceSharding):
        return jax.make_array_from_callback(host.shape, device, lambda index: host[index])
    return jax.device_put(host, device)




def check_shape(src: RowSource, shape: tuple[int, ...], where: str) -> None:
    want = (1, shape[0]) if len(shape) == 1 else tuple(shape)
    if tuple(src.shape) != want:
        shown = [src.shape[1]] if src.shape[0] == 1 and len(shape) == 1 else list(src.shape)
        raise ModelError(f"tensor {src.name!r} in {where!r} has shape {shown}, expected {list(shape)} for this config")
