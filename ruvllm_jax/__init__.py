"""ruvllm_jax: a JAX/XLA research framework for LLM inference that learns while it serves."""

from ruvllm_jax.errors import (
    AdapterError,
    BackendError,
    ConfigError,
    GenerationError,
    InvalidOperationError,
    KvCacheError,
    ModelError,
    NotFoundError,
    OutOfMemoryError,
    PagedAttentionError,
    RuvIoError,
    RuvLLMError,
    SessionError,
    SonaError,
    StorageError,
    TokenizationError,
)
from ruvllm_jax.types import (
    DeviceType,
    GenerateParams,
    KvCacheConfig,
    MemoryStats,
    ModelConfig,
    ModelInfo,
    ModelSize,
    Precision,
)
from ruvllm_jax.backend import JaxBackend, LlmBackend, Tokenizer
from ruvllm_jax.backend.sampling import SamplingParams
from ruvllm_jax.cache import ContiguousKVCache, KVCache, SegmentedKVCache
from ruvllm_jax.kernels import (
    AttentionConfig,
    decode_attention,
    flash_attention,
    grouped_query_attention,
    merge_attention,
    multi_query_attention,
    paged_attention,
)
from ruvllm_jax.lora import (
    AdaptFeedback,
    EwcState,
    MicroLoRA,
    MicroLoraConfig,
    MicroLoraStats,
    TargetModule,
)
from ruvllm_jax.models.config import LlamaConfig

__version__ = "0.1.0"
