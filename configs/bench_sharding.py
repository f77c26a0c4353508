"""Sharding benchmark: per-device memory and decode tok/s of one model over several (data, model) meshes."""

import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    # "embedded" (the package's tiny-shakespeare model: 4 heads, 2 KV heads) and/or "random_qwen2"
    # (random weights, the `random` shape below: 8 heads, 2 KV heads, written with save_hf_folder).
    c.models = "embedded,random_qwen2"
    # Meshes (data, model) as "DxM"; "none" = one device, mesh_shape None (the reference for the
    # correctness columns). A mesh the heads refuse is recorded as "refused: <ConfigError>", one that
    # needs more devices than present as "skipped".
    c.meshes = "none,1x2,1x4,1x8,2x4,8x1"
    # "auto": the GPUs when jax.devices() are GPUs, else the virtual CPU devices; "cpu": always the CPU.
    c.platform = "auto"
    # Virtual CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count), set by the script before
    # jax is imported unless XLA_FLAGS already names a count. Only read from the command line
    # (--config.host_devices=N) because it must be known before jax loads.
    c.host_devices = 8
    c.prompt_tokens = 16  # batch-1 prompt (random token ids)
    c.new_tokens = 64  # batch-1 greedy tokens (generate_tokens), EOS off so every one decodes
    c.batch = 8  # generate_batch prompts
    c.batch_new_tokens = 32  # tokens per prompt in the batched run, EOS off
    c.repeats = 3  # median of this many timed runs, after one warm-up (which compiles)
    c.max_context = 256  # ModelConfig.max_context: generate_batch's paged engine has max_len = this
    c.seed = 0
    c.output = "experiments/results/bench_sharding.json"
    # The random Qwen2-style model (transformers config.json names; Qwen2 adds q/k/v biases).
    c.random = ml_collections.ConfigDict(dict(
        model_type="qwen2", vocab_size=8192, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=2, head_dim=64, max_position_embeddings=2048,
        tie_word_embeddings=False, rope_theta=1000000.0, rms_norm_eps=1e-6,
    ))
    return c
