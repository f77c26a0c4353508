"""Perplexity and bits per byte of a model folder on text files, with sliding windows.

    python experiments/eval_perplexity.py --config=configs/eval_perplexity.py \
        --config.model_path=ruvllm_jax/assets/tiny-shakespeare --config.texts=validation,data/alice29.txt
"""

from __future__ import annotations

import json
import math
import os

from absl import app
from ml_collections import config_flags

from ruvllm_jax.models.loader import load_config, load_params
from ruvllm_jax.training import bpe, data, scoring

_CONFIG = config_flags.DEFINE_config_file("config", "configs/eval_perplexity.py", "Evaluation config.")


def main(argv):
    del argv
    c = _CONFIG.value
    folder = c.model_path
    if not folder:
        from ruvllm_jax.assets import DEFAULT_MODEL_PATH

        folder = DEFAULT_MODEL_PATH
    cfg = load_config(folder)
    params = load_params(folder, cfg)
    tok = bpe.load_tokenizer(folder)
    lengths = bpe.token_byte_lengths(tok)
    context = c.context or cfg.max_position_embeddings
    results = {"model_path": os.path.abspath(folder), "context": context, "stride": c.stride, "texts": {}}
    for name in [t.strip() for t in c.texts.split(",") if t.strip()]:
        if name == "validation":
            text = data.split_train_val(data.read_text(c.data_path), c.train_fraction)[1]
        else:
            text = data.read_text(name)
        ids = bpe.encode(tok, text)
        if c.max_tokens:
            ids = ids[:c.max_tokens]
        nats, n_tok, n_bytes = scoring.score_text(params, cfg, ids, context, c.stride, batch_size=c.batch_size,
                                                  byte_lengths=lengths)
        r = {"tokens": n_tok, "bytes": n_bytes, "nats_per_token": nats / n_tok,
             "perplexity": math.exp(nats / n_tok), "bits_per_byte": scoring.bits_per_byte(nats, n_bytes)}
        results["texts"][name] = r
        print(f"{name}: {n_tok} tokens, {r['nats_per_token']:.4f} nats/token, ppl {r['perplexity']:.2f}, "
              f"{r['bits_per_byte']:.4f} bits/byte", flush=True)
    if c.output:
        with open(c.output, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    app.run(main)
