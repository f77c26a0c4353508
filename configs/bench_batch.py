"""Batched-decode benchmark: ruvllm_jax's continuous-batching engine vs transformers' batched generate."""

import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    # Which models: "embedded" (the model shipped in the package) and/or "qwen_0.5b" (random weights,
    # Qwen2.5-0.5B dimensions; slow on CPU: ~2 GB of float32 weights read per decode step).
    c.models = "embedded,qwen_0.5b"
    c.batch_sizes = "1,4,8,16"  # comma-separated; speedups are against batch 1 when it is in the list
    c.prompt_tokens = 32
    # Prompt i has prompt_tokens - i % 4 tokens (ragged batch); False: every prompt prompt_tokens long.
    c.ragged = True
    c.embedded_new_tokens = 64
    c.embedded_repeats = 3  # median of this many timed runs, after one warm-up
    # Untimed runs before the timed ones, for every engine (one compiles everything: the engine's first
    # state is committed to the device, so later prefills reuse the first one's executable).
    c.warmups = 1
    c.qwen_new_tokens = 32
    c.qwen_repeats = 2
    # ruvllm_jax paged engine (EngineConfig); max_len is the next power of two >= prompt + new tokens.
    c.chunk = 32  # decode steps per device call
    c.block_size = 16
    c.num_blocks = 0  # 0: the engine's default pool (room for every slot at max_len, capped)
    c.run_single = True  # also time JaxBackend.generate_tokens (the contiguous one-sequence path) at batch 1
    c.run_transformers = True
    c.threads = 2  # torch threads (XLA uses all cores)
    c.seed = 0
    c.output = "experiments/results/bench_batch.json"
    # Targets (printed PASS/FAIL, not asserted), on the qwen_0.5b shape.
    c.target_batch = 8
    c.target_speedup = 4.0  # ruvllm batch target_batch >= this x its batch 1 throughput
    # Qwen2.5-0.5B dimensions (the same as configs/bench_decode.py).
    c.qwen = ml_collections.ConfigDict(dict(
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
        tie_word_embeddings=True, rope_theta=1000000.0, rms_norm_eps=1e-6,
    ))
    return c
