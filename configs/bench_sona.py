"""Config for experiments/bench_sona.py (SONA latency, serving throughput, preference check)."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.model = ""  # empty: the embedded model
    c.parts = "bucket_ab,latency,layer_gain,serving,preference"
    c.merge = False  # True: update the parts run in an existing output JSON, keep the others
    c.ab_rounds = 3
    # latency: instant_adapt on a request of request_tokens and responses of each length
    c.request_tokens = 16
    c.response_lengths = (16, 64, 256)
    c.warmup = 3
    c.repeats = 30
    # layer_gain: one instant-only pass over n_train study passages (Adam at gain_lr)
    c.n_train = 160
    c.gain_lr = 1e-3
    c.eval_tokens = 8192
    # serving: `requests` greedy generations of new_tokens each, median of serving_repeats runs
    c.requests = 8
    c.new_tokens = 64
    c.serving_repeats = 7
    # preference: trials x steps of (reward one response, penalise the other)
    c.preference_trials = 10
    c.preference_steps = 3
    c.output = "experiments/results/bench_sona.json"
    return c
