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


def _variant(name: str, prefix: str, doc: str, bases: tuple = (RuvLLMError,)) -> type:
    return type(name, bases, {"prefix": prefix, "__doc__": doc, "__module__": __name__})


StorageError = _variant("StorageError", "Storage error", "Storage-related failure.")
SessionError = _variant("SessionError", "Session error", "Session management failure.")
KvCacheError = _variant("KvCacheError", "KV cache error", "KV cache misuse: full cache, bad shapes.")
PagedAttentionError = _variant(
    "PagedAttentionError", "Paged attention error", "Bad block tables, block ids or lengths."
)
AdapterError = _variant("AdapterError", "Adapter error", "LoRA adapter misuse or bad feedback.")
SonaError = _variant("SonaError", "SONA error", "SONA learning-loop failure.")
ConfigError = _variant("ConfigError", "Configuration error", "An invalid configuration value.")
OutOfMemoryError = _variant("OutOfMemoryError", "Out of memory", "Not enough memory or capacity.")
InvalidOperationError = _variant(
    "InvalidOperationError", "Invalid operation", "An operation called in the wrong state."
)
NotFoundError = _variant("NotFoundError", "Not found", "A model, file or tensor that does not exist.")
BackendError = _variant("BackendError", "Backend error", "Inference backend failure.")
ModelError = _variant("ModelError", "Model error", "Unsupported, corrupt or mismatched model files.")
TokenizationError = _variant("TokenizationError", "Tokenization error", "Tokenizer failure.")
GenerationError = _variant("GenerationError", "Generation error", "Generation failure.")


class RuvIoError(RuvLLMError, OSError):
    """An I/O failure; also an `OSError` so plain `except OSError` still catches it."""

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
