"""ruvllm_jax: a JAX/XLA research framework for LLM inference that learns while it serves.

Axis legend, used by every shape comment in the package:

    B    batch (sequences)                 S    query positions (a prompt or chunk)
    T    key positions (a cache's length)  H    query heads
    KVH  key/value heads                   G    query heads per KV head (H // KVH)
    D    head_dim (one head's width)       E    hidden size (the residual stream's width)
    I    MLP intermediate size             V    vocabulary size

Layers: `models/` (the pure model: one layer body, one attention path), `cache/` (KV stores that
hand attention their contents as parts), `kernels/` (Pallas and jnp attention over arrays),
`backend/` (the jitted generation engine and the `JaxBackend` facade), `lora/` (MicroLoRA and
EWC++), `sona/` (the instant, background and deep learning loops), `training/` (the training loop and
scoring).
"""

from ruvllm_jax.backend import JaxBackend, LlmBackend, Tokenizer
from ruvllm_jax.backend.engine import Engine, EngineConfig
from ruvllm_jax.backend.jax_backend import Session
from ruvllm_jax.backend.sampling import SamplingParams
from ruvllm_jax.backend.serving import RequestOutput, ServingEngine
from ruvllm_jax.cache import (
    CacheQuantization,
    ContiguousKVCache,
    KVCache,
    KvCacheStats,
    KVPart,
    PagedKVCache,
    PagedKvCache,
    PagedKVPart,
    PagedSpec,
    QuantizedKVPart,
    SegmentedKVCache,
    TwoTierKvCache,
)
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
from ruvllm_jax.kernels import (
    AttentionConfig,
    BlockSizes,
    DecodeBlockSizes,
    FlashBlockSizes,
    KernelOptions,
    PagedBlockSizes,
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
from ruvllm_jax.sona import (
    AdaptationResult,
    ConsolidationStrategy,
    LearningLoopStats,
    SonaLlm,
    SonaLlmConfig,
    TrainingConfig,
    TrainingSample,
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

__version__ = "0.1.0"

__all__ = [
    # errors
    "RuvLLMError", "AdapterError", "BackendError", "ConfigError", "GenerationError", "InvalidOperationError",
    "KvCacheError", "ModelError", "NotFoundError", "OutOfMemoryError", "PagedAttentionError", "RuvIoError",
    "SessionError", "SonaError", "StorageError", "TokenizationError",
    # value types
    "DeviceType", "GenerateParams", "KvCacheConfig", "MemoryStats", "ModelConfig", "ModelInfo", "ModelSize",
    "Precision", "SamplingParams", "LlamaConfig",
    # backend
    "JaxBackend", "LlmBackend", "Tokenizer", "Engine", "EngineConfig", "ServingEngine", "RequestOutput", "Session",
    # caches and attention
    "ContiguousKVCache", "KVCache", "KVPart", "PagedKVPart", "QuantizedKVPart", "SegmentedKVCache",
    "CacheQuantization", "KvCacheStats", "TwoTierKvCache", "PagedKvCache", "PagedKVCache", "PagedSpec",
    "AttentionConfig", "BlockSizes", "DecodeBlockSizes", "FlashBlockSizes", "KernelOptions", "PagedBlockSizes",
    "decode_attention", "flash_attention", "grouped_query_attention", "merge_attention", "multi_query_attention",
    "paged_attention",
    # adapters
    "AdaptFeedback", "EwcState", "MicroLoRA", "MicroLoraConfig", "MicroLoraStats", "TargetModule",
    # learning while serving
    "AdaptationResult", "ConsolidationStrategy", "LearningLoopStats", "SonaLlm", "SonaLlmConfig", "TrainingConfig",
    "TrainingSample",
]
