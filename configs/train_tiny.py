"""Config for the embedded tiny-shakespeare Llama (experiments/train_tiny.py).

Override any field from the command line, e.g. `--config.loop.steps=50 --config.model.num_layers=2`.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.data_path = "data/tinyshakespeare.txt"
    c.ood_path = "data/alice29.txt"  # out-of-domain text scored for the model card
    c.train_fraction = 0.9
    c.vocab_size = 2048  # 2.56 val bytes/token; 4096 only reaches 2.90 and doubles the embedding
    c.workdir = "runs/train_tiny"  # checkpoints, tokenizer, loss curve
    c.export_dir = ""  # when set, write the HF folder + model card here after training
    c.results_path = ""  # when set, write the metrics JSON here
    c.export_dtype = "bfloat16"  # float32 | bfloat16 | float16 (shipped size must stay <= 10 MB)
    c.export_only = False  # skip training: export the workdir's latest checkpoint
    c.eval_stride = 256
    c.sample_prompt = "ROMEO:\n"
    c.sample_tokens = 160
    c.sample_temperature = 0.8

    c.model = ml_collections.ConfigDict()
    c.model.hidden_size = 256
    c.model.intermediate_size = 688
    c.model.num_layers = 4
    c.model.num_heads = 4
    c.model.num_kv_heads = 2
    c.model.max_position_embeddings = 512
    c.model.rope_theta = 10000.0
    c.model.rms_norm_eps = 1e-5
    c.model.tie_word_embeddings = True

    c.optim = ml_collections.ConfigDict()
    c.optim.peak_lr = 3e-3
    c.optim.end_lr_fraction = 0.1
    c.optim.warmup_steps = 40
    c.optim.b1 = 0.9
    c.optim.b2 = 0.95
    c.optim.weight_decay = 0.1
    c.optim.grad_clip = 1.0

    c.loop = ml_collections.ConfigDict()
    c.loop.seed = 0
    c.loop.batch_size = 8
    c.loop.seq_len = 512
    c.loop.short_seq_len = 256
    c.loop.short_fraction = 0.4
    c.loop.steps = 1000
    c.loop.log_every = 10
    c.loop.eval_every = 50
    c.loop.eval_windows = 16
    c.loop.checkpoint_every = 50
    c.loop.stop_after = ml_collections.config_dict.placeholder(int)
    c.loop.progress = True
    return c
