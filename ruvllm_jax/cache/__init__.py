"""KV caches: pytrees with pure store functions that hand their contents to attention as parts."""

from ruvllm_jax.cache.base import KVCache, KVPart, PagedKVPart, QuantizedKVPart
from ruvllm_jax.cache.contiguous import ContiguousKVCache
from ruvllm_jax.cache.segmented import SegmentedKVCache
from ruvllm_jax.cache.two_tier import CacheQuantization, KvCacheStats, TwoTierKVCache, TwoTierKvCache, TwoTierSpec

__all__ = ["KVCache", "KVPart", "PagedKVPart", "QuantizedKVPart", "ContiguousKVCache", "SegmentedKVCache",
           "CacheQuantization", "KvCacheStats", "TwoTierKVCache", "TwoTierKvCache", "TwoTierSpec"]
