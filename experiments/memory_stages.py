"""Where the memory beyond the weights goes, from load through the first generation, stage by stage.

    python experiments/memory_stages.py                       # 24- and 1-layer Qwen2.5-0.5B shape, Q8_0
    python experiments/memory_stages.py --layers=24 --qtype=Q8_0 --caches=cold

`bench_decode` reports one number per row: the peak RSS through the first generation over the
weights. This splits it. For each model (random weights with Qwen2.5-0.5B's dimensions and
`--layers` layers, written as a GGUF by ruvllm_jax's exporter) and compilation-cache state ("cold":
the persistent cache off, so every program compiles; "warm": a second process on a cache the first
filled), a fresh process loads the GGUF and runs one greedy `generate_tokens`, with the engine's
jitted steps wrapped so that each stage is timed and measured: the fresh decode state, then for the
prefill and the decode program their trace, lowering, compile (or cache load) and first run. Each
stage reports the RSS after it and the peak RSS during it (VmHWM, reset between stages through
/proc/self/clear_refs), both minus the RSS before the load, in GB. Linux only. Prints a table and
writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

_HERE = os.path.dirname(os.path.abspath(__file__))


def _status_gb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1e6
    raise KeyError(field)


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS


def child(path: str, prompt_tokens: int, new_tokens: int) -> dict:
    import jax
    import numpy as np

    from ruvllm_jax.backend import JaxBackend, engine
    from ruvllm_jax.types import GenerateParams, ModelConfig

    stages: list[dict] = []
    backend = JaxBackend.new()
    base = _status_gb("VmRSS")
    last = [time.perf_counter()]
    _reset_peak()

    def mark(name: str) -> None:
        """A stage from the previous mark to now (its host work included)."""
        now = time.perf_counter()
        stages.append({"stage": name, "seconds": now - last[0],
                       "rss_gb": _status_gb("VmRSS") - base, "peak_gb": _status_gb("VmHWM") - base})
        last[0] = now
        _reset_peak()

    backend.load_model(path, ModelConfig(max_context=1024))
    mark("load")
    seen: set[str] = set()

    def wrap(name: str):
        f = getattr(engine, name)

        def staged(*args, **kwargs):
            if name in seen or name == "free_slot":
                return f(*args, **kwargs)
            seen.add(name)
            if name == "_fresh_state_program":
                out = jax.block_until_ready(f(*args, **kwargs))
                mark("fresh decode state (first XLA compile)")
                return out
            traced = f.trace(*args, **kwargs)
            mark(f"{name}: trace")
            lowered = traced.lower()
            mark(f"{name}: lower")
            lowered.compile()  # fills jit's own caches: the call below reuses this executable
            mark(f"{name}: compile or cache load")
            del traced, lowered
            out = jax.block_until_ready(f(*args, **kwargs))
            mark(f"{name}: first run")
            return out

        setattr(engine, name, staged)

    for name in ("_fresh_state_program", "prefill_slots", "generate_slots"):
        wrap(name)
    prompt = np.random.default_rng(0).integers(3, backend.config.vocab_size, prompt_tokens).tolist()
    backend.generate_tokens(prompt, GenerateParams(max_tokens=new_tokens, temperature=0.0, repetition_penalty=1.0))
    mark("rest of the generation")
    weights = backend.memory_stats().params_bytes / 1e9
    peak = max(s["peak_gb"] for s in stages)
    return {"weights_gb": weights, "stages": stages, "after_gb": stages[-1]["rss_gb"], "peak_gb": peak,
            "peak_over_weights": peak / weights}


def _run_child(path: str, env: dict, a) -> dict:
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", path, str(a.prompt_tokens),
                          str(a.new_tokens)], env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"rc {out.returncode}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", default="24,1", help="comma-separated layer counts")
    ap.add_argument("--qtype", default="Q8_0", choices=("F16", "Q8_0", "Q4_K"))
    ap.add_argument("--caches", default="cold,warm")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--output", default=os.path.join(_HERE, "results", "memory_stages.json"))
    a = ap.parse_args()
    sys.path.insert(0, _HERE)
    import bench_decode
    import ml_collections

    rows = []
    for layers in [int(x) for x in a.layers.split(",")]:
        with tempfile.TemporaryDirectory() as tmp:
            dims = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=layers,
                        num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                        tie_word_embeddings=True, rope_theta=1000000.0, rms_norm_eps=1e-6)
            c = ml_collections.ConfigDict({"seed": 0, "qwen": dims})
            folder = os.path.join(tmp, "hf")
            os.makedirs(folder)
            bench_decode.qwen_shape_model(c, folder)
            path = bench_decode.make_gguf_files(folder, tmp, [a.qtype])[a.qtype]
            cache = os.path.join(tmp, "xla")
            for mode in a.caches.split(","):
                env = dict(os.environ, PYTHONUNBUFFERED="1")
                env.pop("JAX_COMPILATION_CACHE_DIR", None)
                if mode == "cold":
                    env["RUVLLM_JAX_COMPILATION_CACHE"] = "0"
                elif mode == "warm":
                    env["RUVLLM_JAX_CACHE_DIR"] = cache
                    env.pop("RUVLLM_JAX_COMPILATION_CACHE", None)
                    _run_child(path, env, a)  # fills the cache
                else:
                    raise SystemExit(f"unknown cache mode {mode!r}; expected cold or warm")
                print(f"running {layers} layers {a.qtype} {mode} ...", flush=True)
                r = _run_child(path, env, a)
                rows.append({"layers": layers, "qtype": a.qtype, "cache": mode, **r})

    for r in rows:
        print(f"\n{r['layers']} layers, {r['qtype']}, cache {r['cache']}: weights {r['weights_gb']:.3f} GB, "
              f"peak {r['peak_gb']:.3f} GB = {r['peak_over_weights']:.2f}x the weights")
        print(f"  {'stage':46s} {'s':>6s} {'RSS after':>10s} {'peak in':>8s}  (GB over the RSS before the load)")
        for s in r["stages"]:
            print(f"  {s['stage']:46s} {s['seconds']:6.2f} {s['rss_gb']:10.3f} {s['peak_gb']:8.3f}")
    out = {"what": "RSS by stage, load through the first greedy generation, random Qwen2.5-0.5B-shape GGUF",
           "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
           "time": time.strftime("%Y-%m-%d %H:%M"), "args": vars(a), "results": rows}
    os.makedirs(os.path.dirname(a.output) or ".", exist_ok=True)
    with open(a.output, "w") as f:
        json.dump(out, f, indent=1)
    print(f"\nwrote {a.output}")


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        print(json.dumps(child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))))
        sys.exit(0)
    main()
