"""KV caches: pytrees with pure store functions that hand their contents to attention as parts."""

from ruvllm_jax.cache.allocator import BlockAllocator, BlockCopy, PagedAllocator
from ruvllm_jax.cache.base import KVCache, KVPart, PagedKVPart, QuantizedKVPart
from ruvllm_jax.cache.contiguous import ContiguousKVCache
from ruvllm_jax.cache.paged import PagedKVCache, PagedKvCache, PagedSpec
from ruvllm_jax.cache.segmented import SegmentedKVCache
from ruvllm_jax.cache.two_tier import CacheQuantization, KvCacheStats, TwoTierKVCache, TwoTierKvCache, TwoTierSpec

__all__ = ["KVCache", "KVPart", "PagedKVPart", "QuantizedKVPart", "ContiguousKVCache", "SegmentedKVCache",
           "CacheQuantization", "KvCacheStats", "TwoTierKVCache", "TwoTierKvCache", "TwoTierSpec",
           "BlockAllocator", "BlockCopy", "PagedAllocator", "PagedKvCache", "PagedKVCache", "PagedSpec"]
