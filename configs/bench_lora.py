"""MicroLoRA benchmark: adapt + apply_updates latency, and decode overhead of attached adapters."""

import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.model = "auto"  # "auto": the embedded model if present, else a tiny random llama; or a HF folder
    c.rank = 2
    c.alpha = 4.0
    c.targets = "q,v"
    c.layer = 0  # layer whose Q/V `adapt` is timed (single-vector RuvLLM API)
    c.adapt_repeats = 200  # timed adapt+apply_updates calls (median), after a warm-up
    c.prompt_tokens = 16
    c.new_tokens = 128
    c.decode_repeats = 5  # alternating with/without adapters, median tok/s of each
    c.seed = 0
    c.output = "experiments/results/bench_lora.json"
    return c
