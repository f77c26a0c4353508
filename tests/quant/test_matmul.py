"""`quantized_matmul` and `embed_rows` against float64 numpy products of gguf-decoded weights."""

from __future__ import annotations

import sys

import chex
import gguf.quants as gguf_quants
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from gguf import GGMLQuantizationType  # noqa: E402

from ruvllm_jax.errors import ConfigError
from ruvllm_jax.quant import FORMATS, QuantizedTensor, dequantize, embed_rows, native, quantize, quantized_matmul
from ruvllm_jax.quant import matmul as qmm
from ruvllm_jax.quant.matmul import cpu_chunk_rows, quantized_matmul_jnp

NAMES = list(FORMATS)
ROWS, COLS = 24, 512


def reference_weights(qt: QuantizedTensor) -> np.ndarray:
    """The matrix as gguf's (not our) dequantizer reads the blocks, float64."""
    data = np.asarray(qt.data, np.uint8)
    return gguf_quants.dequantize(data, getattr(GGMLQuantizationType, qt.qtype)).astype(np.float64)


def weight(name: str, seed: int = 0, rows: int = ROWS, cols: int = COLS) -> QuantizedTensor:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, cols)) * 10.0 ** rng.integers(-2, 1, (rows, 1))
    return quantize(w.astype(np.float32), name)


def assert_close_to_reference(y, x, qt: QuantizedTensor, rtol: float = 1e-5):
    x64 = np.asarray(x, np.float64)
    ref = x64 @ reference_weights(qt).T
    # Relative to the scale of the terms summed, so cancellation in a row cannot make it vacuous or flaky.
    scale = np.abs(x64) @ np.abs(reference_weights(qt)).T
    err = np.abs(np.asarray(y, np.float64) - ref)
    assert (err <= rtol * scale + 1e-30).all(), f"max relative error {(err / scale).max():.2e}"


LEADS = [(1,), (3,), (8,), (2, 3), ()]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("rows", [ROWS, 2 * cpu_chunk_rows(8, COLS) + 5])  # one product; chunks plus a tail
def test_jnp_matmul_matches_float64_reference(name, rows, monkeypatch):
    """1, 3 and 8 rows, [B, S, cols] and a bare vector, in one jitted program per format and path."""
    monkeypatch.setattr(qmm, "WHOLE_MAX_BYTES", 0)  # chunk every format once rows allow, not just big ones
    qt = weight(name, rows=rows)
    rng = np.random.default_rng(1)
    leads = LEADS if rows == ROWS else LEADS[:-1]  # the chunked loop: 1, 3, 8 rows and [B, S]
    xs = [jnp.asarray(rng.standard_normal((*lead, COLS)).astype(np.float32)) for lead in leads]
    f = jax.jit(lambda xs, w: [quantized_matmul_jnp(x, w) for x in xs])
    if jax.default_backend() == "cpu":  # the chunked loop is really what runs (or not) here
        assert ("while" in f.lower(xs, qt).as_text()) == (rows > ROWS)
    for lead, x, y in zip(leads, xs, f(xs, qt), strict=True):
        chex.assert_shape(y, (*lead, rows))
        chex.assert_type(y, jnp.float32)
        assert_close_to_reference(y, x, qt)


def test_cpu_chunks_stay_cache_sized(monkeypatch):
    assert [cpu_chunk_rows(1, c) for c in (512, 896, 4864, 151936)] == [64, 32, 8, 8]
    assert [cpu_chunk_rows(n, 896) for n in (8, 64, 256, 4096)] == [32, 128, 512, 512]
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    assert qmm.uses_chunks("Q8_0", 1, 4864, 896) and qmm.uses_chunks("Q4_K", 8, 896, 4864)
    assert not qmm.uses_chunks("Q5_0", 1, 4864, 896)  # its f32 temporary fits the cache: whole is faster
    assert qmm.uses_chunks("Q5_0", 1, 151936, 896) and qmm.uses_chunks("Q6_K", 1, 151936, 1024)
    assert not qmm.uses_chunks("Q8_0", 1, 40, 896)  # under two chunks
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert not qmm.uses_chunks("Q8_0", 1, 151936, 896)


def test_jit_does_not_recompile_for_new_data_of_the_same_shape():
    traces = []

    @jax.jit
    def f(x, w):
        traces.append(1)
        return quantized_matmul_jnp(x, w)

    x = jnp.ones((3, COLS), jnp.float32)
    first, second = weight("Q4_K", seed=1), weight("Q4_K", seed=2)
    y1 = f(x, first)
    y2 = f(x * 2, second)
    assert len(traces) == 1
    assert_close_to_reference(y1, np.ones((3, COLS)), first)
    assert_close_to_reference(y2, np.full((3, COLS), 2.0), second)
    f(x, weight("Q8_0"))  # another format is another program: qtype is static
    assert len(traces) == 2


def test_jnp_matmul_rejects_mismatched_columns():
    with pytest.raises(ConfigError, match="512.*\\(2, 256\\)"):
        quantized_matmul_jnp(jnp.ones((2, 256)), weight("Q8_0"))


# ------------------------------------------------------------------------------------------------------------
# dispatch


def product(x, qt, impl="auto"):
    """quantized_matmul under a fresh jit: dispatch happens at trace time, and jit is how models call it."""
    return jax.jit(lambda x, w: quantized_matmul(x, w, impl=impl))(x, qt)


class FakeNative:
    """Stands in for `ruvllm_jax.quant.native`: records calls, computes the product in numpy."""

    def __init__(self, ok: bool):
        self.ok, self.calls = ok, []
        self.reference: np.ndarray | None = None  # the test's weights, decoded by gguf (w.data is traced)

    def available(self) -> bool:
        return self.ok

    def matmul(self, x, w):
        self.calls.append(tuple(x.shape))
        assert self.reference is not None and self.reference.shape == w.shape
        return x @ jnp.asarray(self.reference.T, jnp.float32)


@pytest.fixture
def fake_native(monkeypatch):
    def install(ok: bool) -> FakeNative:
        fake = FakeNative(ok)
        monkeypatch.setitem(sys.modules, "ruvllm_jax.quant.native", fake)
        monkeypatch.setattr("ruvllm_jax.quant.native", fake, raising=False)
        return fake

    return install


def test_native_flattens_leading_axes_and_restores_them(fake_native):
    fake = fake_native(True)
    qt = weight("Q5_0")
    fake.reference = reference_weights(qt)
    x = np.random.default_rng(2).standard_normal((2, 3, COLS)).astype(np.float32)
    y = product(jnp.asarray(x), qt, impl="native")
    assert fake.calls == [(6, COLS)]
    chex.assert_shape(y, (2, 3, ROWS))
    assert_close_to_reference(y, x, qt)


def test_auto_prefers_native_on_cpu_only_when_available(fake_native, monkeypatch):
    qt = weight("Q8_0")
    x = jnp.ones((4, COLS))
    fake = fake_native(True)
    fake.reference = reference_weights(qt)
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    product(x, qt)
    assert fake.calls == [(4, COLS)]
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    product(x, qt)
    assert len(fake.calls) == 1  # jnp on other backends
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    unavailable = fake_native(False)
    y = product(x, qt)
    assert unavailable.calls == []
    np.testing.assert_array_equal(np.asarray(y), np.asarray(jax.jit(quantized_matmul_jnp)(x, qt)))
    with pytest.raises(ConfigError, match="native"):
        product(x, qt, impl="native")


def test_missing_native_module_means_unavailable(monkeypatch):
    monkeypatch.setitem(sys.modules, "ruvllm_jax.quant.native", None)  # makes the import raise ImportError
    monkeypatch.delattr("ruvllm_jax.quant.native", raising=False)  # else `from ... import` finds the attribute
    assert not qmm.native_available()
    x, qt = jnp.ones((1, COLS)), weight("Q4_1")
    np.testing.assert_array_equal(np.asarray(product(x, qt)), np.asarray(jax.jit(quantized_matmul_jnp)(x, qt)))
    with pytest.raises(ConfigError, match="native"):
        product(x, qt, impl="native")


def test_jnp_impl_never_touches_native(fake_native):
    fake = fake_native(True)
    product(jnp.ones((2, COLS)), weight("Q6_K"), impl="jnp")
    assert fake.calls == []


def test_bad_impl_is_a_config_error():
    with pytest.raises(ConfigError, match="'cuda'"):
        product(jnp.ones((1, COLS)), weight("Q8_0"), impl="cuda")


# ------------------------------------------------------------------------------------------------------------
# embeddings


@pytest.mark.parametrize("name", NAMES)
def test_embed_rows_gathers_then_decodes(name):
    qt = weight(name, rows=40)
    tokens = np.array([[0, 39, 7], [7, 7, 1]])
    out = jax.jit(embed_rows)(QuantizedTensor(jnp.asarray(qt.data), qt.qtype, qt.shape), jnp.asarray(tokens))
    chex.assert_shape(out, (2, 3, COLS))
    chex.assert_type(out, jnp.float32)
    np.testing.assert_array_equal(np.asarray(out), reference_weights(qt)[tokens].astype(np.float32))


def test_embed_rows_of_plain_arrays_casts_to_float32():
    table = np.random.default_rng(3).standard_normal((10, 8)).astype(ml_dtypes.bfloat16)
    out = embed_rows(jnp.asarray(table), jnp.array([3, 3, 9]))
    chex.assert_type(out, jnp.float32)
    np.testing.assert_array_equal(np.asarray(out), table[[3, 3, 9]].astype(np.float32))


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_K"])
def test_native_product_is_differentiable_in_x(qtype):
    """Adapters train over a quantized model: d/dx of c . (x @ W.T) is c @ W with W the blocks' values,
    the same for the native forward as for the jnp one."""
    if not qmm.native_available():  # skipped only where nothing can build it; a failed build fails
        err = native.build_error() or ""
        if not any(reason in err for reason in ("needs a C++ compiler", "unsupported", "switched off")):
            pytest.fail(f"the native kernel did not build: {err}")
        pytest.skip(f"no native kernel on this machine: {err}")
    rng = np.random.default_rng(9)
    qt = quantize(rng.standard_normal((48, 256)).astype(np.float32), qtype)
    qt = QuantizedTensor(jnp.asarray(qt.data), qt.qtype, qt.shape)
    x = jnp.asarray(rng.standard_normal((3, 256)), jnp.float32)
    c = jnp.asarray(rng.standard_normal((3, 48)), jnp.float32)
    grads = {impl: jax.jit(jax.grad(lambda x, impl=impl: (quantized_matmul(x, qt, impl=impl) * c).sum()))(x)
             for impl in ("jnp", "native")}
    want = np.asarray(c, np.float64) @ dequantize(QuantizedTensor(np.asarray(qt.data), qtype, qt.shape))
    np.testing.assert_allclose(grads["native"], want, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(grads["jnp"], want, rtol=1e-5, atol=1e-4)
