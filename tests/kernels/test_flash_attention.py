"""Flash (prefill) attention on every path against the float64 reference, plus gradients and lowering."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_oracles import HEAD_LAYOUTS, assert_close, assert_stats_close, in_f64, randn

from ruvllm_jax.kernels import BlockSizes, FlashBlockSizes, KernelOptions, flash_attention, flash_attention_reference
from ruvllm_jax.kernels.flash import flash_attention_pallas

# Small tiles so that the test shapes span several blocks and end mid-block.
SMALL_BLOCKS = FlashBlockSizes(block_q=8, block_k=16)


def run_flash(path, q, k, v, causal, window):
    if path == "jnp":
        return flash_attention(q, k, v, causal=causal, sliding_window=window, impl="jnp", return_lse=True)
    return flash_attention(q, k, v, causal=causal, sliding_window=window, impl="pallas", interpret=True,
                           pallas_backend=path, block_sizes=SMALL_BLOCKS, return_lse=True)


flash_cases = st.fixed_dictionaries(dict(
    batch=st.integers(1, 2),
    seq_q=st.sampled_from([1, 5, 17]),
    extra_k=st.sampled_from([0, 0, 3, 20]),  # T = S (prefill) or a chunk after a prefix
    heads=st.sampled_from(HEAD_LAYOUTS),
    head_dim=st.sampled_from([64, 128]),
    causal=st.booleans(),
    window=st.sampled_from([None, None, 1, 6]),
    dtype=st.sampled_from([jnp.float32, jnp.bfloat16]),
    seed=st.integers(0, 2**16),
))


def check_flash_case(path, case):
    rng = np.random.default_rng(case["seed"])
    h, kvh = case["heads"]
    b, s, d, dtype = case["batch"], case["seq_q"], case["head_dim"], case["dtype"]
    t = s + case["extra_k"]
    q, k, v = randn(rng, (b, s, h, d), dtype), randn(rng, (b, t, kvh, d), dtype), randn(rng, (b, t, kvh, d), dtype)
    out, lse = run_flash(path, q, k, v, case["causal"], case["window"])
    ref_out, ref_lse = in_f64(flash_attention_reference, q, k, v, causal=case["causal"],
                              sliding_window=case["window"])
    assert out.shape == q.shape and out.dtype == dtype and lse.shape == (b, h, s)
    assert_close(out, ref_out, dtype, name=f"{path} out {case}")
    assert_stats_close(lse, ref_lse, dtype, name=f"{path} lse {case}")


@settings(max_examples=8, deadline=None, derandomize=True)
@given(case=flash_cases)
def test_flash_jnp_path_matches_float64_reference(case):
    check_flash_case("jnp", case)


@settings(max_examples=7, deadline=None, derandomize=True)
@given(case=flash_cases)
def test_flash_triton_kernel_interpreted_matches_float64_reference(case):
    check_flash_case("triton", case)


@settings(max_examples=4, deadline=None, derandomize=True)
@given(case=flash_cases)
def test_flash_mosaic_kernel_interpreted_matches_float64_reference(case):
    check_flash_case("mosaic", case)


@pytest.mark.parametrize("path", ["jnp", "triton"])
@pytest.mark.parametrize("causal,window", [(True, None), (False, 5)])
def test_flash_gradients_equal_reference_gradients(path, causal, window):
    rng = np.random.default_rng(7)
    q, k, v = randn(rng, (1, 9, 4, 64), jnp.float32), randn(rng, (1, 12, 2, 64), jnp.float32), randn(
        rng, (1, 12, 2, 64), jnp.float32)
    w_out, w_lse = randn(rng, (1, 9, 4, 64), jnp.float32), randn(rng, (1, 4, 9), jnp.float32)

    def loss(fn):
        def f(q, k, v):
            out, lse = fn(q, k, v)
            return jnp.sum(out * w_out) + jnp.sum(lse * w_lse)
        return f

    options = KernelOptions(impl="jnp") if path == "jnp" else KernelOptions(impl="pallas", interpret=True)

    def kernel(q, k, v):
        return flash_attention(q, k, v, causal=causal, sliding_window=window, return_lse=True, kernel=options)

    def ref(q, k, v):
        return flash_attention_reference(q, k, v, causal=causal, sliding_window=window)

    grads = jax.jit(jax.grad(loss(kernel), argnums=(0, 1, 2)))(q, k, v)
    ref_grads = in_f64(jax.jit(jax.grad(loss(ref), argnums=(0, 1, 2))), q, k, v)
    for name, g, r in zip("qkv", grads, ref_grads, strict=True):
        np.testing.assert_allclose(np.asarray(g), r, atol=5e-5, rtol=5e-5, err_msg=f"d{name}")


def test_flash_public_dispatch_runs_each_pallas_backend_in_interpret_mode():
    rng = np.random.default_rng(3)
    q, k, v = randn(rng, (2, 70, 4, 64), jnp.float32), randn(rng, (2, 70, 1, 64), jnp.float32), randn(
        rng, (2, 70, 1, 64), jnp.float32)
    ref, _ = in_f64(flash_attention_reference, q, k, v, causal=True)
    for backend in ("triton", "mosaic"):
        out = flash_attention(q, k, v, impl="pallas", interpret=True, pallas_backend=backend)
        assert_close(out, ref, jnp.float32, name=backend)


def test_flash_auto_is_the_platforms_path_bit_for_bit():
    """"auto" is jnp on CPU and the Pallas kernel on GPU/TPU."""
    platform_impl = "jnp" if jax.default_backend() == "cpu" else "pallas"
    rng = np.random.default_rng(4)
    q, k, v = randn(rng, (1, 6, 4, 64), jnp.float32), randn(rng, (1, 6, 2, 64), jnp.float32), randn(
        rng, (1, 6, 2, 64), jnp.float32)
    np.testing.assert_array_equal(np.asarray(flash_attention(q, k, v)),
                                  np.asarray(flash_attention(q, k, v, impl=platform_impl)))


@pytest.mark.parametrize("impl", ["jnp", "pallas"])
def test_flash_accepts_ruvllm_single_query_form(impl):
    rng = np.random.default_rng(5)
    q, k, v = randn(rng, (64,), jnp.float32), randn(rng, (11, 64), jnp.float32), randn(rng, (11, 64), jnp.float32)
    out = flash_attention(q, k, v, 0.2, True, impl=impl, interpret=True)
    weights = jax.nn.softmax(np.asarray(k, np.float64) @ np.asarray(q, np.float64) * 0.2)
    assert out.shape == (64,)
    np.testing.assert_allclose(np.asarray(out), weights @ np.asarray(v, np.float64), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("backend,platform", [("triton", "cuda"), ("mosaic", "tpu")])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_flash_kernels_lower_for_their_accelerator(backend, platform, dtype):
    """No GPU/TPU here: lowering (Triton IR / Mosaic MLIR) still checks block shapes and ops."""
    q, k = jnp.zeros((1, 300, 14, 64), dtype), jnp.zeros((1, 300, 2, 64), dtype)
    for causal, window in ((True, None), (False, 64)):
        kernel = KernelOptions(impl="pallas", pallas_backend=backend, block_sizes=BlockSizes())
        jax.jit(lambda q, k, v, causal=causal, window=window, kernel=kernel: flash_attention_pallas(
            q, k, v, causal=causal, scale=0.125, window=window, kernel=kernel)).trace(q, k, k).lower(
            lowering_platforms=(platform,))
