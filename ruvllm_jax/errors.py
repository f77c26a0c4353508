"""The RuvLLM error hierarchy: one subclass per RuvLLM variant, each message led by the variant's text.

Every bad input raises one of these with the offending value named, so callers can catch the family
(`RuvLLMError`) or one kind (`KvCacheError`) and users read what was wrong and what was expected.
"""

from __future__ import annotations


class RuvLLMError(Exception):
    """Base of every error ruvllm_jax raises on purpose."""

    prefix = "RuvLLM error"

    def __init__(self, message: str = ""):
        self.message = message
        super().__init__(f"{self.prefix}: {message}")

    def __reduce__(self):
        # Rebuild from the bare message: the default (cls, self.args) would prefix it twice.
        return (type(self), (self.message,))


class StorageError(RuvLLMError):
    """Raised when storing or reading back persisted state fails."""

    prefix = "Storage error"


class SessionError(RuvLLMError):
    """Raised when a session is missing, closed or misused."""

    prefix = "Session error"


class KvCacheError(RuvLLMError):
    """Raised on KV cache misuse: a full cache, bad shapes or positions."""

    prefix = "KV cache error"


class PagedAttentionError(RuvLLMError):
    """Raised on bad block tables, block ids or lengths given to paged attention."""

    prefix = "Paged attention error"


class AdapterError(RuvLLMError):
    """Raised on LoRA adapter misuse or bad feedback."""

    prefix = "Adapter error"


class SonaError(RuvLLMError):
    """Raised when the SONA learning loop fails."""

    prefix = "SONA error"


class ConfigError(RuvLLMError):
    """Raised when a configuration value is invalid."""

    prefix = "Configuration error"


class OutOfMemoryError(RuvLLMError):
    """Raised when there is not enough memory or capacity."""

    prefix = "Out of memory"


class InvalidOperationError(RuvLLMError):
    """Raised when an operation is called in the wrong state."""

    prefix = "Invalid operation"


class NotFoundError(RuvLLMError):
    """Raised when a model, file or tensor does not exist."""

    prefix = "Not found"


class BackendError(RuvLLMError):
    """Raised when the inference backend fails."""

    prefix = "Backend error"


class ModelError(RuvLLMError):
    """Raised on unsupported, corrupt or mismatched model files."""

    prefix = "Model error"


class TokenizationError(RuvLLMError):
    """Raised when the tokenizer fails."""

    prefix = "Tokenization error"


class GenerationError(RuvLLMError):
    """Raised when generation fails."""

    prefix = "Generation error"


class RuvIoError(RuvLLMError, OSError):
    """Raised when reading or writing a file fails; also an `OSError`, so plain `except OSError` catches it."""

    prefix = "IO error"

    def __init__(self, message: str = ""):
        RuvLLMError.__init__(self, message)


ALL_ERRORS = (
    StorageError,
    SessionError,
    KvCacheError,
    PagedAttentionError,
    AdapterError,
    SonaError,
    ConfigError,
    OutOfMemoryError,
    InvalidOperationError,
    NotFoundError,
    BackendError,
    ModelError,
    TokenizationError,
    GenerationError,
    RuvIoError,
)
