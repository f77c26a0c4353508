"""Config for experiments/sona_continual.py: which domains, methods, passages and evaluation windows.

Override from the command line, e.g. `--config.domains=alice,milton --config.lrs="(1e-4,1e-3)"`.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.model_path = ""  # empty: the embedded model (ruvllm_jax.assets.DEFAULT_MODEL_PATH)
    c.domains = "alice"  # comma-separated new domains: alice, milton (see experiments/continual_data.py)
    c.methods = "plain_adam"  # comma-separated keys of sona_continual.METHODS
    # Passages: one pass, one update per passage, drawn from the domain's first 80 %.
    c.n_train = 160
    c.request_tokens = 32
    c.response_tokens = 96
    c.seed = 0  # passage draw and adapter init
    # plain_adam: rank-2 Q/V LoRA on every layer, Adam, one step per passage at each of these lrs.
    c.lrs = (1e-4, 3e-4, 1e-3, 3e-3)
    c.rank = 2
    c.alpha = 4.0
    # Evaluation: perplexity of the first eval_tokens held-out tokens (new domain: its last 20 %;
    # Shakespeare: the validation split), sliding windows of `context` scoring `stride` new tokens each.
    c.eval_tokens = 8192
    c.context = 256
    c.stride = 128
    # sona: the loops of ruvllm_jax.sona on the same stream (each passage rated 0.9).
    c.sona = ml_collections.ConfigDict()
    c.sona.strategies = "EwcMerge,Average,QualityWeighted,BestOnly,Ensemble"  # one background row each
    c.sona.instant_optimizer = "adam"
    c.sona.instant_lr = 1e-3
    c.sona.background_min_samples = 10
    c.sona.background_lr = 3e-3
    c.sona.background_epochs = 1
    c.sona.batch_size = 2
    c.sona.deep_trigger_threshold = 1e9  # the study's deep loop runs once, at the end of the stream
    c.sona.deep_lr = 3e-3
    c.sona.deep_warmup = 5
    c.sona.deep_decay_to = 0.1
    c.sona.deep_epochs = 2
    c.sona.ewc_lambda = 1000.0
    c.sona.kl_lambda = 10.0
    c.sona.replay_batch = 4
    c.sona.ewc_off_lr_scales = (1.0, 0.3, 0.1)  # the EWC-off rows: every learning rate scaled by these
    c.sona.fisher_samples = 64
    c.sona.fisher_sample_tokens = 127
    c.output = "experiments/results/sona_continual.json"
    c.plot = "experiments/results/sona_continual_frontier.png"
    return c
