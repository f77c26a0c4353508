"""KV caches: pytrees with pure store functions that hand their contents to attention as parts."""

from ruvllm_jax.cache.base import KVCache, KVPart, PagedKVPart
from ruvllm_jax.cache.contiguous import ContiguousKVCache
from ruvllm_jax.cache.segmented import SegmentedKVCache

__all__ = ["KVCache", "KVPart", "PagedKVPart", "ContiguousKVCache", "SegmentedKVCache"]
