"""The native quantized matmul (`ruvllm_jax.quant.native`) against gguf's numpy dequantization.

Every result is checked against float64 `x @ gguf.quants.dequantize(w).T` within the activation
rounding bound (`native.activation_error_bound`, plus f32 slack), which is shown to be tight enough
to reject a reference with a wrong scale, a swapped nibble order or shifted sub-block scales. Also:
the portable scalar build against the SIMD one, the VNNI build bit-equal to the plain AVX2 one (where
the CPU has VNNI), jit / while_loop / vmap, bit-identical results for
any thread split and any batch composition, edge cases (n = 0, NaN, inf), ConfigError on bad
inputs, and, in fresh processes, available() False with the jnp fallback when the compiler is
missing, RUVLLM_JAX_NATIVE=0, or the compile fails. The numerical tests use `native.build()`
directly, so they run even with RUVLLM_JAX_NATIVE=0; they skip only without a C++ compiler (or off
the supported platforms).
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import subprocess
import sys
import textwrap
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gguf import GGMLQuantizationType  # noqa: E402
from gguf.quants import dequantize, quantize  # noqa: E402

from ruvllm_jax.errors import ConfigError  # noqa: E402
from ruvllm_jax.quant import native  # noqa: E402
from ruvllm_jax.quant.tensor import FORMATS, QuantizedTensor  # noqa: E402

QTYPES = ("Q8_0", "Q4_1", "Q5_0", "Q4_K", "Q6_K")
SCALE_OFFSETS = {"Q8_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q4_K": (0, 2), "Q6_K": (208,)}
# f32 accumulation slack, relative to |x| @ |w|.T: ~1e-3 of the activation bound
F32_SLACK = 1e-5


@pytest.fixture(scope="module")
def kernels():
    """(default build, scalar build), compiled side by side on first use, then from the cache."""
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        builds = [pool.submit(native.build), pool.submit(native.build, native.SCALAR_FLAGS)]
        try:
            return tuple(b.result() for b in builds)
        except ConfigError as e:
            if "needs a C++ compiler" in str(e) or "unsupported" in str(e):
                pytest.skip(f"no native build here: {e}")
            raise


@pytest.fixture(scope="module")
def kernel(kernels):
    return kernels[0]


def make_weight(qtype: str, rows: int, cols: int, rng, kind: str = "random") -> np.ndarray:
    """uint8 [rows, row_bytes] GGML blocks: gguf-quantized Gaussians, or any bytes with sane f16 scales.

    Random bytes reach every bit pattern (Q8_0 -128, all nibbles, all 6-bit K scales); row 0 gets
    subnormal f16 scales so the portable f16 conversion is exercised too.
    """
    fmt = FORMATS[qtype]
    if kind == "quantized":
        w = rng.standard_normal((rows, cols)).astype(np.float32)
        return quantize(w, GGMLQuantizationType[qtype])
    nb = cols // fmt.block_size
    blocks = rng.integers(0, 256, size=(rows, nb, fmt.type_size), dtype=np.uint8)
    for off in SCALE_OFFSETS[qtype]:
        scale = rng.uniform(0.5, 2.0, (rows, nb)) * rng.choice([-1.0, 1.0], (rows, nb)) / 64
        scale[0] *= 2.0**-14  # f16 subnormals
        blocks[..., off:off + 2] = scale.astype(np.float16).view(np.uint8).reshape(rows, nb, 2)
    return blocks.reshape(rows, nb * fmt.type_size)


def reference(x: np.ndarray, data: np.ndarray, qtype: str):
    wd = dequantize(data, GGMLQuantizationType[qtype]).astype(np.float64)
    x64 = x.astype(np.float64)
    return x64 @ wd.T, wd


def within_bound(y, x, data, qtype, ref=None):
    """(ok, worst error / bound) of y against the float64 reference of `data`."""
    ref_y, wd = reference(x, data, qtype)
    if ref is not None:
        ref_y = ref
    bound = native.activation_error_bound(x, wd, qtype) + F32_SLACK * (np.abs(x) @ np.abs(wd).T) + 1e-30
    ratio = np.abs(np.asarray(y, np.float64) - ref_y) / bound
    return bool(np.all(ratio <= 1.0)), float(ratio.max())


def qt(data, qtype, rows, cols) -> QuantizedTensor:
    return QuantizedTensor(jnp.asarray(data), qtype, (rows, cols))


# gguf.quants cannot quantize the K formats: random valid blocks cover them.
@pytest.mark.parametrize("qtype, kind", [(q, k) for k in ("random", "quantized") for q in QTYPES
                                         if k == "random" or q not in ("Q4_K", "Q6_K")])
def test_matches_gguf_within_activation_bound(kernel, qtype, kind):
    rng = np.random.default_rng(zlib.crc32(f"{qtype}/{kind}".encode()))
    # 4096 cols x 37 rows is over the single-thread cutoff: 8 chunks of 5 rows, the last short
    for rows, cols in ((37, 4096), (1, FORMATS[qtype].block_size * 3)):
        data = make_weight(qtype, rows, cols, rng, kind)
        w = qt(data, qtype, rows, cols)
        for n in (1, 3, 8, 17):
            x = rng.standard_normal((n, cols)).astype(np.float32)
            y = np.asarray(kernel.matmul(jnp.asarray(x), w))
            assert y.shape == (n, rows) and y.dtype == np.float32
            ok, worst = within_bound(y, x, data, qtype)
            assert ok, f"{qtype} {kind} rows={rows} cols={cols} n={n}: error {worst:.3g} x the bound"
            # typical error is far inside the worst-case bound
            assert worst < 0.5, worst


def _corrupt(data: np.ndarray, qtype: str, how: str) -> np.ndarray:
    fmt = FORMATS[qtype]
    rows = data.shape[0]
    b = data.reshape(rows, -1, fmt.type_size).copy()
    if how == "scale":  # main f16 scale 1.25x
        off = SCALE_OFFSETS[qtype][0]
        d = b[..., off:off + 2].copy().view(np.float16).astype(np.float32) * 1.25
        b[..., off:off + 2] = d.astype(np.float16).view(np.uint8)
    elif how == "nibbles":  # swap low and high nibbles of the packed quants
        start = {"Q4_1": 4, "Q5_0": 6, "Q4_K": 16, "Q6_K": 0}[qtype]
        end = {"Q4_1": 20, "Q5_0": 22, "Q4_K": 144, "Q6_K": 128}[qtype]
        q = b[..., start:end]
        b[..., start:end] = (q >> 4) | (q << 4)
    elif how == "subscales":  # K formats: sub-block scales shifted by one
        if qtype == "Q6_K":
            b[..., 192:208] = np.roll(b[..., 192:208], 1, axis=-1)
        else:
            b[..., 4:16] = np.roll(b[..., 4:16], 1, axis=-1)
    elif how == "q8_order":  # Q8_0: the two 16-halves of each block swapped
        b[..., 2:34] = np.concatenate([b[..., 18:34], b[..., 2:18]], axis=-1)
    return b.reshape(data.shape)


@pytest.mark.parametrize(
    "qtype,how",
    [("Q8_0", "scale"), ("Q8_0", "q8_order"), ("Q4_1", "scale"), ("Q4_1", "nibbles"), ("Q5_0", "nibbles"),
     ("Q5_0", "scale"), ("Q4_K", "nibbles"), ("Q4_K", "subscales"), ("Q6_K", "nibbles"), ("Q6_K", "subscales")],
)
def test_bound_rejects_a_wrong_reference(kernel, qtype, how):
    """The bound is tight enough that a reference with a layout or scale mistake fails it."""
    rng = np.random.default_rng(7)
    rows, cols = 37, 1024
    data = make_weight(qtype, rows, cols, rng, "quantized" if qtype in ("Q8_0", "Q4_1", "Q5_0") else "random")
    x = rng.standard_normal((3, cols)).astype(np.float32)
    y = np.asarray(kernel.matmul(jnp.asarray(x), qt(data, qtype, rows, cols)))
    assert within_bound(y, x, data, qtype)[0]
    bad_ref, _ = reference(x, _corrupt(data, qtype, how), qtype)
    ok, worst = within_bound(y, x, data, qtype, ref=bad_ref)
    assert not ok and worst > 2.0, f"corruption {how!r} of {qtype} was not caught (worst {worst:.3g})"


def test_thread_split_is_deterministic(kernel):
    """Each row is computed by one thread in a fixed order: any thread count gives the same bits."""
    rng = np.random.default_rng(3)
    rows, cols = 301, 4096
    for qtype in QTYPES:
        data = make_weight(qtype, rows, cols, rng)
        w = qt(data, qtype, rows, cols)
        x = jnp.asarray(rng.standard_normal((5, cols)).astype(np.float32))
        one = np.asarray(kernel.matmul(x, w, max_threads=1))
        every = np.asarray(kernel.matmul(x, w))
        np.testing.assert_array_equal(one, every)
        # per-row results do not depend on the x rows dotted beside them
        np.testing.assert_array_equal(np.asarray(kernel.matmul(x[2:3], w)), every[2:3])


def test_scalar_build_matches_simd_build(kernels):
    kernel, scalar = kernels
    assert scalar.simd == 0 and scalar.target != kernel.target
    rng = np.random.default_rng(11)
    rows, cols = 37, 1024
    for qtype in QTYPES:
        data = make_weight(qtype, rows, cols, rng)
        w = qt(data, qtype, rows, cols)
        x = rng.standard_normal((9, cols)).astype(np.float32)
        y_simd = np.asarray(kernel.matmul(jnp.asarray(x), w))
        y_scalar = np.asarray(scalar.matmul(jnp.asarray(x), w))
        assert within_bound(y_scalar, x, data, qtype)[0]
        # activations are quantized bit-identically; only the f32 summation order differs
        _, wd = reference(x, data, qtype)
        tol = F32_SLACK * (np.abs(x) @ np.abs(wd).T) + 1e-30
        assert np.all(np.abs(y_simd - y_scalar) <= tol), qtype


def test_vnni_build_equals_avx2_build(kernel):
    """VNNI's fused integer dots replace maddubs + madd (+ add) exactly: the same output bits.

    Random weight bytes reach the extremes (Q8_0 -128, nibbles 15, 6-bit codes 63) and activations
    with outliers reach codes +-127, so a saturating or reordered integer step would show.
    """
    if kernel.simd != 3:
        pytest.skip(f"the default build has no VNNI path here (simd={kernel.simd}): nothing to compare")
    plain = native.build(native.NO_VNNI_FLAGS)
    assert plain.simd == 2 and plain.target != kernel.target
    rng = np.random.default_rng(13)
    rows, cols = 45, 2048
    for qtype in QTYPES:
        for kind in ("random", "quantized") if qtype not in ("Q4_K", "Q6_K") else ("random",):
            data = make_weight(qtype, rows, cols, rng, kind)
            w = qt(data, qtype, rows, cols)
            x = rng.standard_normal((7, cols)).astype(np.float32)
            x[:, ::97] *= 1e3  # one outlier a block: most codes small, the outlier's +-127
            y_vnni = np.asarray(kernel.matmul(jnp.asarray(x), w))
            np.testing.assert_array_equal(y_vnni, np.asarray(plain.matmul(jnp.asarray(x), w)), err_msg=qtype)
            assert within_bound(y_vnni, x, data, qtype)[0], qtype


def test_jit_while_loop_and_vmap(kernel):
    rng = np.random.default_rng(5)
    rows, cols = 64, 512
    data = make_weight("Q8_0", rows, cols, rng, "quantized")
    w = qt(data, "Q8_0", rows, cols)
    x = rng.standard_normal((2, cols)).astype(np.float32)

    @jax.jit
    def loop(x, w):
        def body(carry):
            i, acc = carry
            return i + 1, acc + kernel.matmul(x * (i + 1).astype(jnp.float32), w)

        return jax.lax.while_loop(lambda c: c[0] < 4, body, (0, jnp.zeros((2, rows), jnp.float32)))[1]

    got = np.asarray(loop(jnp.asarray(x), w))
    direct = np.asarray(kernel.matmul(jnp.asarray(x), w))
    eager = sum(np.asarray(kernel.matmul(jnp.asarray(x * k), w)) for k in (1, 2, 3, 4))
    np.testing.assert_allclose(got, eager, rtol=1e-5, atol=1e-4)
    assert within_bound(got / 10, x, data, "Q8_0")[0]  # sum_k k * (x @ w.T), k = 1..4

    # vmap over activations folds the batch into n
    xb = jnp.asarray(rng.standard_normal((3, 2, cols)).astype(np.float32))
    vm = jax.jit(jax.vmap(lambda x: kernel.matmul(x, w)))(xb)
    assert vm.shape == (3, 2, rows)
    np.testing.assert_array_equal(np.asarray(vm[1]), np.asarray(kernel.matmul(xb[1], w)))
    # vmap over weights runs one call per weight
    datas = jnp.stack([jnp.asarray(data), jnp.asarray(make_weight("Q8_0", rows, cols, rng))])
    vw = jax.vmap(lambda d: kernel.matmul(jnp.asarray(x), QuantizedTensor(d, "Q8_0", (rows, cols))))(datas)
    np.testing.assert_array_equal(np.asarray(vw[0]), direct)
    # the module-level API is the same kernel
    if native.available():
        np.testing.assert_array_equal(np.asarray(native.matmul(jnp.asarray(x), w)), direct)


def _check_layer_matmul(kernel, rng, rows: int, cols: int):
    ws = tuple(qt(make_weight(q, rows, cols, rng), q, rows, cols) for q in QTYPES)
    x = jnp.asarray(rng.standard_normal((3, cols)).astype(np.float32))
    direct = [np.asarray(kernel.matmul(x, w)) for w in ws]
    pick = jax.jit(lambda x, i, ws: kernel.layer_matmul(x, i, ws))
    for i in range(len(ws)):
        np.testing.assert_array_equal(np.asarray(pick(x, jnp.int32(i), ws)), direct[i])

    def body(carry, i):
        return carry, kernel.layer_matmul(x, i, ws)

    scanned = jax.jit(lambda: jax.lax.scan(body, 0, jnp.arange(len(ws)))[1])()
    for i in range(len(ws)):
        np.testing.assert_array_equal(np.asarray(scanned[i]), direct[i])
    for bad in (5, -1):
        with pytest.raises((ValueError, jax.errors.JaxRuntimeError), match=f"layer {bad} out of 5"):
            jax.block_until_ready(pick(x, jnp.int32(bad), ws))
    other = qt(make_weight("Q8_0", rows + 32, cols, rng), "Q8_0", rows + 32, cols)
    with pytest.raises(ConfigError, match="share one shape"):
        kernel.layer_matmul(x, jnp.int32(0), (ws[0], other))


def test_layer_matmul_reads_the_indexed_layers_blocks_bit_for_bit(kernels):
    """`layer_matmul` (a scan over a model's layers) = `matmul` with that layer's weight, every format
    mixed in one call, under jit and inside lax.scan, SIMD and scalar builds; a bad index or shape is
    refused."""
    rng = np.random.default_rng(11)
    for kernel in kernels:
        _check_layer_matmul(kernel, rng, 48, 512)


def test_edge_cases(kernels):
    kernel, scalar = kernels
    rng = np.random.default_rng(9)
    rows, cols = 5, 64
    data = make_weight("Q4_1", rows, cols, rng, "quantized")
    w = qt(data, "Q4_1", rows, cols)
    assert kernel.matmul(jnp.zeros((0, cols), jnp.float32), w).shape == (0, rows)
    np.testing.assert_array_equal(np.asarray(kernel.matmul(jnp.zeros((2, cols), jnp.float32), w)), 0.0)
    x = rng.standard_normal((3, cols)).astype(np.float32)
    x[1, 40] = np.nan
    x[2, 3] = -np.inf
    for k in (kernel, scalar):
        y = np.asarray(k.matmul(jnp.asarray(x), w))
        assert np.all(np.isnan(y[1:])) and np.all(np.isfinite(y[0]))
    # leading dims beyond [n, cols] pass through
    x3 = rng.standard_normal((2, 3, cols)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(kernel.matmul(jnp.asarray(x3), w))[1],
                                  np.asarray(kernel.matmul(jnp.asarray(x3[1]), w)))


def test_bad_inputs_raise_config_error(kernel):
    rng = np.random.default_rng(1)
    data = make_weight("Q8_0", 4, 64, rng, "quantized")
    w = qt(data, "Q8_0", 4, 64)
    x = jnp.ones((2, 64), jnp.float32)
    cases = [
        (lambda: kernel.matmul(x.astype(jnp.float16), w), "float16"),
        (lambda: kernel.matmul(jnp.ones((2, 96), jnp.float32), w), "96"),
        (lambda: kernel.matmul(x, QuantizedTensor(jnp.asarray(data)[:, :34], "Q8_0", (4, 64))), "(4, 34)"),
        (lambda: kernel.matmul(x, QuantizedTensor(jnp.asarray(data).astype(jnp.int8), "Q8_0", (4, 64))), "int8"),
        (lambda: kernel.matmul(x, QuantizedTensor(jnp.asarray(data), "Q2_K", (4, 64))), "Q2_K"),
        (lambda: kernel.matmul(x, QuantizedTensor(jnp.zeros((4, 144), jnp.uint8), "Q4_K", (4, 64))), "256"),
        (lambda: kernel.matmul(x, jnp.ones((4, 64))), "QuantizedTensor"),
        (lambda: kernel.matmul(x, w, max_threads=-1), "max_threads"),
    ]
    for fn, needle in cases:
        with pytest.raises(ConfigError, match=None) as info:
            fn()
        assert needle in str(info.value), (needle, str(info.value))


_FALLBACK_SCRIPT = textwrap.dedent(
    """
    import json, os, warnings
    warnings.simplefilter("error")  # a missing compiler must not warn
    import numpy as np
    from ruvllm_jax.quant import native
    out = {"available": native.available(), "error": native.build_error()}
    os.environ["RUVLLM_JAX_NATIVE"] = "0"
    out["switched_off"] = [native.available(), native.build_error()]
    try:
        from ruvllm_jax.quant import matmul as qm
    except ImportError:
        qm = None
    if qm is not None and hasattr(qm, "quantized_matmul"):
        import jax.numpy as jnp
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize, quantize
        from ruvllm_jax.quant.tensor import QuantizedTensor
        rng = np.random.default_rng(0)
        data = quantize(rng.standard_normal((8, 64)).astype(np.float32), GGMLQuantizationType.Q8_0)
        x = rng.standard_normal((2, 64)).astype(np.float32)
        y = np.asarray(qm.quantized_matmul(jnp.asarray(x), QuantizedTensor(jnp.asarray(data), "Q8_0", (8, 64))))
        ref = x @ dequantize(data, GGMLQuantizationType.Q8_0).T
        out["fallback_err"] = float(np.abs(y - ref).max() / np.abs(ref).max())
    print("RESULT" + json.dumps(out))
    """
)


def _start(script: str, env_updates: dict, cache_dir) -> subprocess.Popen:
    env = dict(os.environ, JAX_PLATFORMS="cpu", RUVLLM_JAX_CACHE_DIR=str(cache_dir), **env_updates)
    env.pop("RUVLLM_JAX_NATIVE", None)
    return subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)


def _result(proc: subprocess.Popen) -> dict:
    stdout, stderr = proc.communicate(timeout=180)
    assert proc.returncode == 0, stderr[-3000:]
    line = [ln for ln in stdout.splitlines() if ln.startswith("RESULT")][-1]
    return json.loads(line[len("RESULT"):])


_COMPILE_FAILS_SCRIPT = textwrap.dedent(
    """
    import json, warnings
    from ruvllm_jax.quant import native
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first, second = native.available(), native.available()
    msgs = [str(w.message) for w in caught if "native quantized matmul" in str(w.message)]
    print("RESULT" + json.dumps({"first": first, "second": second, "warnings": msgs, "error": native.build_error()}))
    """
)


def test_no_compiler_switch_off_and_compile_failure(tmp_path):
    """Fresh processes (the build outcome is remembered): all leave available() False, never raising."""
    missing = _start(_FALLBACK_SCRIPT, {"CXX": "/nonexistent/c++"}, tmp_path / "a")
    failing = _start(_COMPILE_FAILS_SCRIPT, {"CXX": "false"}, tmp_path / "b")  # a "compiler" that always fails
    out = _result(missing)
    assert out["available"] is False and "compiler" in out["error"] and "/nonexistent/c++" in out["error"]
    assert out["switched_off"][0] is False and "RUVLLM_JAX_NATIVE" in out["switched_off"][1]
    if "fallback_err" in out:  # the jnp path answered instead
        assert out["fallback_err"] < 0.02
    out = _result(failing)
    assert out["first"] is False and out["second"] is False
    assert len(out["warnings"]) == 1 and "failed to compile" in out["warnings"][0]
    assert "failed to compile" in out["error"]
    leftovers = os.listdir(tmp_path / "b" / "native")
    assert not [p for p in leftovers if p.endswith(".so") or ".tmp" in p], leftovers


def test_many_calls_in_a_loop_and_from_threads_are_exact(kernel):
    """Stress the thread hand-off: hundreds of multi-threaded calls in a while_loop, and calls from
    several Python threads at once, all give the single-thread bits."""
    rng = np.random.default_rng(13)
    rows, cols = 203, 1024
    data = make_weight("Q4_K", rows, cols, rng)
    w = qt(data, "Q4_K", rows, cols)
    x = jnp.asarray(rng.standard_normal((3, cols)).astype(np.float32))
    want = np.asarray(kernel.matmul(x, w, max_threads=1))

    @jax.jit
    def loop(x, w):
        def body(carry):  # rows rolled each step, so the call is not loop-invariant
            i, same = carry
            y = kernel.matmul(jnp.roll(x, i, axis=0), w)
            return i + 1, same & jnp.all(y == jnp.roll(jnp.asarray(want), i, axis=0))

        return jax.lax.while_loop(lambda c: c[0] < 300, body, (0, jnp.bool_(True)))[1]

    assert bool(loop(x, w))
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(lambda _: np.asarray(kernel.matmul(x, w)), range(32)))
    for out in outs:
        np.testing.assert_array_equal(out, want)
