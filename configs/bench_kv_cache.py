"""Config for experiments/bench_kv_cache.py: decode speed of the two-tier KV cache vs the contiguous one.

`--config.smoke=True` replaces the fields in `smoke_overrides` (the embedded model only, a few
short repetitions: seconds).
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # "embedded" (the model shipped in the package) and/or "qwen_shape" (random weights with the
    # Qwen2.5-0.5B dimensions of configs/bench_decode.py).
    c.models = "embedded,qwen_shape"
    c.new_tokens = 64  # generated per request (1 from the prefill, the rest decoded), as JaxBackend does
    # Context at the end of a request: the prompt is context - new_tokens random tokens.
    c.embedded_context = 256  # the embedded model has 512 positions
    c.qwen_context = 2048
    # Two-tier variants: FP16 tail of this many tokens, migration_batch = min(tail, 64), max_tokens = context.
    # The embedded model's tail is 64, not the default 256: at 256 tokens of context a tail of 256 would
    # hold every token and the store would never be read.
    c.embedded_tail = 64
    c.qwen_tail = 256
    c.stores = "Q8,Q4"
    c.chunk = 32  # decode steps per device call (engine.DEFAULT_CHUNK, JaxBackend.decode_chunk_size)
    # Timed repetitions of each variant, interleaved (rep r runs every variant, in an order rotated by
    # r) after one warm-up each: machine-speed drift hits every variant alike.
    c.embedded_repeats = 15
    c.qwen_repeats = 5
    c.seed = 0
    c.output = "experiments/results/bench_kv_cache.json"
    c.smoke = False
    c.smoke_overrides = ml_collections.ConfigDict(dict(models="embedded", embedded_repeats=2, new_tokens=16,
                                                       embedded_context=128, embedded_tail=16))
    return c
