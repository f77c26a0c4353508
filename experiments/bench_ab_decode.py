"""Single-sequence decode before and after a change, in one run: this checkout against another.

    git worktree add /tmp/base <old commit>
    python experiments/bench_ab_decode.py --base=/tmp/base [--models=embedded,qwen_shape] [--files=a.gguf,...]
        [--modes=greedy,sampled]

Each measurement is a fresh child process importing `ruvllm_jax` from one of the two trees
(PYTHONPATH), alternating old/new `rounds` times so machine drift hits both alike. A child loads
the model with `JaxBackend`, disables EOS, warms up, then times `generate_tokens` for 1 and for
`new_tokens` tokens: decode tok/s = (new_tokens - 1) / (t_new - t_1), the path users call. `--files` adds models
from paths (GGUF files or HF folders, e.g. the Q8_0 / Q4_K_M files `bench_decode` races). Prints
the medians and the ratio new/old and writes JSON. `--modes=greedy,sampled` times greedy decoding and/or
sampling (temperature 0.7, top-k 40, top-p 0.9, repetition penalty 1.1, seed 0).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

CHILD = r"""
import json, sys, time
from ruvllm_jax.backend import JaxBackend
from ruvllm_jax.types import GenerateParams, ModelConfig
folder, prompt, new, reps = sys.argv[1] or None, int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
sampled = sys.argv[5] == "sampled"
b = JaxBackend.new()
b.load_model(folder, ModelConfig(max_context=1024))
b.eos_token_ids = ()
ids = [(7 * i + 3) % (b.config.vocab_size - 2) + 2 for i in range(prompt)]
knobs = dict(temperature=0.7, top_k=40, top_p=0.9, repetition_penalty=1.1, seed=0) if sampled else \
    dict(temperature=0.0, repetition_penalty=1.0)
p = lambda n: GenerateParams(max_tokens=n, **knobs)
b.generate_tokens(ids, p(1)); b.generate_tokens(ids, p(new))
best1 = bestn = float("inf")
for _ in range(reps):
    t = time.perf_counter(); b.generate_tokens(ids, p(1)); best1 = min(best1, time.perf_counter() - t)
    t = time.perf_counter(); out = b.generate_tokens(ids, p(new)); bestn = min(bestn, time.perf_counter() - t)
    assert len(out) == new
print(json.dumps({"decode_tok_s": (new - 1) / (bestn - best1), "prefill_s": best1}))
"""


def qwen_shape_folder(tmp: str) -> str:
    import torch
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                         tie_word_embeddings=True, rope_theta=1000000.0, rms_norm_eps=1e-6)
    tf.Qwen2ForCausalLM(cfg).eval().float().save_pretrained(tmp)
    import shutil

    from ruvllm_jax.backend.jax_backend import default_model_path

    shutil.copy(os.path.join(default_model_path(), "tokenizer.json"), tmp)  # any tokenizer: ids are given
    return tmp


def measure(tree: str, folder: str, prompt: int, new: int, reps: int, mode: str) -> dict:
    env = dict(os.environ, PYTHONPATH=tree)
    out = subprocess.run([sys.executable, "-c", CHILD, folder, str(prompt), str(new), str(reps), mode], env=env,
                         capture_output=True, text=True, check=True, cwd=tempfile.gettempdir())
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True, help="checkout of the old commit (a git worktree)")
    ap.add_argument("--models", default="embedded,qwen_shape")
    ap.add_argument("--files", default="", help="comma-separated model paths (GGUF files or HF folders) to add")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--modes", default="greedy", help="comma-separated: greedy, sampled (temperature 0.7, "
                    "top-k 40, top-p 0.9, repetition penalty 1.1)")
    ap.add_argument("--output", default="experiments/results/bench_ab_decode.json")
    a = ap.parse_args()
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        models = [m for m in a.models.split(",") if m] + [f for f in a.files.split(",") if f]
        for model in models:
            if model == "embedded":
                folder, prompt, new, reps = "", 32, 224, 3
            elif model == "qwen_shape":
                folder, prompt, new, reps = qwen_shape_folder(tmp), 32, 64, 2
            else:
                folder, prompt, new, reps = os.path.abspath(model), 32, 64, 2
            for mode in a.modes.split(","):
                runs = {"old": [], "new": []}
                for _ in range(a.rounds):
                    for name, tree in (("old", a.base), ("new", here)):
                        runs[name].append(measure(tree, folder, prompt, new, reps, mode)["decode_tok_s"])
                old, new_ = statistics.median(runs["old"]), statistics.median(runs["new"])
                rows.append({"model": model, "mode": mode, "old_tok_s": old, "new_tok_s": new_, "ratio": new_ / old,
                             "runs": runs})
                print(f"{os.path.basename(model):18s} {mode:8s} old {old:8.1f} tok/s  new {new_:8.1f} tok/s  "
                      f"new/old {new_ / old:.3f}", flush=True)
    with open(a.output, "w") as f:
        json.dump({"base": a.base, "time": time.strftime("%Y-%m-%d %H:%M"), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
