"""First-call latency benchmark: fresh processes, cold vs warm persistent compilation cache."""

import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    # Which models: "embedded" (the model shipped in the package) and/or "qwen_shape" (random
    # weights, Qwen2.5-0.5B dimensions, built by bench_decode.qwen_shape_model).
    c.models = "embedded,qwen_shape"
    # Cache settings timed, each in its own fresh process, in this order: "cold" (empty cache
    # folder), "warm" (a second process on the folder cold filled), "disabled" (no cache at all).
    c.modes = "cold,warm,disabled"
    c.prompt_tokens = 32  # for embedded (its max_position_embeddings is 512)
    c.qwen_prompt_tokens = 512  # for qwen_shape
    c.new_tokens = 8
    c.repeats = 1  # median of this many runs of each mode (each cold run gets its own empty folder)
    c.seed = 0
    c.child_timeout_s = 1200  # per child process
    c.output = "experiments/results/bench_first_call.json"
    # Qwen2.5-0.5B dimensions (as in configs/bench_decode.py).
    c.qwen = ml_collections.ConfigDict(dict(
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
        tie_word_embeddings=True, rope_theta=1000000.0, rms_norm_eps=1e-6,
    ))
    return c
