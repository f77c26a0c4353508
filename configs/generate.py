"""The main job: generate text from a prompt, streamed to stdout.

`model` empty = the model shipped in the package; otherwise a hub id or a local folder.
"""

import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.model = ""
    c.prompt = "ROMEO:\n"
    c.max_tokens = 200
    c.temperature = 0.8
    c.top_p = 0.95
    c.top_k = 0
    c.repetition_penalty = 1.1
    c.stop_sequences = ""  # comma-separated
    c.seed = 0  # -1 = a fresh seed every run
    c.max_context = 4096
    c.precision = "FP32"  # FP32 | FP16 | BF16: how the weights are held in memory
    return c
