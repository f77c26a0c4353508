"""AttentionConfig, the impl dispatch rules, and RuvLLM's GQA/MQA call forms."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernel_oracles import assert_close, in_f64, randn

from ruvllm_jax.errors import ConfigError
from ruvllm_jax.kernels import (
    AttentionConfig,
    decode_attention,
    flash_attention,
    flash_attention_reference,
    grouped_query_attention,
    multi_query_attention,
)


def test_attention_config_ratio_and_scale():
    cfg = AttentionConfig(num_heads=14, num_kv_heads=2, head_dim=64, causal=True, scale=None)
    assert cfg.gqa_ratio() == 7
    assert cfg.effective_scale() == pytest.approx(1 / math.sqrt(64))
    assert AttentionConfig(8, 8, 128, False, 0.5).effective_scale() == 0.5
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.num_heads = 7


@pytest.mark.parametrize("kwargs,needle", [
    (dict(num_heads=14, num_kv_heads=4, head_dim=64), "num_heads=14 is not a multiple of num_kv_heads=4"),
    (dict(num_heads=0, num_kv_heads=1, head_dim=64), "num_heads must be a positive int, got 0"),
    (dict(num_heads=4, num_kv_heads=2, head_dim=-3), "head_dim must be a positive int, got -3"),
    (dict(num_heads=4, num_kv_heads=2, head_dim=64, scale=float("nan")), "scale"),
])
def test_attention_config_rejects_bad_values_naming_them(kwargs, needle):
    with pytest.raises(ConfigError, match=needle) as info:
        AttentionConfig(**kwargs)
    assert str(info.value).startswith("Configuration error:")


def test_impl_dispatch_errors_are_config_errors():
    q, k = jnp.zeros((1, 4, 2, 64)), jnp.zeros((1, 4, 1, 64))
    with pytest.raises(ConfigError, match="'cuda'"):
        flash_attention(q, k, k, impl="cuda")
    if jax.default_backend() == "cpu":
        with pytest.raises(ConfigError, match="interpret=True"):
            flash_attention(q, k, k, impl="pallas")
    with pytest.raises(ConfigError, match="sliding_window must be a positive int or None, got 0"):
        flash_attention(q, k, k, sliding_window=0)
    with pytest.raises(ConfigError, match="H % KVH"):
        flash_attention(jnp.zeros((1, 4, 3, 64)), jnp.zeros((1, 4, 2, 64)), jnp.zeros((1, 4, 2, 64)))
    with pytest.raises(ConfigError, match="no Mosaic"):
        decode_attention(jnp.zeros((1, 2, 64)), jnp.zeros((1, 1, 8, 64)), jnp.zeros((1, 1, 8, 64)), jnp.array([8]),
                         impl="pallas", interpret=True, pallas_backend="mosaic")


def single_query_reference(q, k, v, scale):
    """q [H, D], k/v [T, KVH, D] -> [H, D] by plain numpy softmax, KV heads repeated."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    h, kvh = q.shape[0], k.shape[1]
    k, v = np.repeat(k, h // kvh, axis=1), np.repeat(v, h // kvh, axis=1)
    logits = np.einsum("hd,thd->ht", q, k) * scale
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    return np.einsum("ht,thd->hd", w, v)


@pytest.mark.parametrize("impl", ["jnp", "pallas"])
def test_grouped_query_attention_ruvllm_unbatched_form(impl):
    rng = np.random.default_rng(31)
    cfg = AttentionConfig(num_heads=14, num_kv_heads=2, head_dim=64, causal=True, scale=0.1)
    q, k, v = randn(rng, (14, 64), jnp.float32), randn(rng, (23, 2, 64), jnp.float32), randn(rng, (23, 2, 64),
                                                                                             jnp.float32)
    out = grouped_query_attention(q, k, v, cfg, impl=impl, interpret=True)
    assert out.shape == (14, 64)
    np.testing.assert_allclose(np.asarray(out), single_query_reference(q, k, v, 0.1), atol=2e-5, rtol=2e-5)


def test_grouped_query_attention_batched_decode_and_prefill_forms():
    rng = np.random.default_rng(32)
    cfg = AttentionConfig(num_heads=4, num_kv_heads=2, head_dim=64, causal=True)
    q, k, v = randn(rng, (2, 4, 64), jnp.float32), randn(rng, (2, 9, 2, 64), jnp.float32), randn(rng, (2, 9, 2, 64),
                                                                                                 jnp.float32)
    out = grouped_query_attention(q, k, v, cfg, lengths=jnp.array([9, 4]), impl="jnp")
    np.testing.assert_allclose(np.asarray(out[0]), single_query_reference(q[0], k[0], v[0], 0.125), atol=2e-5)
    np.testing.assert_allclose(np.asarray(out[1]), single_query_reference(q[1], k[1, :4], v[1, :4], 0.125), atol=2e-5)
    qs = randn(rng, (2, 9, 4, 64), jnp.float32)
    prefill = grouped_query_attention(qs, k, v, cfg, impl="jnp")
    ref, _ = in_f64(flash_attention_reference, qs, k, v, causal=True)
    assert_close(prefill, ref, jnp.float32)
    with pytest.raises(ConfigError, match="num_kv_heads=4"):
        grouped_query_attention(q, k, v, AttentionConfig(num_heads=4, num_kv_heads=4, head_dim=64))


@pytest.mark.parametrize("impl", ["jnp", "pallas"])
def test_multi_query_attention_ruvllm_form_shares_one_kv_head(impl):
    rng = np.random.default_rng(33)
    cfg = AttentionConfig(num_heads=7, num_kv_heads=1, head_dim=128, causal=False)
    q, k, v = randn(rng, (7, 128), jnp.float32), randn(rng, (30, 128), jnp.float32), randn(rng, (30, 128), jnp.float32)
    out = multi_query_attention(q, k, v, cfg, impl=impl, interpret=True)
    np.testing.assert_allclose(np.asarray(out), single_query_reference(q, k[:, None], v[:, None], 128 ** -0.5),
                               atol=2e-5, rtol=2e-5)
    batched = multi_query_attention(q[None], k[None], v[None], cfg, impl="jnp")
    np.testing.assert_allclose(np.asarray(batched[0]), np.asarray(out), atol=2e-5)
    with pytest.raises(ConfigError, match="num_kv_heads == 1, got 7"):
        multi_query_attention(q, k, v, AttentionConfig(num_heads=7, num_kv_heads=7, head_dim=128))
