"""Inference backends: the `LlmBackend` protocol and its JAX implementation."""

from ruvllm_jax.backend.base import LlmBackend
from ruvllm_jax.backend.jax_backend import JaxBackend
from ruvllm_jax.backend.tokenizer import Tokenizer

__all__ = ["LlmBackend", "JaxBackend", "Tokenizer"]
