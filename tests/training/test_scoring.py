"""Sliding-window scoring scores every token once, with the left context the windows promise."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ruvllm_jax.errors import ConfigError
from ruvllm_jax.models import llama
from ruvllm_jax.models.config import LlamaConfig
from ruvllm_jax.training import scoring

CFG = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=8, max_position_embeddings=16)


@pytest.fixture(scope="module")
def params():
    return llama.init_params(CFG, jax.random.PRNGKey(0), std=0.3)


@pytest.mark.parametrize(
    "n,context,stride", [(2, 16, 8), (16, 16, 8), (17, 16, 8), (50, 16, 5), (50, 16, 15), (40, 8, 1)]
)
def test_windows_score_each_target_exactly_once(n, context, stride):
    counts = np.zeros(n, int)
    for b, e, first in scoring.sliding_windows(n, context, stride):
        assert e - b <= context and b < first <= e
        counts[first:e] += 1
    np.testing.assert_array_equal(counts[1:], 1)


@pytest.mark.parametrize("stride", [0, 16, 17])
def test_stride_must_leave_left_context(stride):
    with pytest.raises(ConfigError):
        scoring.sliding_windows(50, 16, stride)


def test_stride_one_matches_per_token_brute_force(params):
    """With stride 1, token t is scored with min(t, context - 1) tokens of left context: the oracle
    scores each t >= context - 1 by its own forward over exactly that window (one jitted shape) and
    the earlier ones from the first window's forward."""
    ids = np.random.default_rng(0).integers(0, CFG.vocab_size, 30).astype(np.int32)
    context = 8
    fwd = jax.jit(lambda p, x: jax.nn.log_softmax(llama.forward(p, CFG, x), axis=-1))
    first = fwd(params, jnp.asarray(ids[None, :context]))[0]
    want = -sum(float(first[t - 1, ids[t]]) for t in range(1, context))
    for t in range(context, len(ids)):
        want -= float(fwd(params, jnp.asarray(ids[None, t - context + 1:t + 1]))[0, -2, ids[t]])
    got, n = scoring.score_text(params, CFG, ids, context, 1, batch_size=4)
    assert n == len(ids) - 1
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_one_window_equals_full_forward(params):
    ids = np.random.default_rng(1).integers(0, CFG.vocab_size, 16).astype(np.int32)
    logp = jax.nn.log_softmax(llama.forward(params, CFG, jnp.asarray(ids[None])), axis=-1)[0]
    want = -float(jnp.sum(logp[jnp.arange(15), ids[1:]]))
    got, n = scoring.score_text(params, CFG, ids, 16, 8)
    assert n == 15
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_strides_agree_roughly(params):
    """~200 tokens, many windows: every stride scores each of the N - 1 targets once, so the totals
    differ only by how much left context each token had (a little, but not float noise), while a
    scorer that dropped or double-counted overlapping targets would be off by a large factor."""
    ids = np.random.default_rng(2).integers(0, CFG.vocab_size, 200).astype(np.int32)
    got = {s: scoring.score_text(params, CFG, ids, 16, s, batch_size=8) for s in (4, 8, 15)}
    ref = got[4][0]
    for s, (nats, n) in got.items():
        assert n == len(ids) - 1, (s, n)
        assert abs(nats - ref) < 0.05 * ref, (s, nats, ref)  # they differ by about 2%
    for s in (8, 15):
        assert abs(got[s][0] - ref) > 1e-4 * ref, (s, got[s][0], ref)  # the stride really changed the windows


def test_byte_count_is_of_the_scored_tokens(params):
    ids = np.array([3, 5, 7, 9], np.int32)
    lengths = np.arange(CFG.vocab_size)
    _, n, n_bytes = scoring.score_text(params, CFG, ids, 16, 8, byte_lengths=lengths)
    assert (n, n_bytes) == (3, 5 + 7 + 9)


def _random_adapters(seed: int, b_std: float) -> dict:
    """Q/V LoRA on every layer of CFG, in the pytree `llama.forward(..., adapters=...)` takes."""
    rng = np.random.default_rng(seed)
    out = {"q": CFG.q_size, "v": CFG.kv_size}
    layer = lambda: {k: {"A": jnp.asarray(rng.normal(size=(CFG.hidden_size, 2)), jnp.float32),  # noqa: E731
                         "B": jnp.asarray(b_std * rng.normal(size=(2, n)), jnp.float32),
                         "scaling": jnp.float32(2.0)} for k, n in out.items()}
    return {"layers": [layer() for _ in range(CFG.num_layers)]}


def test_adapters_change_the_score_as_a_direct_forward_does(params):
    """Adapters with non-zero B reach the model: the score moves, and equals the one computed from
    `llama.forward(..., adapters=...)` directly; new adapter values reuse the compiled scorer."""
    ids = np.random.default_rng(3).integers(0, CFG.vocab_size, 16).astype(np.int32)
    adapters = _random_adapters(0, 0.5)
    logp = jax.nn.log_softmax(llama.forward(params, CFG, jnp.asarray(ids[None]), adapters=adapters), axis=-1)[0]
    want = -float(jnp.sum(logp[jnp.arange(15), ids[1:]]))
    plain, _ = scoring.score_text(params, CFG, ids, 16, 8)
    got, n = scoring.score_text(params, CFG, ids, 16, 8, adapters=adapters)
    assert n == 15
    assert abs(got - plain) > 1e-3 * plain, (got, plain)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    compiled = scoring._score._cache_size()
    other, _ = scoring.score_text(params, CFG, ids, 16, 8, adapters=_random_adapters(1, 0.5))
    assert other != got and scoring._score._cache_size() == compiled  # same structure: no recompile


def test_zero_b_adapters_leave_the_score_unchanged(params):
    ids = np.random.default_rng(4).integers(0, CFG.vocab_size, 40).astype(np.int32)
    plain, _ = scoring.score_text(params, CFG, ids, 16, 8)
    zero, _ = scoring.score_text(params, CFG, ids, 16, 8, adapters=_random_adapters(0, 0.0))
    np.testing.assert_allclose(zero, plain, rtol=1e-6)
