"""Paged attention equals contiguous attention over the same KV scattered into shuffled blocks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_oracles import HEAD_LAYOUTS, assert_close, assert_stats_close, in_f64, randn

from ruvllm_jax.errors import PagedAttentionError
from ruvllm_jax.kernels import KernelOptions, PagedBlockSizes, decode_attention_reference, paged_attention
from ruvllm_jax.kernels.paged import paged_attention_pallas

SMALL_BLOCKS = PagedBlockSizes(pages_per_compute_block=2, max_splits=3)


def scatter_into_pages(rng, cache, block_size, spare_blocks=3):
    """Contiguous [B, KVH, T, D] (T = max_blocks * block_size) -> shuffled pool + block tables."""
    b, kvh, t, d = cache[0].shape
    max_blocks = t // block_size
    num_blocks = b * max_blocks + spare_blocks
    ids = rng.permutation(num_blocks)[: b * max_blocks].reshape(b, max_blocks)
    pools = []
    for x in cache:
        pool = np.asarray(randn(rng, (kvh, num_blocks, block_size, d), jnp.float32)).astype(x.dtype)  # junk elsewhere
        blocks = np.asarray(x).reshape(b, kvh, max_blocks, block_size, d)
        for i in range(b):
            pool[:, ids[i]] = blocks[i]
        pools.append(jnp.asarray(pool))
    return pools, jnp.asarray(ids, jnp.int32)


def run_paged(path, q, kp, vp, tables, lengths, ks=None, vs=None, window=None):
    if path == "jnp":
        return paged_attention(q, kp, vp, tables, lengths, k_scales=ks, v_scales=vs, sliding_window=window,
                               impl="jnp", return_residuals=True)
    return paged_attention(q, kp, vp, tables, lengths, k_scales=ks, v_scales=vs, sliding_window=window,
                           impl="pallas", interpret=True, pallas_backend=path, block_sizes=SMALL_BLOCKS,
                           return_residuals=True)


paged_cases = st.fixed_dictionaries(dict(
    batch=st.integers(1, 3),
    block_size=st.sampled_from([8, 16]),
    max_blocks=st.sampled_from([1, 3, 5]),
    heads=st.sampled_from(HEAD_LAYOUTS),
    head_dim=st.sampled_from([64, 128]),
    window=st.sampled_from([None, None, 10]),
    dtype=st.sampled_from([jnp.float32, jnp.bfloat16]),
    seed=st.integers(0, 2**16),
))


def check_paged_case(path, case):
    rng = np.random.default_rng(case["seed"])
    h, kvh = case["heads"]
    b, bs, mb, d, dtype = case["batch"], case["block_size"], case["max_blocks"], case["head_dim"], case["dtype"]
    t = bs * mb
    q = randn(rng, (b, h, d), dtype)
    k, v = randn(rng, (b, kvh, t, d), dtype), randn(rng, (b, kvh, t, d), dtype)
    lengths = jnp.asarray(rng.integers(0, t + 1, b), jnp.int32).at[0].set(t)
    (kp, vp), tables = scatter_into_pages(rng, (k, v), bs)
    out, (m, l) = run_paged(path, q, kp, vp, tables, lengths, window=case["window"])
    ref_out, (ref_m, ref_l) = in_f64(decode_attention_reference, q, k, v, lengths, sliding_window=case["window"])
    assert out.shape == q.shape and out.dtype == dtype
    assert_close(out, ref_out, dtype, name=f"{path} out {case}")
    assert_stats_close(m, ref_m, dtype, name=f"{path} max {case}")
    assert_close(l, ref_l, dtype, kind="stat", name=f"{path} sum {case}")


@settings(max_examples=6, deadline=None, derandomize=True)
@given(case=paged_cases)
def test_paged_jnp_path_equals_contiguous_reference(case):
    check_paged_case("jnp", case)


@settings(max_examples=5, deadline=None, derandomize=True)
@given(case=paged_cases)
def test_paged_triton_kernel_interpreted_equals_contiguous_reference(case):
    check_paged_case("triton", case)


@settings(max_examples=3, deadline=None, derandomize=True)
@given(case=paged_cases)
def test_paged_mosaic_kernel_interpreted_equals_contiguous_reference(case):
    check_paged_case("mosaic", case)


def quantize_per_token(x):
    """Symmetric int8 with one scale per token (per head): codes [..., D], scales [...]."""
    x = np.asarray(x, np.float32)
    scales = np.maximum(np.abs(x).max(-1), 1e-8) / 127.0
    codes = np.clip(np.round(x / scales[..., None]), -127, 127).astype(np.int8)
    return codes, scales.astype(np.float32)


@pytest.mark.parametrize("path", ["jnp", "triton", "mosaic"])
def test_paged_int8_kv_equals_reference_over_dequantized_kv(path):
    rng = np.random.default_rng(21)
    b, h, kvh, d, bs, mb = 2, 14, 2, 64, 8, 4
    q = randn(rng, (b, h, d), jnp.float32)
    k, v = randn(rng, (b, kvh, bs * mb, d), jnp.float32), randn(rng, (b, kvh, bs * mb, d), jnp.float32)
    (kp, vp), tables = scatter_into_pages(rng, (k, v), bs)
    (kc, ks), (vc, vs) = quantize_per_token(kp), quantize_per_token(vp)
    lengths = jnp.array([bs * mb, 13])
    out, _ = run_paged(path, q, jnp.asarray(kc), jnp.asarray(vc), tables, lengths, jnp.asarray(ks), jnp.asarray(vs))
    assert kc.dtype == np.int8
    deq_k = kc.astype(np.float64) * ks[..., None]
    deq_v = vc.astype(np.float64) * vs[..., None]
    k_deq = np.stack([deq_k[:, np.asarray(tables)[i]].reshape(kvh, bs * mb, d) for i in range(b)])
    v_deq = np.stack([deq_v[:, np.asarray(tables)[i]].reshape(kvh, bs * mb, d) for i in range(b)])
    ref_out, _ = in_f64(decode_attention_reference, q, k_deq, v_deq, lengths)
    assert_close(out, ref_out, jnp.float32)
    # And the quantization really is lossy-but-close to the float KV (the dequantized values are what count).
    float_out, _ = in_f64(decode_attention_reference, q, k, v, lengths)
    assert np.abs(np.asarray(out) - float_out).max() < 0.05


def test_paged_public_dispatch_accepts_unbatched_query():
    rng = np.random.default_rng(22)
    k, v = randn(rng, (1, 2, 16, 64), jnp.float32), randn(rng, (1, 2, 16, 64), jnp.float32)
    (kp, vp), tables = scatter_into_pages(rng, (k, v), 8)
    q = randn(rng, (4, 64), jnp.float32)
    ref, _ = in_f64(decode_attention_reference, q[None], k, v, jnp.array([11]))
    for kw in (dict(impl="jnp"), dict(impl="pallas", interpret=True), dict(impl="pallas", interpret=True,
                                                                            pallas_backend="mosaic")):
        out = paged_attention(q, kp, vp, tables[0], 11, **kw)
        assert out.shape == (4, 64)
        assert_close(out, ref[0], jnp.float32, name=str(kw))


def _pool():
    return jnp.zeros((2, 6, 4, 64)), jnp.zeros((1, 4, 64))


@pytest.mark.parametrize("tables,lengths,needle", [
    ([[0, 6]], [8], "block_tables[0, 1] = 6"),
    ([[0, -1]], [5], "block_tables[0, 1] = -1"),
    ([[0, 1]], [9], "lengths[0] = 9"),
    ([[0, 1]], [-1], "lengths[0] = -1"),
])
def test_out_of_range_block_ids_and_lengths_raise_paged_attention_error(tables, lengths, needle):
    pool, q = _pool()
    with pytest.raises(PagedAttentionError, match=needle.replace("[", r"\[").replace("]", r"\]")) as info:
        paged_attention(q, pool, pool, jnp.array(tables), jnp.array(lengths), impl="jnp")
    assert str(info.value).startswith("Paged attention error:")


def test_unused_table_entries_are_not_checked_and_traced_tables_do_not_raise():
    pool, q = _pool()
    out = paged_attention(q, pool, pool, jnp.array([[0, 99]]), jnp.array([4]), impl="jnp")  # entry 1 unused
    assert out.shape == (1, 4, 64)
    jitted = jax.jit(lambda t, n: paged_attention(q, pool, pool, t, n, impl="jnp"))
    assert jitted(jnp.array([[0, 99]]), jnp.array([8])).shape == (1, 4, 64)


def test_paged_shape_mismatch_raises_paged_attention_error():
    pool, q = _pool()
    with pytest.raises(PagedAttentionError, match="block_tables"):
        paged_attention(q, pool, pool, jnp.array([0, 1]), jnp.array([3]), impl="jnp")
    with pytest.raises(PagedAttentionError, match="k_scales and v_scales"):
        paged_attention(q, pool, pool, jnp.array([[0, 1]]), jnp.array([3]), k_scales=jnp.ones((2, 6, 4)), impl="jnp")


@pytest.mark.parametrize("backend,platform", [("triton", "cuda"), ("mosaic", "tpu")])
@pytest.mark.parametrize("quantized", [False, True])
def test_paged_kernels_lower_for_their_accelerator(backend, platform, quantized):
    q = jnp.zeros((2, 14, 64), jnp.bfloat16)
    pool = jnp.zeros((2, 64, 16, 64), jnp.int8 if quantized else jnp.bfloat16)
    scales = (jnp.ones((2, 64, 16)),) * 2 if quantized else (None, None)
    for window in (None, 40):
        kernel = KernelOptions(impl="pallas", pallas_backend=backend)
        jax.jit(lambda q, kp, vp, t, n, window=window, kernel=kernel: paged_attention_pallas(
            q, kp, vp, t, n, *scales, scale=0.125, window=window, kernel=kernel)).trace(
            q, pool, pool, jnp.zeros((2, 16), jnp.int32), jnp.array([5, 200])).lower(lowering_platforms=(platform,))
