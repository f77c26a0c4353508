"""Decode tok/s of the layer scan against the unrolled layer loop, by cache length, in one run.

    python experiments/bench_scan_context.py --gguf=model-Q8_0.gguf [--prompts=32,1000,3000] [--rounds=2]

Why: inside the scan each layer reads its keys and values out of the stacked cache through a traced
index, which XLA:CPU copies for the attention dots, so the scan's cost grows with the cache while
the unrolled loop reads the per-layer cache in place. `engine.LAYER_SCAN_MAX_LEN` (the longest cache
`JaxBackend` scans over) comes from this table. Each measurement is a fresh process: load the GGUF,
prefill the prompt on the one-slot contiguous engine (scan: stacked cache, `KernelOptions(layer_scan=True)`;
unrolled: the tuple cache), then time the decode alone (`bench_decode.bench_ruvllm`: median of two
after the compiling run). The
modes alternate within each round so machine drift hits both alike. Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

CHILD = r"""
import json, sys
sys.path.insert(0, sys.argv[5])
import bench_decode
from ruvllm_jax.backend import JaxBackend, engine
from ruvllm_jax.types import ModelConfig
path, prompt, new, scan = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
engine.LAYER_SCAN_MAX_LEN = 1 << 30 if scan else 0  # scan every cache, or none
b = JaxBackend.new()
b.load_model(path, ModelConfig(max_context=4096))
ids = [(7 * i + 3) % (b.config.vocab_size - 2) + 2 for i in range(prompt)]
out = bench_decode.bench_ruvllm(b, ids, new, repeats=2)
print(json.dumps({"prompt": prompt, "cache_len": engine.buckets(prompt, new, 4096)[1], "scan": out["layer_scan"],
                  "decode_tok_s": out["decode_tok_s"]}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", required=True, help="a GGUF with native-quantized layers (e.g. bench_decode's Q8_0)")
    ap.add_argument("--prompts", default="32,1000,3000")
    ap.add_argument("--new_tokens", type=int, default=65)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--output", default="experiments/results/scan_long_context.json")
    a = ap.parse_args()
    env = dict(os.environ, RUVLLM_JAX_COMPILATION_CACHE="0")
    rounds = []
    for _ in range(a.rounds):
        rows = []
        for prompt in [int(p) for p in a.prompts.split(",")]:
            for scan in (1, 0):
                out = subprocess.run([sys.executable, "-c", CHILD, a.gguf, str(prompt), str(a.new_tokens), str(scan),
                                      os.path.dirname(os.path.abspath(__file__))],
                                     env=env, capture_output=True, text=True, check=True)
                rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(rows[-1], flush=True)
        rounds.append(rows)
    summary = []
    print(f"{'prompt':>7} {'cache':>6}  scan/unrolled per round")
    for prompt in [int(p) for p in a.prompts.split(",")]:
        ratios, cache_len = [], None
        for rows in rounds:
            by = {r["scan"]: r for r in rows if r["prompt"] == prompt}
            ratios.append(round(by[True]["decode_tok_s"] / by[False]["decode_tok_s"], 3))
            cache_len = by[True]["cache_len"]
        summary.append({"prompt": prompt, "cache_len": cache_len, "scan_over_unrolled": ratios})
        print(f"{prompt:>7} {cache_len:>6}  {ratios}")
    with open(a.output, "w") as f:
        json.dump({"gguf": a.gguf, "time": time.strftime("%Y-%m-%d %H:%M"), "rounds": rounds, "summary": summary}, f,
                  indent=1)


if __name__ == "__main__":
    main()
