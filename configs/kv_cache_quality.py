"""Config for experiments/kv_cache_quality.py: which texts, windows, cache variants and shapes.

Override from the command line, e.g. `--config.windows_per_text=4 --config.tails="(16,64)"`;
`--config.smoke=True` replaces the fields in `smoke_overrides` (a seconds-long run for the tests).
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.model_path = ""  # empty: the embedded model (ruvllm_jax.assets.DEFAULT_MODEL_PATH)
    # Texts: "alice" = data/alice29.txt cleaned as the continual study does (LF line ends, the title
    # block cut; the raw CRLF file mostly measures line endings), "shakespeare" = the validation split
    # (last 10 %, line-aligned) of data/tinyshakespeare.txt that the embedded model never trained on.
    c.texts = "alice,shakespeare"
    c.window = 512  # tokens per window (the embedded model's max_position_embeddings)
    c.windows_per_text = 8  # evenly spaced, non-overlapping windows (`training.data.fixed_windows`)
    c.late_from = 256  # also report perplexity of the targets at positions >= late_from (long context)
    # Cache variants. Every two-tier row has an FP16 tail; migration_batch = min(tail, max_migration);
    # max_tokens = window, so nothing is evicted inside a window except in the eviction rows.
    c.stores = "Q8,Q4"  # quantized store precisions, one row per (store, tail, sinks)
    c.tails = (16, 64, 256)
    c.sinks = (0, 4)
    c.max_migration = 64
    c.reference_tail = 64  # tail of the FP16-store reference row and of the FP32-store exact row
    # Eviction rows (0: none): Q4 store, tail reference_tail, max_tokens this, with and without sinks.
    c.eviction_max_tokens = 256
    c.eviction_sinks = (0, 4)
    # Memory of the Qwen2.5-0.5B KV shape at these context lengths (no model: shapes and the one-layer
    # cache filled with random keys/values), two-tier with tail 256 / migration 64.
    c.qwen_layers = 24
    c.qwen_kv_heads = 2
    c.qwen_head_dim = 64
    c.qwen_tokens = (4096, 32768)
    c.qwen_tail = 256
    c.seed = 0
    c.output = "experiments/results/kv_cache_quality.json"
    c.plot = "experiments/results/kv_cache_quality.png"  # empty: no plot
    c.smoke = False
    c.smoke_overrides = ml_collections.ConfigDict(dict(
        window=128, windows_per_text=1, late_from=64, stores="Q8", tails=(16,), sinks=(0,), eviction_max_tokens=0,
        qwen_tokens=(4096,), reference_tail=16,
    ))
    return c
