"""The `LlmBackend` protocol: what every inference backend offers (RuvLLM's trait, Python-style)."""

from __future__ import annotations

from typing import Callable, Optional, Protocol, runtime_checkable

from ruvllm_jax.backend.tokenizer import Tokenizer
from ruvllm_jax.types import GenerateParams, ModelConfig, ModelInfo

StreamCallback = Callable[[str], Optional[bool]]


@runtime_checkable
class LlmBackend(Protocol):
    def load_model(self, model_id_or_path: Optional[str] = None, config: Optional[ModelConfig] = None) -> None: ...

    def generate(self, prompt: str, params: Optional[GenerateParams] = None) -> str: ...

    def generate_stream(self, prompt: str, params: Optional[GenerateParams], callback: StreamCallback) -> None: ...

    def tokenizer(self) -> Optional[Tokenizer]: ...

    def model_info(self) -> Optional[ModelInfo]: ...

    def is_loaded(self) -> bool: ...
