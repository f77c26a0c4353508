"""GGUF files (llama.cpp's single-file format) to and from the params pytree.

A GGUF holds the config as metadata (`llama.embedding_length`, ...), the tokenizer as metadata
(`tokenizer.ggml.tokens`, `merges`, ...) and the tensors under llama.cpp's names, each in its own
ggml type. `load_gguf` turns one into (config, params, tokenizer, eos ids) in our fused layout;
`save_gguf` writes the inverse, which llama.cpp and transformers' GGUF loader read.

Layout differences handled here:

* GGUF lists a tensor's dims innermost first (ne[0] = columns); our weights are [rows=out, cols=in].
* llama.cpp's converter permutes the rows of Llama's attn_q / attn_k (weights and biases) within
  each head, (half, pair) -> (pair, half), for its interleaved RoPE; Qwen2's are stored as is. The
  permutation is undone on load and applied on save; it is a row reorder, so it works on block-
  quantized rows too.
* Llama-3 RoPE scaling is stored as a `rope_freqs.weight` tensor of per-frequency divisors, which
  is fitted back to transformers' llama3 parameters on load.

Parsing is defensive: `read_gguf` walks the header itself, checking every count, length, type,
shape and data range against the file size before it reads or allocates, and decodes the metadata
to the values gguf's `GGUFReader` gives (the tests compare the two on every file they write, and
fuzz the walk). Every problem is a `ModelError` naming the file and, where known, the key or tensor
and its value. Not `GGUFReader` itself on the load path: it loops for ever on a huge array count,
indexes past the end of a truncated file, and builds numpy views for every array item, which for
Qwen2.5's 151936-token vocabulary took 5 s and a 0.3 GB transient per load (the walk: 0.1 s).

Memory: tensor bytes are read with plain `readinto` straight into their destination buffer (for
fused tensors, its row slice), so the weights exist once on the host before `jax.device_put`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import mmap
import os
import struct
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import jax
import ml_dtypes
import numpy as np

from ruvllm_jax.errors import ConfigError, ModelError, NotFoundError
from ruvllm_jax.models import weights_io
from ruvllm_jax.models.config import LlamaConfig
from ruvllm_jax.quant.tensor import FORMATS, QuantizedTensor

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "mistral")
SAVE_QTYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_K")
GGUF_VERSIONS = (2, 3)

_F32, _F16, _BF16 = 0, 1, 30
_FLOAT_DTYPES = {_F32: np.dtype(np.float32), _F16: np.dtype(np.float16), _BF16: np.dtype(ml_dtypes.bfloat16)}
_VALUE_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUFValueType -> bytes
_STRING, _ARRAY, _UINT32, _FLOAT32 = 8, 9, 4, 6
# GGUFValueType -> little-endian numpy dtype of its scalars (BOOL: one byte, nonzero is True, as gguf's reader).
_VALUE_DTYPES = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8",
                 12: "<f8"}
_MAX_DIMS = 4  # GGML_MAX_DIMS
_MAX_ELEMENTS = 1 << 62
_MAX_LAYERS = 1 << 16  # for a config read from metadata alone
_MAX_PIECE = 64  # longest SentencePiece piece split into merges
_TOKEN_NORMAL, _TOKEN_UNKNOWN, _TOKEN_CONTROL, _TOKEN_USER_DEFINED, _TOKEN_UNUSED = 1, 2, 3, 4, 5

# Pre-tokenizer splits, as llama.cpp (llama-vocab.cpp) and transformers' GGUF loader use them.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZER_SPLITS = {
    "llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "smaug-bpe": _LLAMA3_SPLIT,
    "falcon3": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT, "megrez": _QWEN2_SPLIT,
}
_LLAMA3_PRES = {name for name, split in PRE_TOKENIZER_SPLITS.items() if split is _LLAMA3_SPLIT}
_GPT2_PRES = (None, "gpt-2", "gpt2", "default")  # llama.cpp names it "gpt-2"


def _gguf():
    try:
        import gguf
    except ImportError:
        raise ModelError("reading or writing GGUF files needs the gguf package: pip install ruvllm-jax[gguf]") from None
    return gguf


def _show(value: Any, limit: int = 80) -> str:
    r = repr(value)
    return r if len(r) <= limit else r[: limit - 3] + "..."


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# -- reading the header ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GGUFTensorInfo:
    """Where one tensor lives: `shape` in our order (ne reversed: [rows, cols]), `offset` from the file start."""

    name: str
    ggml_type: int
    type_name: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int


@dataclasses.dataclass(frozen=True)
class GGUFFile:
    """A GGUF file's header: metadata as Python values, tensor infos by name; no tensor data."""

    path: str
    version: int
    metadata: dict[str, Any]
    tensors: dict[str, GGUFTensorInfo]
    file_size: int


class _Scan:
    """Bounds-checked little-endian reads over the file's bytes; every failure names what was being read."""

    def __init__(self, buf, size: int, source: str):
        self.buf, self.size, self.source, self.pos = buf, size, source, 0

    def need(self, n: int, what: str) -> None:
        if n > self.size - self.pos:
            raise ModelError(
                f"{self.source}: file is truncated or corrupt: {what} at byte {self.pos} needs {n} bytes, "
                f"but only {self.size - self.pos} remain"
            )

    def unpack(self, fmt: str, n: int, what: str) -> int:
        self.need(n, what)
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return v

    def u32(self, what: str) -> int:
        return self.unpack("<I", 4, what)

    def u64(self, what: str) -> int:
        return self.unpack("<Q", 8, what)

    def string(self, what: str) -> str:
        n = self.u64(f"the length of {what}")
        self.need(n, f"{what} ({n} bytes)")
        raw = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ModelError(f"{self.source}: {what} is not valid UTF-8 ({e})") from None

    def values(self, vtype: int, count: int, what: str) -> list:
        """`count` scalars of GGUF value type `vtype` as Python values (ints, floats, bools)."""
        n = count * _VALUE_SIZES[vtype]
        self.need(n, what)
        out = np.frombuffer(self.buf, _VALUE_DTYPES[vtype], count, self.pos).tolist()  # a copy: no view outlives buf
        self.pos += n
        return out


def _scan_header(buf, size: int, source: str, gguf) -> tuple[int, dict[str, Any], dict[str, tuple], int]:
    """Walk the whole header with every bound checked -> (version, metadata as Python values,
    {tensor: (ggml_type, ne, offset from the file start, nbytes)}, start of the tensor data).

    Metadata values are what `gguf.GGUFReader`'s `field.contents()` gives (the tests hold the two
    equal): ints, floats, bools, strs and lists of them, float32 scalars by their shortest float32
    spelling (1e-06, not 9.99e-07). Not the reader itself: it builds numpy views per array item, which
    for a 151936-token vocabulary took 5 s and 0.3 GB; this walk takes 0.1 s."""
    s = _Scan(buf, size, source)
    s.need(4, "the GGUF magic")
    magic = bytes(buf[0:4])
    if magic != b"GGUF":
        raise ModelError(f"{source}: not a GGUF file: magic is {magic!r}, expected b'GGUF'")
    s.pos = 4
    version = s.u32("the GGUF version")
    if version & 0xFFFF == 0 and version:
        raise ModelError(f"{source}: big-endian GGUF files are not supported (version field {version:#x})")
    if version not in GGUF_VERSIONS:
        raise ModelError(f"{source}: GGUF version {version} is not supported; expected one of {GGUF_VERSIONS}")
    n_tensors = s.u64("the tensor count")
    n_kv = s.u64("the metadata count")
    # A key-value pair takes at least 13 bytes, a tensor info at least 32: bound the counts by the file.
    if n_kv * 13 + n_tensors * 32 > size - s.pos:
        raise ModelError(
            f"{source}: file is truncated or corrupt: header counts tensor_count={n_tensors} and kv_count={n_kv} "
            f"cannot fit in a file of {size} bytes"
        )
    alignment = 32
    metadata: dict[str, Any] = {}
    for i in range(n_kv):
        key = s.string(f"metadata key #{i}")
        if key in metadata:
            raise ModelError(f"{source}: metadata key {key!r} appears twice")
        vtype = s.u32(f"the value type of metadata {key!r}")
        if vtype == _ARRAY:
            itype = s.u32(f"the item type of metadata array {key!r}")
            count = s.u64(f"the length of metadata array {key!r}")
            if itype in _VALUE_SIZES:
                value = s.values(itype, count, f"metadata array {key!r} of {count} items")
            elif itype == _STRING:
                s.need(count * 8, f"metadata array {key!r} of {count} strings")
                value = [s.string(f"item {j} of metadata array {key!r}") for j in range(count)]
            elif itype == _ARRAY:
                raise ModelError(f"{source}: metadata {key!r} is an array of arrays, which GGUF readers do not support")
            else:
                raise ModelError(f"{source}: metadata array {key!r} has unknown item type {itype}")
        elif vtype == _STRING:
            value = s.string(f"the value of metadata {key!r}")
        elif vtype in _VALUE_SIZES:
            (value,) = s.values(vtype, 1, f"the value of metadata {key!r}")
            if vtype == _FLOAT32 and math.isfinite(value):
                value = float(str(np.float32(value)))
            if key == "general.alignment":
                if vtype != _UINT32:
                    raise ModelError(f"{source}: metadata 'general.alignment' has value type {vtype}, expected uint32")
                alignment = value
                if alignment == 0 or alignment & (alignment - 1):
                    raise ModelError(f"{source}: metadata 'general.alignment' is {alignment}, expected a power of two")
        else:
            raise ModelError(f"{source}: metadata {key!r} has unknown value type {vtype}")
        metadata[key] = value
    infos: dict[str, tuple] = {}
    for i in range(n_tensors):
        name = s.string(f"the name of tensor #{i}")
        if name in infos:
            raise ModelError(f"{source}: tensor {name!r} appears twice")
        n_dims = s.u32(f"the dimension count of tensor {name!r}")
        if not 1 <= n_dims <= _MAX_DIMS:
            raise ModelError(f"{source}: tensor {name!r} has {n_dims} dimensions, expected 1 to {_MAX_DIMS}")
        ne = tuple(s.u64(f"dimension {d} of tensor {name!r}") for d in range(n_dims))
        n = 1
        for d in ne:
            n *= d
            if d == 0 or n > _MAX_ELEMENTS:
                raise ModelError(f"{source}: tensor {name!r} has dimensions {list(ne)}, which are not a valid shape")
        ggml_type = s.u32(f"the type of tensor {name!r}")
        sizes = gguf.GGML_QUANT_SIZES.get(ggml_type)
        if sizes is None:
            raise ModelError(f"{source}: tensor {name!r} has unknown ggml type {ggml_type}")
        block, type_size = sizes
        if ne[0] % block:
            raise ModelError(
                f"{source}: tensor {name!r} of type {gguf.GGMLQuantizationType(ggml_type).name} has rows of "
                f"{ne[0]} values, not a multiple of its block size {block}"
            )
        offset = s.u64(f"the data offset of tensor {name!r}")
        infos[name] = (ggml_type, ne, offset, n // block * type_size)
    data_start = -(-s.pos // alignment) * alignment
    for name, (_, _, offset, nbytes) in infos.items():
        if offset % alignment:
            raise ModelError(
                f"{source}: tensor {name!r} data offset {offset} is not a multiple of the alignment {alignment}"
            )
        if data_start + offset + nbytes > size:
            raise ModelError(
                f"{source}: tensor {name!r} data [{data_start + offset}, {data_start + offset + nbytes}) extends past "
                f"the end of the file ({size} bytes); the file is truncated or corrupt"
            )
    tensors = {k: (t, ne, data_start + off, nb) for k, (t, ne, off, nb) in infos.items()}
    return version, metadata, tensors, data_start


def read_gguf(path: str | os.PathLike) -> GGUFFile:
    """Parse a GGUF file's header (metadata and tensor infos), validated; no tensor data is read."""
    gguf = _gguf()
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise NotFoundError(f"GGUF file {path!r} does not exist")
    source = f"GGUF file {path!r}"
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size < 24:
                raise ModelError(f"{source}: file is truncated: {size} bytes is shorter than a GGUF header (24 bytes)")
            with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                version, metadata, scanned, _ = _scan_header(buf, size, source, gguf)
    except OSError as e:
        raise ModelError(f"{source}: cannot read the file: {e}") from None
    tensors = {}
    for name, (ggml_type, ne, offset, nbytes) in scanned.items():
        type_name = gguf.GGMLQuantizationType(ggml_type).name
        tensors[name] = GGUFTensorInfo(name=name, ggml_type=ggml_type, type_name=type_name, shape=tuple(reversed(ne)),
                                       offset=offset, nbytes=nbytes)
    return GGUFFile(path=path, version=version, metadata=metadata, tensors=tensors, file_size=size)


# -- config -----------------------------------------------------------------------------------------


class _Meta:
    """Typed reads of GGUF metadata; a missing or bad value raises `ModelError` naming the key and value."""

    def __init__(self, metadata: Mapping[str, Any], source: str):
        self.md, self.source = metadata, source

    def bad(self, key: str, expected: str) -> ModelError:
        return ModelError(f"{self.source}: metadata {key!r} is {_show(self.md[key])}, expected {expected}")

    def get(self, key: str, kind: str, *, required: bool = False, default: Any = None) -> Any:
        if key not in self.md:
            if required:
                raise ModelError(f"{self.source}: metadata lacks required key {key!r}")
            return default
        v = self.md[key]
        if kind == "pos_int":
            if not _is_int(v) or not 0 < v < 1 << 31:
                raise self.bad(key, "a positive int below 2**31")
        elif kind == "id":
            if not _is_int(v) or v < 0:
                raise self.bad(key, "a token id")
        elif kind == "float":
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise self.bad(key, "a positive finite number")
            v = float(v)
        elif kind == "str":
            if not isinstance(v, str):
                raise self.bad(key, "a string")
        elif kind == "bool":
            if not isinstance(v, bool):
                raise self.bad(key, "true or false")
        elif kind == "strings":
            if not isinstance(v, list) or not all(isinstance(t, str) for t in v):
                raise self.bad(key, "an array of strings")
        elif kind == "ints":
            if not isinstance(v, list) or not all(_is_int(t) for t in v):
                raise self.bad(key, "an array of ints")
        elif kind == "floats":
            if not isinstance(v, list) or not all(isinstance(t, (int, float)) and not isinstance(t, bool) for t in v):
                raise self.bad(key, "an array of numbers")
        return v


def _arch(metadata: Mapping[str, Any], source: str) -> str:
    arch = _Meta(metadata, source).get("general.architecture", "str", required=True)
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelError(
            f"{source}: architecture {arch!r} (metadata 'general.architecture') is not supported; "
            f"expected one of {SUPPORTED_ARCHITECTURES}"
        )
    return arch


def _shape(t: Any) -> tuple[int, ...]:
    return tuple(t.shape) if hasattr(t, "shape") else tuple(t)


def special_token_id(metadata: Mapping[str, Any], name: str, vocab_size: Optional[int] = None,
                     source: str = "GGUF metadata") -> Optional[int]:
    """`tokenizer.ggml.{name}_token_id`, or None when absent; an id outside the vocabulary is dropped with a
    warning, as llama.cpp does (some converters write -1 as uint32 for "none")."""
    key = f"tokenizer.ggml.{name}_token_id"
    v = _Meta(metadata, source).get(key, "id")
    if v is not None and vocab_size is not None and v >= vocab_size:
        warnings.warn(f"{source}: metadata {key!r} is {v}, outside the vocabulary of {vocab_size}; ignoring it",
                      stacklevel=3)
        return None
    return v


def eos_token_ids(metadata: Mapping[str, Any], vocab_size: Optional[int] = None,
                  source: str = "GGUF metadata") -> tuple[int, ...]:
    """The end-of-generation ids the metadata names (eos, then eot and eom when given), without repeats."""
    ids = []
    for name in ("eos", "eot", "eom"):
        v = special_token_id(metadata, name, vocab_size, source)
        if v is not None and v not in ids:
            ids.append(v)
    return tuple(ids)


def gguf_config(
    metadata: Mapping[str, Any], tensors: Optional[Mapping[str, Any]] = None, *,
    rope_freqs: Optional[np.ndarray] = None, source: str = "GGUF metadata",
) -> LlamaConfig:
    """The `LlamaConfig` a GGUF's metadata describes, validated as `config.json` is.

    `tensors` (name -> info or shape) gives the vocabulary (token_embd's rows), tied embeddings (no
    output.weight) and biases (attn_q.bias, attn_output.bias, ffn_gate.bias); without it they come from
    `{arch}.vocab_size` or the token list, untied, and the architecture's default. `rope_freqs` is the
    `rope_freqs.weight` tensor's values, when the file has one (Llama-3 RoPE scaling).
    """
    arch = _arch(metadata, source)
    m = _Meta(metadata, source)
    p = arch + "."
    if m.get(p + "expert_count", "id", default=0):
        raise ModelError(f"{source}: mixture-of-experts models ({p}expert_count={metadata[p + 'expert_count']}) are "
                         f"not supported")
    hidden = m.get(p + "embedding_length", "pos_int", required=True)
    heads = m.get(p + "attention.head_count", "pos_int", required=True)
    kv_heads = m.get(p + "attention.head_count_kv", "pos_int", default=heads)
    head_dim = m.get(p + "attention.key_length", "pos_int")
    value_len = m.get(p + "attention.value_length", "pos_int")
    derived = head_dim if head_dim is not None else (hidden // heads if hidden % heads == 0 else None)
    if value_len is not None and derived is not None and value_len != derived:
        raise ModelError(f"{source}: metadata {p + 'attention.value_length'!r} is {value_len}, but keys have "
                         f"{derived} dims; different key and value head sizes are not supported")
    rope_dims = m.get(p + "rope.dimension_count", "pos_int")
    if rope_dims is not None and derived is not None and rope_dims != derived:
        raise ModelError(f"{source}: metadata {p + 'rope.dimension_count'!r} is {rope_dims}, but heads have "
                         f"{derived} dims; partial rotary embeddings are not supported")
    names = {} if tensors is None else tensors
    layers = m.get(p + "block_count", "pos_int", required=True)
    # LlamaConfig holds a per-layer tuple: bound the count by what the file can hold before building one.
    have = len({k.split(".")[1] for k in names if k.startswith("blk.") and k.count(".") >= 2})
    if layers > (have if tensors is not None else _MAX_LAYERS):
        where = f"the file has tensors for {have} layers" if tensors is not None else f"at most {_MAX_LAYERS} are"
        raise ModelError(f"{source}: metadata {p + 'block_count'!r} is {layers}, but {where}")
    if "token_embd.weight" in names:
        emb = _shape(names["token_embd.weight"])
        if len(emb) != 2 or emb[1] != hidden:
            raise ModelError(f"{source}: tensor 'token_embd.weight' has shape {list(emb)}, expected [vocab, {hidden}]")
        vocab = emb[0]
    elif tensors is not None:
        raise ModelError(f"{source}: tensor 'token_embd.weight' is missing")
    else:
        vocab = m.get(p + "vocab_size", "pos_int")
        if vocab is None:
            vocab = len(m.get("tokenizer.ggml.tokens", "strings", required=True))
    rope: dict[str, Any] = {}
    scaling = m.get(p + "rope.scaling.type", "str", default="none")
    factor = m.get(p + "rope.scaling.factor", "float")
    if scaling == "none" and m.get(p + "rope.scale_linear", "float") is not None:
        scaling, factor = "linear", m.get(p + "rope.scale_linear", "float")
    if scaling == "linear":
        if factor is None:
            raise ModelError(f"{source}: linear RoPE scaling needs metadata {p + 'rope.scaling.factor'!r}")
        if factor != 1.0:
            rope = {"rope_type": "linear", "factor": factor}
    elif scaling != "none":
        raise ModelError(f"{source}: metadata {p + 'rope.scaling.type'!r} is {scaling!r}; only 'none' and 'linear' "
                         f"RoPE scaling (and Llama-3's rope_freqs tensor) are supported")
    window = m.get(p + "attention.sliding_window", "pos_int")
    model_type = "mistral" if arch == "mistral" or window is not None else arch
    if arch == "qwen2" and window is not None:
        model_type = "qwen2"
    bias = "blk.0.attn_q.bias" in names if tensors is not None else arch == "qwen2"
    d = {
        "model_type": model_type,
        "hidden_size": hidden,
        "intermediate_size": m.get(p + "feed_forward_length", "pos_int", required=True),
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "vocab_size": vocab,
        "max_position_embeddings": m.get(p + "context_length", "pos_int", default=2048),
        "rms_norm_eps": m.get(p + "attention.layer_norm_rms_epsilon", "float", required=True),
        "rope_theta": m.get(p + "rope.freq_base", "float", default=10000.0),
        "rope_scaling": rope or None,
        "tie_word_embeddings": tensors is not None and "output.weight" not in names,
        "attention_bias": bias,
        "mlp_bias": "blk.0.ffn_gate.bias" in names,
        "bos_token_id": special_token_id(metadata, "bos", vocab, source),
        "eos_token_id": list(eos_token_ids(metadata, vocab, source)),
        "pad_token_id": special_token_id(metadata, "padding", vocab, source),
        "torch_dtype": "float32",
    }
    if window is not None and model_type == "mistral":
        d["sliding_window"] = window
    if window is not None and model_type == "qwen2":
        d.update(sliding_window=window, use_sliding_window=True, max_window_layers=0)
    where = f"{source} (metadata read as config.json fields)"
    cfg = LlamaConfig.from_hf_dict(d, source=where)
    if rope_freqs is not None:
        if rope:
            raise ModelError(f"{source}: has both a rope_freqs tensor and {scaling} RoPE scaling; expected one")
        d["rope_scaling"] = _llama3_from_factors(cfg, np.asarray(rope_freqs, np.float32), source,
                                                 m.get(p + "rope.scaling.original_context_length", "pos_int"))
        cfg = LlamaConfig.from_hf_dict(d, source=where)
    return cfg


def _llama3_factors(cfg: LlamaConfig) -> np.ndarray:
    """llama.cpp's rope_freqs for a config: default inverse frequencies / scaled ones."""
    base = dataclasses.replace(cfg, rope_scaling=()).inv_freq()
    return (base / cfg.inv_freq()).astype(np.float32)


def _llama3_from_factors(cfg: LlamaConfig, factors: np.ndarray, source: str, ctx_hint: Optional[int]):
    """transformers' llama3 rope_scaling reproducing llama.cpp's per-frequency divisors, or None if all are 1.

    The divisors only fix factor, original_ctx / low_freq_factor and original_ctx / high_freq_factor, so
    low_freq_factor is taken as 1 unless the usual (1, 4) parameters already reproduce them.
    """
    half = cfg.head_dim // 2
    if factors.shape != (half,) or not np.all(np.isfinite(factors)) or np.any(factors <= 0):
        raise ModelError(f"{source}: tensor 'rope_freqs.weight' has shape {list(factors.shape)} or non-positive "
                         f"values, expected {half} positive divisors")
    if np.allclose(factors, 1.0, rtol=0, atol=1e-6):
        return None
    factor = float(factors.max())
    wavelen = 2 * math.pi / dataclasses.replace(cfg, rope_scaling=()).inv_freq().astype(np.float64)
    candidates = [(1.0, 4.0, c) for c in dict.fromkeys([ctx_hint, 8192]) if c is not None]
    medium = (factors > 1 + 1e-5) & (factors < factor * (1 - 1e-5))
    if medium.sum() >= 2:
        smooth = (1 / factors[medium] - 1 / factor) / (1 - 1 / factor)
        try:
            slope, icpt = np.polyfit(1 / wavelen[medium], smooth.astype(np.float64), 1)
        except (ValueError, np.linalg.LinAlgError):
            slope = icpt = 0.0
        if icpt < 0 < slope:
            high = 1 - 1 / icpt
            candidates.append((1.0, float(high), int(round(slope * (high - 1)))))
    elif medium.sum() == 0:
        ones, scaled = wavelen[factors <= 1 + 1e-5], wavelen[factors >= factor * (1 - 1e-5)]
        if len(ones) and len(scaled) and ones.max() < scaled.min():
            w1, w2 = ones.max(), scaled.min()
            old = int(round(w1 + 2 * (w2 - w1) / 3))
            candidates.append((1.0, float(old / (w1 + (w2 - w1) / 3)), old))
    for low, high, old in candidates:
        if old <= 0 or not high > low:
            continue
        rope = {"rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
                "original_max_position_embeddings": old}
        try:
            trial = dataclasses.replace(cfg, rope_scaling=tuple(sorted(rope.items())))
        except ModelError:
            continue
        if np.allclose(_llama3_factors(trial), factors, rtol=1e-4, atol=0):
            return rope
    raise ModelError(f"{source}: tensor 'rope_freqs.weight' holds RoPE divisors that no llama3 rope_scaling "
                     f"reproduces (first values {factors[:4].tolist()}); other RoPE scalings are not supported")


# -- tokenizer --------------------------------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map, the alphabet byte-level BPE tokens are spelled in."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


SUPPORTED_TOKENIZERS = ("gpt2", "llama")


def tokenizer_from_gguf(metadata: Mapping[str, Any], *, source: str = "GGUF metadata"):
    """A `tokenizers.Tokenizer` for the vocabulary a GGUF's metadata holds (`tokenizer.ggml.model`).

    "gpt2", byte-level BPE: tokens and merges as stored; the pre-tokenizer follows `tokenizer.ggml.pre`
    (Llama-3's and Qwen2's splits; GPT-2's for "gpt2", "default" or none, and, with a warning, for
    others). "llama", SentencePiece: tokens and scores, as a BPE whose merges are ranked by the merged
    piece's score (what llama.cpp's SPM tokenizer and transformers' conversion do), byte fallback to the
    <0xXX> tokens, "▁" for spaces, and a prefix space per `tokenizer.ggml.add_space_prefix` (default on)
    before the text and after each special token, as llama.cpp and the original Llama tokenizer.json add
    it (transformers' GGUF tokenizer adds it only at the very start, and not before a leading space).

    In both, CONTROL (and UNKNOWN) tokens become special added tokens and USER_DEFINED ones plain
    added tokens, so both are matched whole in text, as llama.cpp does. BOS/EOS are added per
    `tokenizer.ggml.add_bos_token` / `add_eos_token` (by default BOS for SentencePiece and Llama-3's
    pre-tokenizer, as llama.cpp does).
    """
    from tokenizers import AddedToken, processors

    m = _Meta(metadata, source)
    model = m.get("tokenizer.ggml.model", "str", required=True)
    if model not in SUPPORTED_TOKENIZERS:
        raise ModelError(f"{source}: tokenizer model {model!r} (metadata 'tokenizer.ggml.model') is not supported; "
                         f"expected one of {SUPPORTED_TOKENIZERS}")
    tokens = m.get("tokenizer.ggml.tokens", "strings", required=True)
    if not tokens:
        raise ModelError(f"{source}: metadata 'tokenizer.ggml.tokens' is empty")
    types = m.get("tokenizer.ggml.token_type", "ints", default=[_TOKEN_NORMAL] * len(tokens))
    if len(types) != len(tokens):
        raise ModelError(f"{source}: metadata 'tokenizer.ggml.token_type' has {len(types)} entries for "
                         f"{len(tokens)} tokens")
    pre = m.get("tokenizer.ggml.pre", "str")
    with warnings.catch_warnings():  # gguf_config warns about these once
        warnings.simplefilter("ignore")
        bos, eos, unk = (special_token_id(metadata, k, len(tokens), source) for k in ("bos", "eos", "unknown"))
    add_bos = m.get("tokenizer.ggml.add_bos_token", "bool", default=model == "llama" or pre in _LLAMA3_PRES)
    add_eos = m.get("tokenizer.ggml.add_eos_token", "bool", default=False)
    special = [t for t, k in zip(tokens, types, strict=True) if k in (_TOKEN_CONTROL, _TOKEN_UNKNOWN)]
    added = [t for t, k in zip(tokens, types, strict=True) if k == _TOKEN_USER_DEFINED]
    try:
        if model == "gpt2":
            tok = _byte_level_bpe(m, tokens, types, pre, source)
        else:
            tok = _sentencepiece_bpe(m, tokens, types, unk, source)
        if special:
            tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
        if added:
            tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in added])
        if (add_bos and bos is not None) or (add_eos and eos is not None):
            pieces = {"bos": (tokens[bos], bos) if add_bos and bos is not None else None,
                      "eos": (tokens[eos], eos) if add_eos and eos is not None else None}
            single, pair = _template(pieces)
            tok.post_processor = processors.TemplateProcessing(
                single=single, pair=pair, special_tokens=[p for p in pieces.values() if p is not None])
    except (ModelError, KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # the Rust side raises plain Exceptions, and a pyo3 panic is a BaseException
        raise ModelError(f"{source}: the tokenizer metadata does not form a valid {model} tokenizer: {e}") from None
    if tok.get_vocab_size(with_added_tokens=True) > len(tokens):
        raise ModelError(f"{source}: the tokenizer has {tok.get_vocab_size(with_added_tokens=True)} tokens, more than "
                         f"the {len(tokens)} the metadata lists")
    return tok


def _byte_level_bpe(m: _Meta, tokens: list[str], types: list[int], pre: Optional[str], source: str):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    merges = []
    for i, merge in enumerate(m.get("tokenizer.ggml.merges", "strings", default=[])):
        parts = merge.split(" ")
        if len(parts) != 2 or not all(parts):
            raise ModelError(f"{source}: merge {i} of 'tokenizer.ggml.merges' is {merge!r}, expected 'left right'")
        merges.append((parts[0], parts[1]))
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab: dict[str, int] = {}
    for i, (tok, kind) in enumerate(zip(tokens, types, strict=True)):
        # Added tokens keep their literal text, so adding them reuses this id rather than growing the vocab.
        if kind not in (_TOKEN_CONTROL, _TOKEN_UNKNOWN, _TOKEN_USER_DEFINED) and not set(tok) <= alphabet:
            tok = "".join(spelling[b] for b in tok.encode("utf-8"))
        vocab.setdefault(tok, i)
    split = PRE_TOKENIZER_SPLITS.get(pre)
    if split is None and pre not in _GPT2_PRES:
        warnings.warn(f"{source}: pre-tokenizer {pre!r} (metadata 'tokenizer.ggml.pre') is not known; "
                      f"splitting text as GPT-2 does, which may tokenize some text differently", stacklevel=4)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=pre in _LLAMA3_PRES, fuse_unk=False,
                               byte_fallback=False))
    if split is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    tok.decoder = decoders.ByteLevel()
    return tok


def _sentencepiece_bpe(m: _Meta, tokens: list[str], types: list[int], unk: Optional[int], source: str):
    from tokenizers import Tokenizer, decoders, models, normalizers

    scores = m.get("tokenizer.ggml.scores", "floats", required=True)
    if len(scores) != len(tokens):
        raise ModelError(f"{source}: metadata 'tokenizer.ggml.scores' has {len(scores)} entries for "
                         f"{len(tokens)} tokens")
    vocab: dict[str, int] = {}
    for i, tok in enumerate(tokens):
        vocab.setdefault(tok, i)
    # Every split of a piece into two pieces is a merge, ranked by the whole piece's score (ties: longer
    # left part first), as transformers' generate_merges ranks them.
    merges = []
    for tok, i in vocab.items():
        if len(tok) > _MAX_PIECE:
            continue  # SentencePiece pieces are short; a long one would cost O(len**2) here
        local = [(tok[:k], tok[k:]) for k in range(1, len(tok)) if tok[:k] in vocab and tok[k:] in vocab]
        local.sort(key=lambda lr: (vocab[lr[0]], vocab[lr[1]]))
        merges.extend((float(scores[i]), len(lt), len(rt), lt, rt) for lt, rt in local)
    merges.sort(key=lambda x: (x[0], x[1], x[2]), reverse=True)
    prefix = m.get("tokenizer.ggml.add_space_prefix", "bool", default=True)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[(lt, rt) for *_, lt, rt in merges], fuse_unk=True,
                               byte_fallback=True, unk_token=tokens[unk] if unk is not None else None))
    # Normalizing (not Metaspace) adds the prefix space to every text segment, even one already starting with
    # a space, and after each special token: what llama.cpp and the original (legacy) Llama tokenizer.json do.
    spaces = [normalizers.Replace(" ", "\u2581")]
    tok.normalizer = normalizers.Sequence(([normalizers.Prepend("\u2581")] if prefix else []) + spaces)
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps + ([decoders.Strip(content=" ", left=1, right=0)] if prefix else []))
    return tok


def _template(pieces: dict) -> tuple[list[str], list[str]]:
    """TemplateProcessing single / pair templates with BOS and/or EOS, as transformers builds them."""
    bos, eos = pieces["bos"], pieces["eos"]
    single = ([f"{bos[0]}:0"] if bos else []) + ["$A:0"] + ([f"{eos[0]}:0"] if eos else [])
    pair = single + ([f"{bos[0]}:1"] if bos else []) + ["$B:1"] + ([f"{eos[0]}:1"] if eos else [])
    return single, pair


# -- loading ----------------------------------------------------------------------------------------


_DEQUANTIZABLE: dict[int, bool] = {}


def _dequantizable(gguf, ggml_type: int) -> bool:
    """Whether gguf's numpy dequantizer handles this type (tried once on one zero block)."""
    if ggml_type not in _DEQUANTIZABLE:
        block, type_size = gguf.GGML_QUANT_SIZES[ggml_type]
        try:
            gguf.quants.dequantize(np.zeros((1, type_size), np.uint8), gguf.GGMLQuantizationType(ggml_type))
            _DEQUANTIZABLE[ggml_type] = True
        except Exception:
            _DEQUANTIZABLE[ggml_type] = False
    return _DEQUANTIZABLE[ggml_type]


def _storage(info: GGUFTensorInfo) -> str:
    """How a tensor is held after a plain load: its block format, or the float dtype's name."""
    if info.type_name in FORMATS:
        return info.type_name
    if info.ggml_type in _FLOAT_DTYPES:
        return _FLOAT_DTYPES[info.ggml_type].name
    return "float32"  # dequantized at load


class _Reader:
    """Reads tensor bytes with plain `readinto` into caller-owned buffers."""

    def __init__(self, fh, source: str, gguf):
        self.fh, self.source, self.gguf = fh, source, gguf

    def readinto(self, offset: int, buf: np.ndarray, name: str) -> None:
        mv = memoryview(buf.reshape(-1).view(np.uint8))
        self.fh.seek(offset)
        done = 0
        while done < mv.nbytes:
            n = self.fh.readinto(mv[done:])
            if not n:
                raise ModelError(f"{self.source}: tensor {name!r} ends past the end of the file (truncated "
                                 f"while loading)")
            done += n

    def raw(self, info: GGUFTensorInfo) -> np.ndarray:
        """The stored values in their native form: float [rows, cols] or block bytes [rows, row_bytes]."""
        rows = math.prod(info.shape[:-1]) if len(info.shape) > 1 else 1
        if info.ggml_type in _FLOAT_DTYPES:
            buf = np.empty(info.shape, _FLOAT_DTYPES[info.ggml_type])
        else:
            buf = np.empty((rows, info.nbytes // rows), np.uint8)
        self.readinto(info.offset, buf, info.name)
        return buf

    def floats(self, info: GGUFTensorInfo) -> np.ndarray:
        """The tensor dequantized or cast to float32, in its shape."""
        raw = self.raw(info)
        if info.ggml_type in _FLOAT_DTYPES:
            return raw.astype(np.float32, copy=False)
        out = self.gguf.quants.dequantize(raw, self.gguf.GGMLQuantizationType(info.ggml_type))
        return np.ascontiguousarray(out, np.float32).reshape(info.shape)

    def rows_into(self, info: GGUFTensorInfo, dest: np.ndarray, heads: Optional[int]) -> None:
        """Fill dest [rows, width] (the tensor's native form, or float32) with its rows, un-permuting
        llama.cpp's per-head RoPE row order when `heads` is given."""
        rows = info.shape[0]
        native = info.type_name in FORMATS or (
            info.ggml_type in _FLOAT_DTYPES and dest.dtype == _FLOAT_DTYPES[info.ggml_type])
        if not native:
            dest[...] = _unpermute(self.floats(info), heads) if heads else self.floats(info)
        elif not heads:
            self.readinto(info.offset, dest, info.name)
        else:  # one head at a time through a small bounce buffer
            d = rows // heads
            tmp = np.empty((d, dest.shape[1]), dest.dtype)
            step = info.nbytes // heads
            for h in range(heads):
                self.readinto(info.offset + h * step, tmp, info.name)
                dest[h * d : (h + 1) * d] = _unpermute(tmp, 1)


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter row order for attn_q/attn_k: per head, (half, pair) -> (pair, half)."""
    d = w.shape[0] // heads
    return w.reshape(heads, 2, d // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    d = w.shape[0] // heads
    return w.reshape(heads, d // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _names(i: int) -> dict[str, str]:
    p = f"blk.{i}."
    return {k: p + k for k in ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate",
                               "ffn_up", "ffn_down")}


def _expected(cfg: LlamaConfig, tensors: Mapping[str, GGUFTensorInfo]):
    """Every tensor the config needs, with its shape in our order; optional ones only where present.
    A generator, layer by layer, so a huge layer count fails at its first missing tensor."""
    d, inter, q, kv = cfg.hidden_size, cfg.intermediate_size, cfg.q_size, cfg.kv_size
    out = {"token_embd.weight": (cfg.vocab_size, d), "output_norm.weight": (d,)}
    if not cfg.tie_word_embeddings:
        out["output.weight"] = (cfg.vocab_size, d)
    yield from out.items()
    for i in range(cfg.num_layers):
        n = _names(i)
        out = {}
        out.update({
            n["attn_norm"] + ".weight": (d,), n["attn_q"] + ".weight": (q, d), n["attn_k"] + ".weight": (kv, d),
            n["attn_v"] + ".weight": (kv, d), n["attn_output"] + ".weight": (d, q), n["ffn_norm"] + ".weight": (d,),
            n["ffn_gate"] + ".weight": (inter, d), n["ffn_up"] + ".weight": (inter, d),
            n["ffn_down"] + ".weight": (d, inter),
        })
        if cfg.attention_bias:
            out.update({n["attn_q"] + ".bias": (q,), n["attn_k"] + ".bias": (kv,), n["attn_v"] + ".bias": (kv,)})
            if n["attn_output"] + ".bias" in tensors:
                out[n["attn_output"] + ".bias"] = (d,)
        if cfg.mlp_bias:
            out.update({n["ffn_gate"] + ".bias": (inter,), n["ffn_up"] + ".bias": (inter,),
                        n["ffn_down"] + ".bias": (d,)})
        yield from out.items()


def _check_tensors(f: GGUFFile, cfg: LlamaConfig, source: str, gguf) -> dict[str, list[str]]:
    """Check every needed tensor's presence, shape and type before reading any data; returns the
    types to be dequantized at load -> their tensors."""
    slow: dict[str, list[str]] = {}
    for name, shape in _expected(cfg, f.tensors):
        info = f.tensors.get(name)
        if info is None:
            raise ModelError(f"{source}: tensor {name!r} is missing")
        if info.shape != shape:
            raise ModelError(f"{source}: tensor {name!r} has shape {list(info.shape)}, expected {list(shape)} "
                             f"for this config")
        if info.type_name in FORMATS or info.ggml_type in _FLOAT_DTYPES:
            continue
        if not _dequantizable(gguf, info.ggml_type):
            raise ModelError(f"{source}: tensor {name!r} has ggml type {info.type_name}, which cannot be loaded "
                             f"(supported: F32, F16, BF16, {', '.join(FORMATS)}, and types gguf dequantizes)")
        if len(shape) == 2:
            slow.setdefault(info.type_name, []).append(name)
    return slow


def load_gguf(
    path: str | os.PathLike, *, quantization=None, device=None, check_config=None, layout=None,
) -> tuple[LlamaConfig, dict[str, Any], Optional[Any], tuple[int, ...]]:
    """(config, params, tokenizer or None, eos ids) from a GGUF file, params in our fused layout.

    quantization=None keeps each weight as stored: F32/F16/BF16 as float32/float16/bfloat16 arrays,
    Q8_0/Q4_1/Q5_0/Q4_K/Q6_K as `QuantizedTensor`s of the file's block bytes, other types gguf can
    dequantize as float32 (with one warning). A `Precision` converts every 2-D weight with
    `ruvllm_jax.quant.convert.to_precision`. Norms and biases are always float32. Q/K/V and gate/up
    are fused when their storage agrees and kept as a tuple of parts otherwise (e.g. a Q4_K_M file's
    Q6_K attn_v), in every layer when any layer's storage disagrees (so all layers share one
    structure and scan together). The tokenizer is None, with a warning, when the file's tokenizer
    model is not supported.
    `check_config(cfg)`, if given, runs on the file's config before any weight is read. `layout`
    (a `ruvllm_jax.sharding.ModelSharding`, or a callable cfg -> one) places every tensor straight
    onto its shards of a mesh, q/k/v and gate/up one part per module; `device` is then ignored.
    """
    from ruvllm_jax.backend.tokenizer import Tokenizer

    gguf = _gguf()
    f = read_gguf(path)
    source = f"GGUF file {f.path!r}"
    tensors = f.tensors
    rope_freqs = None
    if "rope_freqs.weight" in tensors:
        info = tensors["rope_freqs.weight"]
        if len(info.shape) != 1 or not (info.ggml_type in _FLOAT_DTYPES or _dequantizable(gguf, info.ggml_type)):
            raise ModelError(f"{source}: tensor 'rope_freqs.weight' has shape {list(info.shape)} and type "
                             f"{info.type_name}, expected a 1-D float tensor")
        with open(f.path, "rb", buffering=0) as fh:
            rope_freqs = _Reader(fh, source, gguf).floats(info)
    cfg = gguf_config(f.metadata, tensors, rope_freqs=rope_freqs, source=source)
    if check_config is not None:  # the caller's refusals come before any weight is read
        check_config(cfg)
    if callable(layout):
        layout = layout(cfg)
    slow = _check_tensors(f, cfg, source, gguf)
    tokenizer = _load_tokenizer(f.metadata, cfg, source, Tokenizer)
    if slow:
        listed = "; ".join(f"{t}: {', '.join(names[:4])}{', ...' if len(names) > 4 else ''} ({len(names)} tensors)"
                           for t, names in slow.items())
        warnings.warn(f"{source}: ggml types without a native kernel are dequantized to float32 at load ({listed})",
                      stacklevel=2)
    permute = cfg.model_type in ("llama", "mistral")
    with open(f.path, "rb", buffering=0) as fh:
        r = _Reader(fh, source, gguf)
        load = _Loader(r, tensors, device, quantization, f.path, layout)
        params: dict[str, Any] = {
            "embed": load.weights(["token_embd.weight"], roles=("embed",)),
            "final_norm": load.vector(["output_norm.weight"]),
        }
        # A fused weight whose parts some layer stores in different formats (a Q4_K_M file's attn_v)
        # is kept as parts in every layer: the layers then share one structure, and the model runs
        # them as one scan (see `llama._layer_runs`) instead of a run per structure.
        split = {group: any(load.parts_differ([_names(i)[g] + ".weight" for g in group])
                            for i in range(cfg.num_layers))
                 for group in (("attn_q", "attn_k", "attn_v"), ("ffn_gate", "ffn_up"))}
        layers = []
        for i in range(cfg.num_layers):
            n = {k: v + ".weight" for k, v in _names(i).items()}
            b = {k: v + ".bias" for k, v in _names(i).items()}
            qkv_heads = (cfg.num_heads, cfg.num_kv_heads, None) if permute else (None, None, None)
            lp = {
                "attn_norm": load.vector([n["attn_norm"]]),
                "wqkv": load.weights([n["attn_q"], n["attn_k"], n["attn_v"]], qkv_heads, roles=("q", "k", "v"),
                                     split=split["attn_q", "attn_k", "attn_v"]),
                "wo": load.weights([n["attn_output"]], roles=("o",)),
                "mlp_norm": load.vector([n["ffn_norm"]]),
                "w_gate_up": load.weights([n["ffn_gate"], n["ffn_up"]], roles=("gate", "up"),
                                          split=split["ffn_gate", "ffn_up"]),
                "w_down": load.weights([n["ffn_down"]], roles=("down",)),
            }
            if cfg.attention_bias:
                lp["bqkv"] = load.vector([b["attn_q"], b["attn_k"], b["attn_v"]], qkv_heads)
                if b["attn_output"] in tensors:
                    lp["bo"] = load.vector([b["attn_output"]])
            if cfg.mlp_bias:
                lp["b_gate_up"] = load.vector([b["ffn_gate"], b["ffn_up"]])
                lp["b_down"] = load.vector([b["ffn_down"]])
            layers.append(lp)
        params["layers"] = tuple(layers)
        if not cfg.tie_word_embeddings:
            params["lm_head"] = load.weights(["output.weight"], roles=("lm_head",))
    return cfg, params, tokenizer, cfg.eos_token_ids


def _load_tokenizer(metadata, cfg: LlamaConfig, source: str, wrapper):
    """Our Tokenizer for the file's vocabulary; None (warned) when the file has none or an unsupported one."""
    model = metadata.get("tokenizer.ggml.model")
    if model is None:
        warnings.warn(f"{source}: the file holds no tokenizer (no 'tokenizer.ggml.model'); loading without one",
                      stacklevel=3)
        return None
    if model not in SUPPORTED_TOKENIZERS:
        warnings.warn(f"{source}: tokenizer model {model!r} is not supported (supported: {SUPPORTED_TOKENIZERS}); "
                      f"loading without a tokenizer", stacklevel=3)
        return None
    tok = tokenizer_from_gguf(metadata, source=source)
    n = len(metadata["tokenizer.ggml.tokens"])
    if n > cfg.vocab_size:
        raise ModelError(f"{source}: the tokenizer lists {n} tokens, more than the model's {cfg.vocab_size} "
                         f"embedding rows")
    return wrapper(tok, bos_token_id=cfg.bos_token_id, eos_token_ids=cfg.eos_token_ids)


class _Loader:
    """Builds params entries through `weights_io`: each kept weight is one aligned buffer filled in
    place from the file (row chunks converted on the way when asked), so the load holds one copy."""

    def __init__(self, reader: _Reader, tensors: Mapping[str, GGUFTensorInfo], device, quantization, path: str,
                 layout=None):
        self.r, self.tensors, self.device, self.quantization, self.path = reader, tensors, device, quantization, path
        self.layout = layout

    def vector(self, names: Sequence[str], heads: Sequence[Optional[int]] = ()) -> jax.Array:
        parts = []
        for name, h in zip(names, _pad(heads, len(names)), strict=True):
            v = self.r.floats(self.tensors[name])
            parts.append(_unpermute(v, h) if h else v)
        out = weights_io.aligned_empty((sum(len(p) for p in parts),), np.float32)
        out[...] = np.concatenate(parts) if len(parts) > 1 else parts[0]
        return weights_io.place(out, self.device if self.layout is None else self.layout.replicated)

    def source(self, info: GGUFTensorInfo, heads: Optional[int]) -> weights_io.RowSource:
        """The tensor's rows as stored (types without a kernel: dequantized to float32 per chunk),
        with llama.cpp's per-head RoPE row order undone when `heads` is given."""
        kind = info.type_name
        if kind in FORMATS or kind in weights_io.FLOAT_KINDS:
            src = weights_io.file_rows(self.path, info.offset, info.name, kind, info.shape)
        else:
            row_bytes = info.nbytes // info.shape[0]
            qtype = self.r.gguf.GGMLQuantizationType(info.ggml_type)

            def read(start: int, stop: int, info=info, row_bytes=row_bytes, qtype=qtype):
                raw = np.empty((stop - start, row_bytes), np.uint8)
                self.r.readinto(info.offset + start * row_bytes, raw, info.name)
                return np.asarray(self.r.gguf.quants.dequantize(raw, qtype), np.float32).reshape(stop - start, -1)

            src = weights_io.RowSource(info.name, "F32", info.shape, read)
        if heads:
            d = info.shape[0] // heads
            src = weights_io.permuted_rows(src, np.concatenate([np.arange(0, d, 2), np.arange(1, d, 2)]))
        return src

    def weights(self, names: Sequence[str], heads: Sequence[Optional[int]] = (), *, roles: Sequence[str],
                split: bool = False):
        """One kept weight from `names` stacked along rows (one part per name on a mesh's layout, or
        when `split`, as `parts_differ` asks for some layer)."""
        srcs = [self.source(self.tensors[n], h) for n, h in zip(names, _pad(heads, len(names)), strict=True)]
        if self.layout is not None:
            parts = tuple(self._kept([s], self.layout.placer(role)) for s, role in zip(srcs, roles, strict=True))
            return parts[0] if len(parts) == 1 else parts
        return self._kept(srcs, self.device, split)

    @staticmethod
    def _kind(info: GGUFTensorInfo) -> str:
        """The kind `source` keeps a tensor in: its own block or float type, else float32."""
        kind = info.type_name
        return kind if kind in FORMATS or kind in weights_io.FLOAT_KINDS else "F32"

    def parts_differ(self, names: Sequence[str]) -> bool:
        """Whether the tensors `names`, kept as they are, would make a tuple of parts (formats differ)."""
        if self.quantization is not None or self.layout is not None:
            return False
        kinds = {self._kind(self.tensors[n]) for n in names}
        return len(kinds) > 1 and bool(kinds & set(FORMATS))

    def _kept(self, srcs: Sequence[weights_io.RowSource], device, split: bool = False):
        cols = srcs[0].shape[1]
        q = self.quantization
        if q is not None:
            return weights_io.materialize(srcs, weights_io.weight_kind(q, "F32", cols), device)
        kinds = {s.kind for s in srcs}
        if split and len(srcs) > 1:
            return tuple(weights_io.materialize([s], s.kind, device) for s in srcs)
        if len(kinds) == 1:
            return weights_io.materialize(srcs, kinds.pop(), device)
        if not kinds & set(FORMATS):  # floats of different widths fuse as float32
            return weights_io.materialize(srcs, "F32", device)
        return tuple(weights_io.materialize([s], s.kind, device) for s in srcs)


def _pad(heads: Sequence[Optional[int]], n: int) -> list[Optional[int]]:
    return (list(heads) + [None] * n)[:n]


# -- saving -----------------------------------------------------------------------------------------


def _quantize(w: np.ndarray, qtype: str) -> np.ndarray:
    """Block bytes [rows, row_bytes] of a float32 [rows, cols] matrix."""
    from ruvllm_jax.quant import formats

    return np.asarray(formats.quantize(w, qtype).data, np.uint8)


def _dequantize(qt: QuantizedTensor) -> np.ndarray:
    from ruvllm_jax.quant import formats

    return np.asarray(formats.dequantize(qt), np.float32)


def _host(w) -> Any:
    """A weight on the host: QuantizedTensor with numpy data, or a float32 array."""
    if isinstance(w, QuantizedTensor):
        return QuantizedTensor(np.asarray(jax.device_get(w.data)), w.qtype, w.shape)
    return np.asarray(jax.device_get(w), np.float32)


def _target(qtype: str, cols: int) -> str:
    """The type a 2-D weight is written in: `qtype`, or the next one its row length allows."""
    chain = {"Q4_K": ("Q4_K", "Q5_0", "F16"), "Q8_0": ("Q8_0", "F16")}.get(qtype, (qtype,))
    for t in chain:
        if t not in FORMATS or cols % FORMATS[t].block_size == 0:
            return t
    return "F16"


def _split_rows(w, sizes: Sequence[int], what: str) -> list:
    """A (fused) weight's row blocks: QuantizedTensor rows, array rows, or a tuple's parts as they are."""
    if isinstance(w, tuple):
        if [p.shape[0] for p in w] != list(sizes):
            raise ModelError(f"params {what} has parts of {[p.shape[0] for p in w]} rows, expected {list(sizes)}")
        return list(w)
    bounds = np.cumsum([0, *sizes])
    if w.shape[0] != bounds[-1]:
        raise ModelError(f"params {what} has {w.shape[0]} rows, expected {' + '.join(map(str, sizes))}")
    spans = list(zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True))
    if isinstance(w, QuantizedTensor):
        return [QuantizedTensor(w.data[a:b], w.qtype, (b - a, w.shape[1])) for a, b in spans]
    return [w[a:b] for a, b in spans]


@dataclasses.dataclass
class _Out:
    """One tensor to write: its name, file type, host value source and optional RoPE permutation heads."""

    name: str
    ggml: str
    shape: tuple[int, ...]  # our order
    value: Any
    heads: Optional[int] = None


def _file_array(o: _Out) -> np.ndarray:
    """The bytes-ready array of one tensor in its file type (rows permuted for llama's q/k)."""
    w = _host(o.value)
    if o.ggml in FORMATS and isinstance(w, QuantizedTensor) and w.qtype == o.ggml:
        arr = w.data
    else:
        x = _dequantize(w) if isinstance(w, QuantizedTensor) else w
        x = np.ascontiguousarray(x, np.float32).reshape(o.shape)
        if o.ggml == "F32":
            arr = x
        elif o.ggml == "F16":
            arr = x.astype(np.float16)
        elif o.ggml == "BF16":
            arr = x.astype(ml_dtypes.bfloat16).view(np.uint16)
        else:
            arr = _quantize(x, o.ggml)
    if o.heads:
        arr = _permute(arr, o.heads)
    return np.ascontiguousarray(arr)


def _tensor_plan(params: Mapping[str, Any], cfg: LlamaConfig, qtype: str) -> list[_Out]:
    permute = cfg.model_type in ("llama", "mistral")
    d, inter = cfg.hidden_size, cfg.intermediate_size
    out: list[_Out] = []

    def weight(name, value, shape, heads=None):
        if tuple(value.shape) != shape:
            raise ModelError(f"params for GGUF tensor {name!r} have shape {list(value.shape)}, expected {list(shape)}")
        out.append(_Out(name, _target(qtype, shape[1]), shape, value, heads))

    def vector(name, value, size, heads=None):
        if tuple(np.shape(value)) != (size,):
            raise ModelError(f"params for GGUF tensor {name!r} have shape {list(np.shape(value))}, expected [{size}]")
        out.append(_Out(name, "F32", (size,), value, heads))

    if len(params["layers"]) != cfg.num_layers:
        raise ModelError(f"params have {len(params['layers'])} layers, the config {cfg.num_layers}")
    if cfg.rope_type == "llama3":
        out.append(_Out("rope_freqs.weight", "F32", (cfg.head_dim // 2,), _llama3_factors(cfg)))
    elif cfg.rope_type != "default" and cfg.rope_type != "linear":
        raise ModelError(f"RoPE type {cfg.rope_type!r} cannot be written to GGUF")
    weight("token_embd.weight", params["embed"], (cfg.vocab_size, d))
    qkv = (cfg.q_size, cfg.kv_size, cfg.kv_size)
    qkv_names = ("attn_q", "attn_k", "attn_v")
    heads = (cfg.num_heads, cfg.num_kv_heads, None) if permute else (None, None, None)
    for i, lp in enumerate(params["layers"]):
        n = _names(i)
        vector(n["attn_norm"] + ".weight", lp["attn_norm"], d)
        parts = _split_rows(lp["wqkv"], qkv, f"layer {i} 'wqkv' (attn_q, attn_k, attn_v)")
        for key, part, rows, h in zip(qkv_names, parts, qkv, heads, strict=True):
            weight(n[key] + ".weight", part, (rows, d), h)
        if "bqkv" in lp:
            parts = _split_rows(lp["bqkv"], qkv, f"layer {i} 'bqkv'")
            for key, part, rows, h in zip(qkv_names, parts, qkv, heads, strict=True):
                vector(n[key] + ".bias", part, rows, h)
        weight(n["attn_output"] + ".weight", lp["wo"], (d, cfg.q_size))
        if "bo" in lp:
            vector(n["attn_output"] + ".bias", lp["bo"], d)
        vector(n["ffn_norm"] + ".weight", lp["mlp_norm"], d)
        gate, up = _split_rows(lp["w_gate_up"], (inter, inter), f"layer {i} 'w_gate_up' (ffn_gate, ffn_up)")
        weight(n["ffn_gate"] + ".weight", gate, (inter, d))
        weight(n["ffn_up"] + ".weight", up, (inter, d))
        weight(n["ffn_down"] + ".weight", lp["w_down"], (d, inter))
        if "b_gate_up" in lp:
            bg, bu = _split_rows(lp["b_gate_up"], (inter, inter), f"layer {i} 'b_gate_up'")
            vector(n["ffn_gate"] + ".bias", bg, inter)
            vector(n["ffn_up"] + ".bias", bu, inter)
            vector(n["ffn_down"] + ".bias", lp["b_down"], d)
    vector("output_norm.weight", params["final_norm"], d)
    if not cfg.tie_word_embeddings:
        weight("output.weight", params["lm_head"], (cfg.vocab_size, d))
    return out


def _backend_tokenizer(tokenizer):
    """A `tokenizers.Tokenizer` from one, our Tokenizer wrapper, or a tokenizer.json path."""
    from tokenizers import Tokenizer as HFTokenizer

    if isinstance(tokenizer, (str, os.PathLike)):
        try:
            return HFTokenizer.from_file(os.fspath(tokenizer))
        except Exception as e:
            raise ModelError(f"cannot read tokenizer {os.fspath(tokenizer)!r}: {e}") from None
    inner = getattr(tokenizer, "backend", None)
    tok = inner if isinstance(inner, HFTokenizer) else tokenizer
    if not isinstance(tok, HFTokenizer):
        raise ConfigError(f"tokenizer must be a tokenizers.Tokenizer, a ruvllm_jax Tokenizer or a tokenizer.json path, "
                          f"got {type(tokenizer).__name__}")
    return tok


def _pre_name(pre: Optional[dict]) -> Optional[str]:
    """llama.cpp's `tokenizer.ggml.pre` for a byte-level pre-tokenizer's JSON, None if not one we know."""
    if pre is None:
        return None
    if pre.get("type") == "ByteLevel":
        return "gpt-2" if pre.get("use_regex", True) else None  # llama.cpp refuses "gpt2"
    if pre.get("type") == "Sequence":
        items = pre.get("pretokenizers", [])
        if (len(items) == 2 and items[0].get("type") == "Split" and items[1].get("type") == "ByteLevel"
                and not items[1].get("use_regex", True)):
            pattern = items[0].get("pattern", {}).get("Regex")
            for name in ("qwen2", "llama-bpe"):
                if pattern == PRE_TOKENIZER_SPLITS[name]:
                    return name
    return None


def _tokenizer_metadata(tokenizer, cfg: LlamaConfig, eos_ids: Sequence[int]) -> dict[str, Any]:
    """llama.cpp's tokenizer keys for a byte-level BPE tokenizer, tokens padded to the model's vocab."""
    tok = _backend_tokenizer(tokenizer)
    spec = json.loads(tok.to_str())
    model = spec.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise ModelError(f"only byte-level BPE tokenizers can be written to GGUF; this one's model is "
                         f"{model.get('type')!r}{' with byte_fallback' if model.get('byte_fallback') else ''}")
    pre = _pre_name(spec.get("pre_tokenizer"))
    if pre is None:
        raise ModelError(f"the tokenizer's pre-tokenizer {_show(spec.get('pre_tokenizer'), 200)} is not one GGUF "
                         f"names (GPT-2 byte-level, Qwen2's or Llama-3's split); cannot write it")
    if pre == "llama-bpe" and not model.get("ignore_merges"):
        warnings.warn("a Llama-3 split without ignore_merges: llama.cpp will ignore merges for it", stacklevel=3)
    n = cfg.vocab_size
    tokens: list[Optional[str]] = [None] * n
    types = [_TOKEN_UNUSED] * n

    def place(i: int, text: str, kind: int) -> None:
        if not 0 <= i < n:
            raise ModelError(f"the tokenizer's token {text!r} has id {i}, outside the model's vocab_size {n}")
        tokens[i], types[i] = text, kind

    for text, i in model.get("vocab", {}).items():
        place(i, text, _TOKEN_NORMAL)
    for t in spec.get("added_tokens", []):
        place(t["id"], t["content"], _TOKEN_CONTROL if t.get("special") else _TOKEN_USER_DEFINED)
    tokens = [t if t is not None else f"[PAD{i}]" for i, t in enumerate(tokens)]
    merges = []
    for merge in model.get("merges", []):
        parts = merge.split(" ") if isinstance(merge, str) else list(merge)
        if len(parts) != 2 or any(" " in p for p in parts):
            raise ModelError(f"merge {merge!r} cannot be written as a GGUF 'left right' merge")
        merges.append(" ".join(parts))
    plain, full = tok.encode("a", add_special_tokens=False).ids, tok.encode("a", add_special_tokens=True).ids
    k = next((j for j in range(len(full) - len(plain) + 1) if full[j : j + len(plain)] == plain), None)
    before, after = (full[:k], full[k + len(plain):]) if k is not None else (full, [])
    bos = cfg.bos_token_id if cfg.bos_token_id is not None else (before[0] if before else None)
    eos = list(eos_ids)
    if len(before) > 1 or len(after) > 1 or (before and before[0] != bos) or (after and after[0] not in eos[:1]):
        warnings.warn(f"the tokenizer adds {before} before and {after} after the text; GGUF can only say "
                      f"'add BOS' / 'add EOS', so llama.cpp will add {'BOS' if before else 'nothing'} before and "
                      f"{'EOS' if after else 'nothing'} after", stacklevel=3)
    md: dict[str, Any] = {
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types, "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.add_bos_token": bool(before), "tokenizer.ggml.add_eos_token": bool(after),
    }
    if bos is not None:
        md["tokenizer.ggml.bos_token_id"] = bos
    for key, i in zip(("eos", "eot", "eom"), eos[:3], strict=False):
        md[f"tokenizer.ggml.{key}_token_id"] = i
    if len(eos) > 3:
        warnings.warn(f"GGUF holds three end-of-generation ids (eos, eot, eom); dropping {eos[3:]}", stacklevel=3)
    if cfg.pad_token_id is not None:
        md["tokenizer.ggml.padding_token_id"] = cfg.pad_token_id
    return md


_FILE_TYPES = {"F32": "ALL_F32", "F16": "MOSTLY_F16", "BF16": "MOSTLY_BF16", "Q8_0": "MOSTLY_Q8_0",
               "Q4_K": "MOSTLY_Q4_K_M"}


def save_gguf(
    params: Mapping[str, Any], cfg: LlamaConfig, path: str | os.PathLike, *, qtype: str = "F32", tokenizer=None,
    eos_token_ids: Optional[Sequence[int]] = None, chat_template: Optional[str] = None,
) -> None:
    """Write params as a GGUF file llama.cpp and transformers load; atomically (temp file + rename).

    2-D weights (the embedding included) are written in `qtype` ("F32", "F16", "BF16", "Q8_0", "Q4_K");
    a Q4_K tensor whose rows are not a multiple of 256 falls back to Q5_0 (and F16 below 32), as
    llama.cpp's Q4_K_M does. QuantizedTensors already in the target type are written as they are;
    others are dequantized and re-quantized. Norms and biases are F32. `tokenizer` (a byte-level BPE
    `tokenizers.Tokenizer`, our Tokenizer or a tokenizer.json path) adds llama.cpp's tokenizer keys,
    its tokens padded with "[PAD{i}]" to the model's vocab_size.
    """
    gguf = _gguf()
    if qtype not in SAVE_QTYPES:
        raise ConfigError(f"qtype must be one of {SAVE_QTYPES}, got {qtype!r}")
    if not isinstance(cfg, LlamaConfig):
        raise ConfigError(f"cfg must be a LlamaConfig, got {type(cfg).__name__}")
    arch = "qwen2" if cfg.model_type == "qwen2" else "llama"
    windows = {w for w in cfg.sliding_windows if w is not None}
    if len(windows) > 1 or (windows and None in cfg.sliding_windows):
        raise ModelError("per-layer sliding windows cannot be written to GGUF")
    eos = tuple(cfg.eos_token_ids if eos_token_ids is None else eos_token_ids)
    plan = _tensor_plan(params, cfg, qtype)
    md = _tokenizer_metadata(tokenizer, cfg, eos) if tokenizer is not None else {}
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    os.close(fd)
    try:
        w = gguf.GGUFWriter(tmp, arch)
        w.add_name("mistral" if cfg.model_type == "mistral" else cfg.model_type)
        w.add_file_type(int(getattr(gguf.LlamaFileType, _FILE_TYPES[qtype])))
        if qtype in FORMATS:
            w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        w.add_context_length(cfg.max_position_embeddings)
        w.add_embedding_length(cfg.hidden_size)
        w.add_block_count(cfg.num_layers)
        w.add_feed_forward_length(cfg.intermediate_size)
        w.add_head_count(cfg.num_heads)
        w.add_head_count_kv(cfg.num_kv_heads)
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
        w.add_rope_dimension_count(cfg.head_dim)
        w.add_rope_freq_base(cfg.rope_theta)
        w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
        w.add_vocab_size(cfg.vocab_size)
        if cfg.rope_type == "linear":
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(float(dict(cfg.rope_scaling)["factor"]))
        elif cfg.rope_type == "llama3":
            w.add_rope_scaling_orig_ctx_len(int(dict(cfg.rope_scaling)["original_max_position_embeddings"]))
        if windows:
            warnings.warn("llama.cpp ignores sliding windows in llama-architecture GGUF files", stacklevel=2)
            w.add_sliding_window(windows.pop())
        _add_tokenizer_keys(w, gguf, md)
        if chat_template is not None:
            w.add_chat_template(chat_template)
        for o in plan:
            ggml = getattr(gguf.GGMLQuantizationType, o.ggml)
            if o.ggml in FORMATS:
                byte_shape = (o.shape[0], FORMATS[o.ggml].row_bytes(o.shape[1]))
                w.add_tensor_info(o.name, byte_shape, np.dtype(np.uint8), math.prod(byte_shape), raw_dtype=ggml)
            else:
                itemsize = 4 if o.ggml == "F32" else 2
                dtype = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}[o.ggml]
                w.add_tensor_info(o.name, o.shape, np.dtype(dtype), math.prod(o.shape) * itemsize,
                                  raw_dtype=None if o.ggml != "BF16" else ggml)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for o in plan:  # one tensor's host copy at a time
            w.write_tensor_data(_file_array(o))
        w.close()
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would hide the file from other users
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _add_tokenizer_keys(w, gguf, md: Mapping[str, Any]) -> None:
    if not md:
        return
    w.add_tokenizer_model(md["tokenizer.ggml.model"])
    w.add_tokenizer_pre(md["tokenizer.ggml.pre"])
    w.add_token_list(md["tokenizer.ggml.tokens"])
    w.add_token_types(md["tokenizer.ggml.token_type"])
    if md["tokenizer.ggml.merges"]:
        w.add_token_merges(md["tokenizer.ggml.merges"])
    for key, add in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id), ("eot", w.add_eot_token_id),
                     ("eom", w.add_eom_token_id), ("padding", w.add_pad_token_id)):
        if f"tokenizer.ggml.{key}_token_id" in md:
            add(md[f"tokenizer.ggml.{key}_token_id"])
    w.add_add_bos_token(md["tokenizer.ggml.add_bos_token"])
    w.add_add_eos_token(md["tokenizer.ggml.add_eos_token"])


__all__ = [
    "GGUFFile", "GGUFTensorInfo", "PRE_TOKENIZER_SPLITS", "SAVE_QTYPES", "SUPPORTED_ARCHITECTURES",
    "SUPPORTED_TOKENIZERS", "eos_token_ids", "gguf_config", "load_gguf", "read_gguf", "save_gguf",
    "special_token_id", "tokenizer_from_gguf",
]
