"""First-call latency with and without the persistent compilation cache, in fresh processes.

    python experiments/bench_first_call.py --config=configs/bench_first_call.py
    python experiments/bench_first_call.py --config=configs/bench_first_call.py \\
        --config.models=embedded

For each model, each measurement is a new Python process that runs `JaxBackend().load_model(folder)`
and then `generate_tokens(prompt_ids, GenerateParams(max_tokens=new_tokens, temperature=0))` twice:
the first call pays tracing and XLA compilation (or reads the executables from the cache), the
second is the steady state. Modes: "cold" (an empty cache folder, which the run fills), "warm" (a
second process on the folder cold filled) and "disabled" (no persistent cache). Prints a table of
seconds (import, load, first generate, second generate) and writes JSON.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app
from ml_collections import config_flags

_HERE = os.path.dirname(os.path.abspath(__file__))
_RESULT = "RESULT "
# JAX's own cache settings are dropped from the children's environment: the modes set them.
_CACHE_ENV = ("JAX_COMPILATION_CACHE_DIR", "JAX_ENABLE_COMPILATION_CACHE", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS",
              "RUVLLM_JAX_CACHE_DIR", "RUVLLM_JAX_COMPILATION_CACHE")
_TIMES = ("import_s", "load_s", "first_generate_s", "second_generate_s")


def measure(spec: dict) -> dict:
    """Run in a fresh child process: time import, load and two generates under one cache mode."""
    t0 = time.perf_counter()
    import jax
    import numpy as np

    from ruvllm_jax import JaxBackend
    from ruvllm_jax.compilation_cache import disable_compilation_cache, enable_compilation_cache
    from ruvllm_jax.types import GenerateParams

    import_s = time.perf_counter() - t0
    events: list[str] = []
    jax.monitoring.register_event_listener(lambda event, **kw: events.append(event))
    # Explicit either way, so this works whether or not JaxBackend() enables the default cache.
    if spec["cache_dir"] is None:
        disable_compilation_cache()
        in_use = None
    else:
        in_use = enable_compilation_cache(spec["cache_dir"])
        if in_use is None:
            raise RuntimeError(f"could not enable the compilation cache in {spec['cache_dir']!r}")

    t0 = time.perf_counter()
    backend = JaxBackend()
    backend.load_model(spec["model_folder"])
    load_s = time.perf_counter() - t0
    prompt = np.random.default_rng(spec["seed"]).integers(3, backend.config.vocab_size, spec["prompt_tokens"]).tolist()
    params = GenerateParams(max_tokens=spec["new_tokens"], temperature=0.0)
    t0 = time.perf_counter()
    first = backend.generate_tokens(prompt, params)
    first_generate_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    second = backend.generate_tokens(prompt, params)
    second_generate_s = time.perf_counter() - t0
    if first != second:
        raise RuntimeError(f"greedy generation differs between calls: {first} vs {second}")
    return {"import_s": import_s, "load_s": load_s, "first_generate_s": first_generate_s,
            "second_generate_s": second_generate_s, "tokens": first, "cache_dir": in_use,
            "cache_hits": events.count("/jax/compilation_cache/cache_hits"),
            "cache_writes": events.count("/jax/compilation_cache/cache_misses"),
            "jax": jax.__version__, "device": str(jax.devices()[0])}


def build_qwen_shape(qwen: dict, seed: int, folder: str) -> None:
    """Run in a child process: save the random Qwen2.5-0.5B-shape model with bench_decode's builder."""
    import ml_collections
    from bench_decode import qwen_shape_model  # imported here: bench_decode defines --config at import

    qwen_shape_model(ml_collections.ConfigDict({"seed": seed, "qwen": qwen}), folder)


def _run_child(call: str, arg, timeout_s: float):
    """`call(arg)` in a fresh Python process (this folder on sys.path); returns its JSON result."""
    env = {k: v for k, v in os.environ.items() if k not in _CACHE_ENV}
    code = (f"import json, sys; sys.path.insert(0, {_HERE!r}); import bench_first_call as b; "
            f"print({_RESULT!r} + json.dumps(b.{call}(*json.loads(sys.argv[1]))))")
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(arg)], env=env, capture_output=True, text=True,
                          timeout=timeout_s, cwd=os.path.dirname(_HERE))
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(_RESULT)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"child {call} failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len(_RESULT):])


def _folder_size(folder: str) -> tuple[int, int]:
    files = [os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs if not f.startswith(".")]
    return len(files), sum(os.path.getsize(f) for f in files)


def bench_model(c, name: str, model_folder, prompt_tokens: int, modes: list[str], tmp: str) -> dict:
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    entries = []
    for r in range(c.repeats):
        cache_dir = os.path.join(tmp, f"xla_{r}")  # absent: cold starts from nothing
        for mode in modes:
            spec = {"model_folder": model_folder, "cache_dir": None if mode == "disabled" else cache_dir,
                    "prompt_tokens": prompt_tokens, "new_tokens": c.new_tokens, "seed": c.seed}
            got = _run_child("measure", [spec], c.child_timeout_s)
            runs[mode].append(got)
            print(f"  {name} {mode} run {r}: " + ", ".join(f"{k} {got[k]:.2f}" for k in _TIMES)
                  + f", cache hits {got['cache_hits']}, writes {got['cache_writes']}", flush=True)
            if mode == "cold":
                entries.append(_folder_size(cache_dir))
    tokens = {tuple(g["tokens"]) for rs in runs.values() for g in rs}
    if len(tokens) != 1:
        raise RuntimeError(f"{name}: generated tokens differ between modes: {tokens}")
    result = {"model": name, "prompt_tokens": prompt_tokens, "new_tokens": c.new_tokens,
              "jax": runs[modes[0]][0]["jax"], "device": runs[modes[0]][0]["device"], "modes": {}}
    for mode, rs in runs.items():
        result["modes"][mode] = {k: statistics.median(g[k] for g in rs) for k in _TIMES}
        result["modes"][mode].update(cache_hits=rs[0]["cache_hits"], cache_writes=rs[0]["cache_writes"],
                                     runs=[{k: g[k] for k in _TIMES} for g in rs])
    if entries:
        result["cache_entries"], result["cache_bytes"] = entries[0]
    if "cold" in runs and "warm" in runs:
        cold, warm = result["modes"]["cold"], result["modes"]["warm"]
        result["first_generate_speedup_warm_vs_cold"] = cold["first_generate_s"] / warm["first_generate_s"]
    return result


def main(argv):
    del argv
    c = _CONFIG.value
    modes = [m.strip() for m in c.modes.split(",") if m.strip()]
    for m in modes:
        if m not in ("cold", "warm", "disabled"):
            raise app.UsageError(f"unknown mode {m!r}; expected cold, warm or disabled")
    if "warm" in modes and ("cold" not in modes or modes.index("cold") > modes.index("warm")):
        raise app.UsageError(f"mode 'warm' reads the folder 'cold' fills: put cold before it, got {c.modes!r}")
    rows = []
    for name in [m.strip() for m in c.models.split(",") if m.strip()]:
        with tempfile.TemporaryDirectory() as tmp:
            if name == "embedded":
                model_folder, prompt_tokens = None, c.prompt_tokens
            elif name == "qwen_shape":
                model_folder, prompt_tokens = os.path.join(tmp, "model"), c.qwen_prompt_tokens
                print(f"building {name} in {model_folder}", flush=True)
                _run_child("build_qwen_shape", [c.qwen.to_dict(), c.seed, model_folder], c.child_timeout_s)
            else:
                raise app.UsageError(f"unknown model {name!r}; expected embedded or qwen_shape")
            rows.append(bench_model(c, name, model_folder, prompt_tokens, modes, tmp))

    print(f"\n{'model':11s} {'prompt':>6s} {'mode':9s} {'import s':>9s} {'load s':>7s} {'1st gen s':>10s} "
          f"{'2nd gen s':>10s} {'hits':>5s}")
    for r in rows:
        for mode, m in r["modes"].items():
            print(f"{r['model']:11s} {r['prompt_tokens']:6d} {mode:9s} {m['import_s']:9.2f} {m['load_s']:7.2f} "
                  f"{m['first_generate_s']:10.2f} {m['second_generate_s']:10.3f} {m['cache_hits']:5d}")
        if "first_generate_speedup_warm_vs_cold" in r:
            print(f"{r['model']:11s} first generate, warm vs cold: {r['first_generate_speedup_warm_vs_cold']:.1f}x "
                  f"faster; cache {r['cache_entries']} files, {r['cache_bytes'] / 2**20:.1f} MiB")
    out = {"machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count()},
           "config": c.to_dict(), "results": rows}
    os.makedirs(os.path.dirname(c.output) or ".", exist_ok=True)
    with open(c.output, "w") as f:
        json.dump(out, f, indent=2)
    print(f"\nwrote {c.output}")


if __name__ == "__main__":
    # Defined here, not at import: the child processes (and tests) import this module.
    _CONFIG = config_flags.DEFINE_config_file("config", "configs/bench_first_call.py", "Benchmark config.")
    app.run(main)
