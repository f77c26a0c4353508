"""Decode benchmark: ruvllm_jax vs transformers (torch CPU) vs llama.cpp on the same weights, side by side."""

import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    # Which comparisons to run: "qwen_shape" (random weights, Qwen2.5-0.5B dimensions), "embedded"
    # (the model shipped in the package) and/or "qwen_1p5b_shape" (Qwen2.5-1.5B dimensions, 6.2 GB
    # of f32 weights to build: not run by default; it shows how peak/weights falls as weights grow
    # past the first generation's fixed compile cost).
    c.models = "qwen_shape,embedded"
    # Rows, "engine:precision[:gguf]": precision "keep" = what the file holds (ModelConfig.quantization
    # None); a gguf name (F16, Q8_0, Q4_K_M, Q4_K) means that GGUF of the same model, else the safetensors.
    c.engines = ",".join([
        "ruvllm_jax:FP32", "ruvllm_jax:keep:Q8_0", "ruvllm_jax:keep:Q4_K_M", "ruvllm_jax:Q8",
        "transformers:FP32", "transformers:BF16",
        "llama.cpp:keep:F16", "llama.cpp:keep:Q8_0", "llama.cpp:keep:Q4_K_M",
    ])
    c.embedded_engines = "ruvllm_jax:FP32,ruvllm_jax:Q8,transformers:FP32"
    c.large_engines = ",".join([
        "ruvllm_jax:FP32", "ruvllm_jax:keep:Q8_0", "ruvllm_jax:keep:Q4_K_M", "ruvllm_jax:Q8",
        "llama.cpp:keep:Q8_0", "llama.cpp:keep:Q4_K_M",
    ])
    # Decode ratios printed and saved: (ours, theirs) as (engine, weights label).
    c.ratios = [
        (("ruvllm_jax", "keep (Q8_0)"), ("llama.cpp", "keep (Q8_0)")),
        (("ruvllm_jax", "keep (Q4_K_M)"), ("llama.cpp", "keep (Q4_K_M)")),
        (("ruvllm_jax", "FP32 (safetensors)"), ("transformers", "FP32 (safetensors)")),
        (("ruvllm_jax", "keep (Q8_0)"), ("transformers", "BF16 (safetensors)")),
    ]
    c.prompt_tokens = 32
    c.new_tokens = 128  # for qwen_shape
    c.embedded_new_tokens = 256
    c.repeats = 3  # median of this many timed runs, after one warm-up
    # Each row's process this many times, the engines alternating round by round; the table shows each
    # figure's median over the rounds (this VM's decode speed drifts +-25 % within minutes).
    c.rounds = 1
    c.threads = 2  # torch and llama.cpp threads (XLA uses all cores)
    c.seed = 0
    # False: every row runs with ruvllm_jax's persistent compilation cache off, so its first
    # generation compiles (a user's first run) and the compiles count in its peak RSS.
    c.compilation_cache = False
    c.output = "experiments/results/bench_decode.json"
    # Qwen2.5-0.5B dimensions.
    c.qwen = ml_collections.ConfigDict(dict(
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
        tie_word_embeddings=True, rope_theta=1000000.0, rms_norm_eps=1e-6,
    ))
    # Qwen2.5-1.5B dimensions.
    c.large = ml_collections.ConfigDict(dict(
        vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
        num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768,
        tie_word_embeddings=True, rope_theta=1000000.0, rms_norm_eps=1e-6,
    ))
    return c
