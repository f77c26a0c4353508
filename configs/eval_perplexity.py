"""Config for experiments/eval_perplexity.py: which model folder, which text, which windows."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.model_path = ""  # empty: the embedded model (ruvllm_jax.assets.DEFAULT_MODEL_PATH)
    # Texts to score; "validation" means the last 10 % of data/tinyshakespeare.txt (line-aligned).
    c.texts = "validation,data/alice29.txt"
    c.data_path = "data/tinyshakespeare.txt"
    c.train_fraction = 0.9
    c.context = 0  # 0: the model's max_position_embeddings
    c.stride = 256  # new tokens scored per window; each has >= context - stride tokens of context
    c.batch_size = 8
    c.max_tokens = 0  # score only the first max_tokens tokens of each text (0: all)
    c.output = ""  # when set, write the results as JSON here
    return c
