"""Weights from files to device arrays: chunked, permuted and converted rows, and one copy in memory.

References: numpy slicing and casting, `gguf.quants` for block bytes, and the peak RSS of a child
process, with a positive control (the naive load) showing that the measurement can fail.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import gguf
import jax
import ml_dtypes
import numpy as np
import pytest

from ruvllm_jax.errors import ModelError
from ruvllm_jax.models import weights_io
from ruvllm_jax.quant.tensor import QuantizedTensor


def _write(tmp_path, name: str, a: np.ndarray) -> str:
    path = str(tmp_path / name)
    with open(path, "wb") as f:
        f.write(b"\xab" * 13)  # the tensor starts at an odd offset, as in real files
        f.write(np.ascontiguousarray(a).tobytes())
    return path


@pytest.mark.parametrize("shape", [(1,), (3, 5), (1000, 64)])
def test_aligned_empty_is_aligned_and_adopted_without_copy(shape):
    a = weights_io.aligned_empty(shape, np.float32)
    assert a.shape == shape and a.ctypes.data % weights_io.ALIGN == 0 and a.flags.c_contiguous
    a[...] = 1.5
    if jax.default_backend() == "cpu":
        d = jax.device_put(a)
        assert d.unsafe_buffer_pointer() == a.ctypes.data  # XLA:CPU adopted the buffer: no second copy


@pytest.mark.parametrize("kind", ["F32", "F16", "BF16"])
@pytest.mark.parametrize("chunk_bytes", [64, 1 << 20])
def test_materialize_stacks_float_parts_through_chunks(tmp_path, monkeypatch, kind, chunk_bytes):
    monkeypatch.setattr(weights_io, "CHUNK_BYTES", chunk_bytes)
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((37, 24)).astype(np.float32), rng.standard_normal((5, 24)).astype(np.float16)
    srcs = [weights_io.file_rows(_write(tmp_path, "a", a), 13, "a", "F32", a.shape),
            weights_io.file_rows(_write(tmp_path, "b", b), 13, "b", "F16", b.shape)]
    got = weights_io.materialize(srcs, kind)
    want = np.concatenate([a, b.astype(np.float32)]).astype(weights_io.FLOAT_KINDS[kind])
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(np.asarray(got), want)


def test_materialize_quantizes_rows_as_gguf_does(tmp_path, monkeypatch):
    monkeypatch.setattr(weights_io, "CHUNK_BYTES", 200)  # many chunks of a few rows
    w = np.random.default_rng(1).standard_normal((41, 64)).astype(np.float32)
    got = weights_io.materialize([weights_io.file_rows(_write(tmp_path, "w", w), 13, "w", "F32", w.shape)], "Q8_0")
    assert isinstance(got, QuantizedTensor) and got.shape == (41, 64) and got.qtype == "Q8_0"
    want = gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0)
    np.testing.assert_array_equal(np.asarray(got.data), want)


def test_quantized_rows_are_kept_byte_for_byte_and_permuted_by_whole_rows(tmp_path, monkeypatch):
    monkeypatch.setattr(weights_io, "CHUNK_BYTES", 100)
    w = np.random.default_rng(2).standard_normal((24, 64)).astype(np.float32)
    blocks = gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0)
    src = weights_io.file_rows(_write(tmp_path, "q", blocks), 13, "q", "Q8_0", (24, 64))
    perm = np.array([0, 2, 4, 6, 1, 3, 5, 7])  # within groups of 8 rows
    got = weights_io.materialize([weights_io.permuted_rows(src, perm)], "Q8_0")
    want = blocks.reshape(3, 8, -1)[:, perm].reshape(24, -1)
    np.testing.assert_array_equal(np.asarray(got.data), want)
    deq = weights_io.materialize([weights_io.permuted_rows(src, perm)], "F32")  # dequantized per chunk
    np.testing.assert_array_equal(np.asarray(deq), gguf.quants.dequantize(want, gguf.GGMLQuantizationType.Q8_0))


def test_vector_parts_join_end_to_end(tmp_path):
    a, b = np.arange(5, dtype=np.float32), np.arange(3, dtype=ml_dtypes.bfloat16)
    srcs = [weights_io.file_rows(_write(tmp_path, "a", a), 13, "a", "F32", (1, 5)),
            weights_io.file_rows(_write(tmp_path, "b", b), 13, "b", "BF16", (1, 3))]
    np.testing.assert_array_equal(np.asarray(weights_io.materialize_vector(srcs)), [0, 1, 2, 3, 4, 0, 1, 2])


def test_a_file_that_ends_inside_a_tensor_is_a_model_error(tmp_path):
    path = _write(tmp_path, "short", np.zeros((3, 8), np.float32))
    src = weights_io.file_rows(path, 13, "short", "F32", (4, 8))
    with pytest.raises(ModelError, match="ends inside a tensor"):
        weights_io.materialize([src], "F32")


_CHILD = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    from ruvllm_jax.models import loader
    folder, mode = sys.argv[1], sys.argv[2]
    cfg = loader.load_config(folder)
    jax.block_until_ready(jax.numpy.zeros(8) + 1)  # the CPU client exists before the baseline
    def status(field):  # VmHWM, not ru_maxrss: that one survives fork + exec from the big pytest process
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1e3
    base = status("VmRSS")
    if mode == "ours":
        params = loader.load_params(folder, cfg)
    else:  # the naive load: whole tensors through the file mapping, then a cast
        from safetensors import safe_open
        f = safe_open(folder + "/model.safetensors", framework="numpy")
        params = {k: jax.numpy.asarray(np.asarray(f.get_tensor(k), np.float32)) for k in f.keys()}
    jax.block_until_ready(params)
    weights = sum(x.nbytes for x in jax.tree_util.tree_leaves(params))
    peak = status("VmHWM")
    print(json.dumps({"weights": weights, "base": base, "peak": peak, "over_base": (peak - base) / weights}))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_loading_keeps_one_copy_of_the_weights(tmp_path):
    """Peak RSS during `load_params` over the weights' bytes: <= 1.1 (measured 0.98; the issue's target,
    through the first generation, is 1.25), where the naive load of the same file (the positive
    control) needs more than 1.5 (measured 3.0)."""
    from ruvllm_jax.testing import build_hf_model, save_hf_model

    folder = save_hf_model(build_hf_model("llama", vocab_size=65536, hidden_size=256, intermediate_size=256,
                                          num_hidden_layers=1), str(tmp_path / "m"))
    out = {}
    for mode in ("ours", "naive"):
        proc = subprocess.run([sys.executable, "-c", _CHILD, folder, mode], capture_output=True, text=True,
                              env=dict(os.environ, JAX_PLATFORMS="cpu"), check=True)
        out[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["ours"]["weights"] > 130e6  # the embedding and head dominate: 2 x 64 MiB of float32
    assert out["ours"]["over_base"] <= 1.1, out
    assert out["naive"]["over_base"] > 1.5, out
