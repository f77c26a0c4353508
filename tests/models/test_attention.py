"""The model's one attention path: any mix of cache parts equals attention over all their keys.

Oracle: `decode_attention_reference` in float64 over the keys of every part laid end to end in
position order (a contiguous store, a paged store, the new token), with the layer's sliding window
in Hugging Face's convention. Each part only knows its own coordinates (`query_offset`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ruvllm_jax.cache import KVPart, PagedKVPart
from ruvllm_jax.errors import KvCacheError
from ruvllm_jax.kernels import KernelOptions, decode_attention_reference
from ruvllm_jax.models import attention

B, H, KVH, D, BS = 2, 4, 2, 16, 4
STORED = np.array([5, 9])  # tokens in the contiguous part, per sequence
PAGED = 6  # tokens in the paged part (2 blocks), the same count for both sequences


def _parts_and_full(seed: int):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, H, D)).astype(np.float32)
    t1 = 12
    k1, v1 = (rng.standard_normal((B, KVH, t1, D)).astype(np.float32) for _ in range(2))  # junk past STORED
    k2, v2 = (rng.standard_normal((B, KVH, PAGED, D)).astype(np.float32) for _ in range(2))
    k3, v3 = (rng.standard_normal((B, KVH, 1, D)).astype(np.float32) for _ in range(2))
    # Scatter the paged part into a shuffled pool with junk blocks around it.
    nb = 7
    pools = [rng.standard_normal((KVH, nb, BS, D)).astype(np.float32) for _ in range(2)]
    tables = rng.permutation(nb)[: 2 * B].reshape(B, 2)
    for pool, x in zip(pools, (k2, v2), strict=True):
        padded = np.concatenate([x, np.zeros((B, KVH, 2 * BS - PAGED, D), np.float32)], axis=2)
        for b in range(B):
            pool[:, tables[b]] = padded[b].reshape(KVH, 2, BS, D)
    # The query sits at position STORED + PAGED, as the last key; each part places it in its own
    # coordinates: index STORED + PAGED of the stored part, PAGED of the paged one, 0 of the new one.
    parts = (
        KVPart(jnp.asarray(k1), jnp.asarray(v1), jnp.asarray(STORED, jnp.int32), query_offset=PAGED),
        PagedKVPart(jnp.asarray(pools[0]), jnp.asarray(pools[1]), jnp.asarray(tables, jnp.int32),
                    jnp.full((B,), PAGED, jnp.int32), query_offset=0),
        KVPart(jnp.asarray(k3), jnp.asarray(v3), jnp.ones((B,), jnp.int32), query_offset=-1),
    )
    total = STORED + PAGED + 1
    full_k = np.zeros((B, KVH, total.max(), D), np.float32)
    full_v = np.zeros_like(full_k)
    for b in range(B):
        n = STORED[b]
        full_k[b, :, :n], full_v[b, :, :n] = k1[b, :, :n], v1[b, :, :n]
        full_k[b, :, n:n + PAGED], full_v[b, :, n:n + PAGED] = k2[b], v2[b]
        full_k[b, :, n + PAGED], full_v[b, :, n + PAGED] = k3[b, :, 0], v3[b, :, 0]
    return q, parts, (full_k, full_v, total)


@pytest.mark.parametrize("window", [None, 1, 2, 7, 9, 40])
@pytest.mark.parametrize("kernel", [KernelOptions(impl="jnp"), KernelOptions(impl="pallas", interpret=True)],
                         ids=["jnp", "pallas"])
def test_parts_merge_to_attention_over_all_keys(window, kernel):
    q, parts, (full_k, full_v, total) = _parts_and_full(seed=0)
    out = attention.attend_parts(jnp.asarray(q), parts, scale=0.3, sliding_window=window, kernel=kernel)
    with jax.enable_x64(True):
        ref, _ = decode_attention_reference(jnp.asarray(q, jnp.float64), jnp.asarray(full_k, jnp.float64),
                                            jnp.asarray(full_v, jnp.float64), jnp.asarray(total), scale=0.3,
                                            sliding_window=window)
        ref = np.asarray(ref)
    assert out.shape == (B, H, D) and out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out, np.float64), ref, atol=2e-5, rtol=2e-5)


def test_part_window_in_each_parts_coordinates():
    _, parts, _ = _parts_and_full(seed=1)
    stored, _, new = parts
    assert attention.part_window(stored, None) is None
    assert attention.part_window(new, 3) == 3  # the query is the new part's only key
    assert attention.part_window(stored, 3) == 0  # PAGED + 1 keys follow the stored part: none visible
    assert attention.part_window(stored, PAGED + 4) == 3  # the stored part's last 3 keys
    with pytest.raises(KvCacheError, match="cannot take a sliding window of 5"):
        attention.part_window(stored.replace(query_offset=None), 5)


def test_bad_parts_raise_kv_cache_errors():
    q, parts, _ = _parts_and_full(seed=2)
    kernel = KernelOptions(impl="jnp")
    with pytest.raises(KvCacheError, match="cannot read a part of type tuple"):
        attention.attend_parts(jnp.asarray(q), [(1, 2)], scale=0.3, sliding_window=None, kernel=kernel)
    with pytest.raises(KvCacheError, match="no part holds a key"):
        attention.attend_parts(jnp.asarray(q), [], scale=0.3, sliding_window=None, kernel=kernel)
