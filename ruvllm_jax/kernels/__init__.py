"""Attention kernels: Pallas for GPU/TPU, jnp for CPU, one dispatch (`impl=`)."""

from ruvllm_jax.kernels.attention import decode_attention, flash_attention

__all__ = ["flash_attention", "decode_attention"]
