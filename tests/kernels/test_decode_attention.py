"""Split-K decode attention against the float64 reference, and exact LSE merging of cache tiers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_oracles import HEAD_LAYOUTS, assert_close, assert_stats_close, in_f64, randn

from ruvllm_jax.kernels import (
    DecodeBlockSizes,
    KernelOptions,
    decode_attention,
    decode_attention_reference,
    merge_attention,
)
from ruvllm_jax.kernels.decode import decode_attention_pallas

# 16-key tiles and up to 3 splits, so the test caches span several splits and end mid-tile.
SMALL_BLOCKS = DecodeBlockSizes(block_k=16, max_splits=3)


def run_decode(path, q, k, v, lengths, window):
    if path == "jnp":
        return decode_attention(q, k, v, lengths, sliding_window=window, impl="jnp", return_residuals=True)
    return decode_attention(q, k, v, lengths, sliding_window=window, impl="pallas", interpret=True,
                            block_sizes=SMALL_BLOCKS, return_residuals=True)


decode_cases = st.fixed_dictionaries(dict(
    batch=st.integers(1, 3),
    cache=st.sampled_from([1, 7, 40, 100]),
    heads=st.sampled_from(HEAD_LAYOUTS),
    head_dim=st.sampled_from([64, 128]),
    window=st.sampled_from([None, None, 1, 9]),
    dtype=st.sampled_from([jnp.float32, jnp.bfloat16]),
    seed=st.integers(0, 2**16),
))


def check_decode_case(path, case):
    rng = np.random.default_rng(case["seed"])
    h, kvh = case["heads"]
    b, t, d, dtype = case["batch"], case["cache"], case["head_dim"], case["dtype"]
    q, k, v = randn(rng, (b, h, d), dtype), randn(rng, (b, kvh, t, d), dtype), randn(rng, (b, kvh, t, d), dtype)
    lengths = jnp.asarray(rng.integers(0, t + 1, b), jnp.int32).at[0].set(t)  # full, partial and empty rows
    out, (m, l) = run_decode(path, q, k, v, lengths, case["window"])
    ref_out, (ref_m, ref_l) = in_f64(decode_attention_reference, q, k, v, lengths, sliding_window=case["window"])
    assert out.shape == q.shape and out.dtype == dtype
    assert_close(out, ref_out, dtype, name=f"{path} out {case}")
    assert_stats_close(m, ref_m, dtype, name=f"{path} max {case}")
    assert_close(l, ref_l, dtype, kind="stat", name=f"{path} sum {case}")


@settings(max_examples=8, deadline=None, derandomize=True)
@given(case=decode_cases)
def test_decode_jnp_path_matches_float64_reference(case):
    check_decode_case("jnp", case)


@settings(max_examples=7, deadline=None, derandomize=True)
@given(case=decode_cases)
def test_decode_triton_kernel_interpreted_matches_float64_reference(case):
    check_decode_case("triton", case)


@pytest.mark.parametrize("path", ["jnp", "triton"])
def test_merging_two_tiers_equals_attention_over_the_concatenated_cache(path):
    rng = np.random.default_rng(11)
    b, h, kvh, d, t1, t2 = 2, 14, 2, 64, 37, 21
    q = randn(rng, (b, h, d), jnp.float32)
    k, v = randn(rng, (b, kvh, t1 + t2, d), jnp.float32), randn(rng, (b, kvh, t1 + t2, d), jnp.float32)
    len2 = jnp.array([t2, 5])  # the second tier is partly filled for sequence 1
    kw = dict(impl="pallas", interpret=True) if path == "triton" else dict(impl="jnp")
    o1, r1 = decode_attention(q, k[:, :, :t1], v[:, :, :t1], jnp.array([t1, t1]), return_residuals=True, **kw)
    o2, r2 = decode_attention(q, k[:, :, t1:], v[:, :, t1:], len2, return_residuals=True, **kw)
    out, (m, l) = merge_attention([o1, o2], [r1, r2])
    # Concatenated cache: tier 1 in full, then the valid prefix of tier 2.
    full = np.zeros((b, kvh, t1 + t2, d), np.float32)
    k_cat, v_cat = full.copy(), full.copy()
    for i, n in enumerate(np.asarray(len2)):
        k_cat[i, :, : t1 + n] = np.asarray(k[i, :, : t1 + n])
        v_cat[i, :, : t1 + n] = np.asarray(v[i, :, : t1 + n])
    ref_out, (ref_m, ref_l) = in_f64(decode_attention_reference, q, k_cat, v_cat, t1 + len2)
    assert_close(out, ref_out, jnp.float32)
    assert_stats_close(m, ref_m, jnp.float32)
    assert_close(l, ref_l, jnp.float32, kind="stat")


def test_merging_an_empty_tier_is_the_identity():
    rng = np.random.default_rng(12)
    q, k, v = randn(rng, (1, 4, 64), jnp.float32), randn(rng, (1, 2, 9, 64), jnp.float32), randn(
        rng, (1, 2, 9, 64), jnp.float32)
    o1, r1 = decode_attention(q, k, v, jnp.array([9]), impl="jnp", return_residuals=True)
    o0, r0 = decode_attention(q, k, v, jnp.array([0]), impl="jnp", return_residuals=True)
    assert np.all(np.isneginf(np.asarray(r0[0]))) and np.all(np.asarray(r0[1]) == 0) and np.all(np.asarray(o0) == 0)
    out, (m, l) = merge_attention([o0, o1], [r0, r1])
    np.testing.assert_allclose(np.asarray(out), np.asarray(o1), rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(np.asarray(m), np.asarray(r1[0]))


def test_decode_auto_is_the_platforms_path_bit_for_bit():
    """"auto" is jnp on CPU (and on TPU: no Mosaic decode kernel), the Triton kernel on GPU."""
    platform_impl = "pallas" if jax.default_backend() in ("gpu", "cuda", "rocm") else "jnp"
    rng = np.random.default_rng(13)
    q, k, v = randn(rng, (2, 4, 64), jnp.float32), randn(rng, (2, 2, 16, 64), jnp.float32), randn(
        rng, (2, 2, 16, 64), jnp.float32)
    lengths = jnp.array([16, 3])
    np.testing.assert_array_equal(np.asarray(decode_attention(q, k, v, lengths)),
                                  np.asarray(decode_attention(q, k, v, lengths, impl=platform_impl)))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_decode_kernel_lowers_for_gpu(dtype):
    q, k = jnp.zeros((2, 14, 64), dtype), jnp.zeros((2, 2, 1024, 64), dtype)
    for window in (None, 100):
        kernel = KernelOptions(impl="pallas", pallas_backend="triton")
        jax.jit(lambda q, k, v, n, window=window, kernel=kernel: decode_attention_pallas(
            q, k, v, n, scale=0.125, window=window, kernel=kernel)).trace(q, k, k, jnp.array([5, 1000])).lower(
            lowering_platforms=("cuda",))
