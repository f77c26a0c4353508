"""Hypothesis: mutated model files fail only with `RuvLLMError`s, and our safetensors checks agree with the package.

A tiny llama folder (config.json + model.safetensors, no torch) is built once; each example rewrites
one file with a structural mutation and loads it through the public loader. For safetensors headers
the `safetensors` package is the oracle: a file it rejects must raise `ModelError` here with our own
explanation (`_diagnose` names the culprit), and a file it accepts must load the same arrays (or be
refused for a dtype this loader does not read). For config.json, a loaded config must be usable
(hashable, finite RoPE frequencies) and a refused one must name the file and the field.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import struct

import numpy as np
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st
from safetensors import SafetensorError, safe_open

from ruvllm_jax.errors import ModelError, NotFoundError, RuvLLMError
from ruvllm_jax.models import loader
from ruvllm_jax.models.config import LlamaConfig
from ruvllm_jax.models.safetensors_io import SafetensorsFile, _diagnose, save_file

HEADER_EXAMPLES = 300
CONFIG_EXAMPLES = 300
HYP = dict(derandomize=True, database=None, deadline=None)

CFG = LlamaConfig(
    vocab_size=16, hidden_size=8, intermediate_size=16, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=4,
    rope_scaling=(("factor", 8.0), ("high_freq_factor", 4.0), ("low_freq_factor", 1.0),
                  ("original_max_position_embeddings", 8), ("rope_type", "llama3")),
    max_position_embeddings=32, bos_token_id=0, eos_token_ids=(1,),
)
_counter = itertools.count()


def _tiny_tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    d, i, q, kv, v = CFG.hidden_size, CFG.intermediate_size, CFG.q_size, CFG.kv_size, CFG.vocab_size
    p = "model.layers.0."
    shapes = {
        "model.embed_tokens.weight": (v, d), "model.norm.weight": (d,), "lm_head.weight": (v, d),
        p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
        p + "self_attn.q_proj.weight": (q, d), p + "self_attn.k_proj.weight": (kv, d),
        p + "self_attn.v_proj.weight": (kv, d), p + "self_attn.o_proj.weight": (d, q),
        p + "mlp.gate_proj.weight": (i, d), p + "mlp.up_proj.weight": (i, d), p + "mlp.down_proj.weight": (d, i),
    }
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}


class _Tiny(tuple):
    def __repr__(self) -> str:  # keep hypothesis' failure reports short
        return f"tiny({self[0]!r})"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(folder, header dict, data bytes, config dict) of a valid tiny llama folder."""
    folder = str(tmp_path_factory.mktemp("tiny_llama"))
    config = loader.hf_config_dict(CFG)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    path = os.path.join(folder, "model.safetensors")
    save_file(_tiny_tensors(), path, {"format": "pt"})
    raw = open(path, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    assert loader.load_params(folder, loader.load_config(folder))  # the base files are valid
    return _Tiny((folder, json.loads(raw[8 : 8 + n]), raw[8 + n :], config))


def _replace(path: str, blob: bytes) -> None:
    """Write a new inode, so an old memory map of the previous file is never truncated under it."""
    tmp = f"{path}.{next(_counter)}.tmp"
    with open(tmp, "wb") as f:
        f.write(blob)
    os.replace(tmp, path)


# -- safetensors header mutations -------------------------------------------------------------------

JUNK = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70),
    st.sampled_from([0, -1, 1, 2**31, 2**63, 2**64 - 1, 2**64, 10**30]),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=4),
    st.lists(st.integers(-3, 70), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(0, 9), max_size=2),
)
DTYPES = st.sampled_from(["F32", "F16", "BF16", "F64", "I64", "I32", "U8", "BOOL", "F8_E4M3", "F4", "C64",
                          "f32", "float32", "", "F 32", "F32 "])
DIM = st.one_of(st.integers(-3, 70), st.sampled_from([2**63, 2**64, 2**64 - 1, 2**40, 10**30]), st.floats(0, 9),
                st.booleans(), st.none(), st.text(max_size=2))


def _nested(depth: int):
    v: object = 1
    for _ in range(depth):
        v = [v]
    return v


@st.composite
def header_mutations(draw):
    """(name, function(header, data) -> file bytes)."""
    kind = draw(st.sampled_from(["dtype", "shape", "offsets", "entry", "extra", "top", "metadata", "bytes",
                                 "length", "raw"]))
    pick = draw(st.integers(0, 10**6))
    if kind == "dtype":
        value = draw(st.one_of(DTYPES, JUNK))
        return kind, lambda h, d: _emit(_set(h, pick, "dtype", value), d)
    if kind == "shape":
        how = draw(st.sampled_from(["elem", "append", "drop", "junk"]))
        dim, junk = draw(DIM), draw(JUNK)

        def shape(h, d):
            e = _entry(h, pick)
            s = list(e["shape"])
            if how == "elem" and s:
                s[pick % len(s)] = dim
            elif how == "append":
                s.append(dim)
            elif how == "drop" and s:
                s.pop()
            e["shape"] = junk if how == "junk" else s
            return _emit(h, d)
        return kind, shape
    if kind == "offsets":
        how = draw(st.sampled_from(["reverse", "shift", "shift_end", "copy", "one", "three", "beyond", "junk",
                                    "elem"]))
        k, junk = draw(st.integers(-9, 9)), draw(JUNK)

        def offsets(h, d):
            e = _entry(h, pick)
            s, t = e["data_offsets"]
            others = [x["data_offsets"] for n, x in h.items() if n != "__metadata__" and x is not e]
            e["data_offsets"] = {
                "reverse": [t, s], "shift": [s + k, t + k], "shift_end": [s, t + k],
                "copy": list(others[pick % len(others)]), "one": [s], "three": [s, t, t],
                "beyond": [len(d) + abs(k), len(d) + abs(k) + t - s], "junk": junk,
                "elem": [junk, t] if k % 2 else [s, junk],
            }[how]
            return _emit(h, d)
        return kind, offsets
    if kind == "entry":
        how = draw(st.sampled_from(["junk", "drop_field", "as_list", "duplicate_field"]))
        junk, field = draw(JUNK), draw(st.sampled_from(["dtype", "shape", "data_offsets"]))

        def entry(h, d):
            name = _name(h, pick)
            e = h[name]
            if how == "junk":
                h[name] = junk
            elif how == "drop_field":
                del e[field]
            elif how == "as_list":  # serde also reads a struct from a [dtype, shape, offsets] sequence
                h[name] = [e["dtype"], e["shape"], e["data_offsets"]]
            else:
                text = _json(h)
                key = json.dumps(name) + ":{"
                at = text.index(key) + len(key)
                return _frame(text[:at] + f'"{field}":{json.dumps(e[field])},' + text[at:], d)
            return _emit(h, d)
        return kind, entry
    if kind == "extra":
        value = draw(st.one_of(JUNK, st.integers(120, 130).map(_nested), st.just(_nested(1500))))
        return kind, lambda h, d: _emit(_set(h, pick, "extra_field", value), d)
    if kind == "top":
        how = draw(st.sampled_from(["junk", "new_tensor", "drop_tensor", "surrogate_name", "nested"]))
        junk, dtype = draw(JUNK), draw(DTYPES)
        start, count = draw(st.integers(0, 600)), draw(st.integers(0, 3))

        def top(h, d):
            if how == "junk":
                return _frame(json.dumps(junk), d)
            if how == "new_tensor":
                h["zz.new"] = {"dtype": dtype, "shape": [count], "data_offsets": [start, start + 4 * count]}
            elif how == "drop_tensor":
                del h[_name(h, pick)]
            elif how == "surrogate_name":
                h["bad\ud800"] = h.pop(_name(h, pick))
            else:
                h = _nested(pick % 200)
                return _frame(json.dumps(h), d)
            return _emit(h, d)
        return kind, top
    if kind == "metadata":
        value = draw(st.one_of(JUNK, st.dictionaries(st.text(max_size=3), JUNK, max_size=2)))
        dup = draw(st.booleans())

        def metadata(h, d):
            h["__metadata__"] = value
            if dup:
                text = _json(h)
                return _frame(text[:-1] + ',"__metadata__":{}}', d)
            return _emit(h, d)
        return kind, metadata
    if kind == "bytes":
        how = draw(st.sampled_from(["truncate", "append", "flip"]))
        cut, byte = draw(st.integers(0, 10**6)), draw(st.integers(0, 255))

        def mutate_bytes(h, d):
            blob = bytearray(_emit(h, d))
            if how == "truncate":
                return bytes(blob[: cut % len(blob)])
            if how == "append":
                return bytes(blob) + bytes([byte]) * (1 + cut % 9)
            (n,) = struct.unpack("<Q", blob[:8])
            blob[8 + cut % n] = byte
            return bytes(blob)
        return kind, mutate_bytes
    if kind == "length":
        delta = draw(st.one_of(st.integers(-9, 9), st.sampled_from([None, 2**64 - 1, 100_000_001, 2**40])))

        def length(h, d):
            blob = _emit(h, d)
            (n,) = struct.unpack("<Q", blob[:8])
            new = delta if delta is None or delta > 9 else n + delta
            new = 0 if new is None else max(new, 0)
            return struct.pack("<Q", new) + blob[8:]
        return kind, length
    # raw text around the JSON: BOM, leading/trailing whitespace or NUL, a NaN constant
    text = draw(st.sampled_from(["\ufeff", " ", "\n", "\x00", "x"]))
    where = draw(st.sampled_from(["before", "after", "nan"]))

    def raw(h, d):
        body = _json(h)
        if where == "nan":
            body = body[:-1] + ',"zz.nan":{"dtype":"F32","shape":[0],"data_offsets":[0,0],"x":NaN}}'
        return _frame(text + body if where == "before" else body + text if where == "after" else body, d)
    return kind, raw


def _name(h: dict, pick: int) -> str:
    names = sorted(n for n in h if n != "__metadata__")
    return names[pick % len(names)]


def _entry(h: dict, pick: int) -> dict:
    return h[_name(h, pick)]


def _set(h: dict, pick: int, field: str, value) -> dict:
    _entry(h, pick)[field] = value
    return h


def _json(h) -> str:
    return json.dumps(h, separators=(",", ":"))


def _frame(text: str, data: bytes) -> bytes:
    blob = text.encode("utf-8", "surrogatepass")
    return struct.pack("<Q", len(blob)) + blob + data


def _emit(h, data: bytes) -> bytes:
    return _frame(_json(h), data)


def _package_reads(path: str):
    """The package's verdict: None if it rejects the header, else {name: array or None (dtype numpy lacks)}."""
    try:
        f = safe_open(path, framework="numpy")
    except SafetensorError:
        return None
    out = {}
    for name in f.keys():
        try:
            out[name] = f.get_tensor(name)
        except (AttributeError, TypeError):  # F8/F4 without an ml_dtypes-aware numpy
            out[name] = None
    return out


@settings(max_examples=HEADER_EXAMPLES, **HYP)
@given(mutation=header_mutations())
def test_mutated_safetensors_headers_agree_with_the_package_and_raise_only_model_errors(tiny, mutation):
    folder, header, data, _ = tiny
    kind, mutate = mutation
    path = os.path.join(folder, "model.safetensors")
    _replace(path, mutate(json.loads(json.dumps(header)), data))
    reference = _package_reads(path)
    reason = _diagnose(path)
    try:
        ours = SafetensorsFile(path)
    except ModelError as e:
        ours, error = None, str(e)
    event(f"{kind}: {'rejected' if reference is None else 'accepted'}")
    if reference is None:  # every file the package rejects, we reject, and say why in our own words
        assert ours is None and reason is not None, kind
        assert path in error and reason in error
    else:  # every file it accepts, we accept (same arrays), bar dtypes this loader does not read
        assert reason is None, (kind, reason)
        if ours is None:
            assert "which this loader does not read" in error, error
        else:
            assert sorted(ours.keys()) == sorted(reference)
            for name, a in reference.items():
                b = ours.get(name)
                assert b.dtype == a.dtype and b.shape == a.shape and b.tobytes() == a.tobytes(), name
    try:  # the public loader: loads or fails with a ModelError naming the file (or, for a lost tensor, the folder)
        loader.load_params(folder, CFG)
    except RuvLLMError as e:
        assert isinstance(e, ModelError) and folder in str(e), repr(e)


# -- config.json mutations ---------------------------------------------------------------------------

CONFIG_JUNK = st.one_of(
    st.none(), st.booleans(), st.text(max_size=4), st.sampled_from(["8", "silu", "llama3", "linear", "", "nan"]),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, -0.0, 0.5, 1e-320, 1e39, 1e308, 8.0]),
    st.integers(-5, 40), st.sampled_from([-(2**31), 2**31 - 1, 2**31, 2**63, 2**64, 10**30, 10**400]),
    st.lists(st.integers(-2, 20), max_size=3), st.lists(st.sampled_from(["full_attention", "sliding_attention"]),
                                                      max_size=2),
    st.dictionaries(st.sampled_from(["rope_type", "factor", "type", "x"]), st.one_of(st.text(max_size=3),
                    st.floats(0, 9), st.none()), max_size=3),
    st.just({"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0}),  # no factor
    st.just({"rope_type": "linear"}), st.just({"type": "linear", "factor": 2.0}),
)
CONFIG_FIELDS = [
    "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps", "rope_theta",
    "rope_scaling", "rope_parameters", "tie_word_embeddings", "attention_bias", "mlp_bias", "bos_token_id",
    "eos_token_id", "pad_token_id", "torch_dtype", "dtype", "sliding_window", "use_sliding_window",
    "max_window_layers", "layer_types", "rope_scaling.factor", "rope_scaling.low_freq_factor",
    "rope_scaling.high_freq_factor", "rope_scaling.original_max_position_embeddings", "rope_scaling.rope_type",
]


@st.composite
def config_mutations(draw):
    """A list of (field, value or DELETE) edits; model_type may switch family to reach the window fields."""
    edits = draw(st.lists(st.tuples(st.sampled_from(CONFIG_FIELDS), st.one_of(CONFIG_JUNK, st.just(DELETE))),
                          min_size=1, max_size=2))
    family = draw(st.sampled_from(["llama", "qwen2", "mistral"]))
    return family, edits


DELETE = object()


def _apply(config: dict, family: str, edits) -> dict:
    c = json.loads(json.dumps(config))
    c["model_type"] = family
    if family == "qwen2":
        c.update(use_sliding_window=True, sliding_window=4, max_window_layers=0)
    for field, value in edits:
        target, key = (c, field)
        if "." in field:
            outer, key = field.split(".")
            if not isinstance(c.get(outer), dict):
                c[outer] = {}
            target = c[outer]
        if value is DELETE:
            target.pop(key, None)
        else:
            target[key] = value
    return c


@settings(max_examples=CONFIG_EXAMPLES, **HYP)
@given(mutation=config_mutations())
def test_mutated_config_fields_load_usably_or_raise_model_errors_naming_file_and_field(tiny, mutation):
    folder, header, data, config = tiny
    family, edits = mutation
    c = _apply(config, family, edits)
    cfg_folder = os.path.join(folder, "cfg")  # its own valid weights: the header test rewrites the shared ones
    if not os.path.isdir(cfg_folder):
        os.makedirs(cfg_folder)
        _replace(os.path.join(cfg_folder, "model.safetensors"), _emit(header, data))
    _replace(os.path.join(cfg_folder, "config.json"), json.dumps(c).encode())
    try:
        cfg = loader.load_config(cfg_folder)
    except RuvLLMError as e:
        event("config refused")
        assert isinstance(e, ModelError), repr(e)
        msg = str(e)
        assert "config.json" in msg, msg
        assert any(field.split(".")[-1] in msg or field.split(".")[0] in msg for field, _ in edits), (edits, msg)
        return
    # A config that loads is usable: hashable and equal to itself (a jit static argument), finite RoPE.
    assert hash(cfg) == hash(cfg) and cfg == cfg
    inv = cfg.inv_freq()
    assert inv.shape == (cfg.head_dim // 2,) and np.all(np.isfinite(inv)) and np.all(inv >= 0)
    assert math.isfinite(cfg.rms_norm_eps) and cfg.rms_norm_eps > 0
    assert len(cfg.sliding_windows) == cfg.num_layers
    assert all(0 <= t < cfg.vocab_size for t in cfg.eos_token_ids)
    cfg.attention_config()
    try:  # and the weights load against it, or fail naming what does not fit
        loader.load_params(cfg_folder, cfg)
    except (ModelError, NotFoundError) as e:
        assert "tensor" in str(e), str(e)
