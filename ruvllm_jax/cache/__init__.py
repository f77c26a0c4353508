"""KV caches: the interface the model calls, and its implementations."""

from ruvllm_jax.cache.base import KVCache
from ruvllm_jax.cache.contiguous import ContiguousKVCache
from ruvllm_jax.cache.segmented import SegmentedKVCache

__all__ = ["KVCache", "ContiguousKVCache", "SegmentedKVCache"]
