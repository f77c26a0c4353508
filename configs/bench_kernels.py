"""Attention kernel benchmark: our kernels vs `jax.nn.dot_product_attention` (XLA, cuDNN) per device."""

import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    # Qwen2.5-0.5B attention: 14 query heads sharing 2 KV heads (GQA 7:1), head_dim 64.
    c.num_heads = 14
    c.num_kv_heads = 2
    c.head_dim = 64
    c.batch = 1
    c.prefill_lengths = "512,1024,2048,4096,8192"
    c.decode_cache_lengths = "1024,2048,4096,8192,16384,32768"
    c.dtype = "auto"  # "auto": bfloat16 on GPU/TPU, float32 on CPU (bf16 dots are a slow path on XLA:CPU)
    c.repeats = 5  # median of this many timed calls, after one warm-up (compile) call
    # Comma list of implementations to try; ones the device lacks are skipped and reported as such.
    # ours: "jnp" (our plain-jnp path), "pallas" (Triton on GPU, Mosaic on TPU); theirs: "xla_dpa", "cudnn_dpa".
    c.impls = "jnp,pallas,xla_dpa,cudnn_dpa"
    c.output = ""  # default: experiments/results/bench_kernels_<platform>.json
    c.seed = 0
    return c
