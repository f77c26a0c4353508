"""Decode throughput of ruvllm_jax against transformers and llama.cpp on the same weights, in one run.

    bash experiments/install_bench.sh     # optional: llama-cpp-python built for this CPU
    python experiments/bench_decode.py --config=configs/bench_decode.py
    python experiments/bench_decode.py --config=configs/bench_decode.py --config.models=embedded

For each model and row (`engine:precision[:gguf file]`, see the config): load time, prefill latency
of a `prompt_tokens` prompt, greedy decode tokens/s (batch 1, median of `repeats` after a warm-up),
the weights' bytes as kept and the peak RSS from the load through the first generation over them,
and the RSS left after it (ruvllm_jax: after `JaxBackend.generate_tokens`, the first generation a
user runs, compiles included: children run with the persistent compilation cache off unless
`compilation_cache` is set; the others: at the end of their run).
Each row runs in its own process, `rounds` times with the engines alternating (each figure is then
the median over the rounds; the issue's "one run" is rounds=1, the default). The GGUF files are
written once per run from the same random model (F16 and Q8_0 by ruvllm_jax's exporter, Q4_K_M by
llama.cpp's quantizer), and every engine that reads GGUF reads the very same file. Prints a table
and writes JSON. Random weights are fine for speed: the work per token does not depend on them.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import tempfile
import time

from absl import app
from ml_collections import config_flags


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up (compiles)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_ruvllm(backend, prompt_ids: list[int], new_tokens: int, repeats: int) -> dict:
    """Prefill ms and greedy decode tok/s of the one-slot engine `JaxBackend.generate` runs."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from ruvllm_jax.backend import engine
    from ruvllm_jax.backend.sampling import SamplingParams
    from ruvllm_jax.types import GenerateParams

    params, cfg = backend.params, backend.config
    greedy = GenerateParams(max_tokens=new_tokens, temperature=0.0, repetition_penalty=1.0)
    sampling = SamplingParams.from_generate_params(greedy)
    # The one-slot engine JaxBackend.generate runs (contiguous cache, segmented decode chunks, the layer
    # scan where it picks it).
    config = backend._one_slot_config(len(prompt_ids), new_tokens)
    bucket, _ = engine.buckets(len(prompt_ids), new_tokens, backend.max_context())
    tokens = np.zeros((1, bucket), np.int32)
    tokens[0, : len(prompt_ids)] = prompt_ids
    no_eos = jnp.asarray([-1], jnp.int32)  # decode the full count, as transformers does with min_new_tokens
    eng = engine.Engine(cfg, config)
    rows = SamplingParams.stack([sampling])
    presence = np.zeros((1, cfg.vocab_size), np.bool_)
    presence[0, prompt_ids] = True

    def prefill():
        st = eng.prefill(params, eng.init_decode_state(), [0], tokens, [len(prompt_ids)], sampling=rows,
                         rngs=jnp.stack([engine.make_rng(0)]), max_tokens=[new_tokens], eos_ids=no_eos,
                         presence=presence)
        return jax.block_until_ready(st)

    def decode_s() -> float:
        """Seconds of the decode alone, after a prefill (a long prompt's prefill would drown it)."""
        st = prefill()
        t0 = time.perf_counter()
        produced = 1
        while produced < new_tokens:
            st, _, count = eng.generate(params, st, eos_ids=no_eos, limit=new_tokens - produced)
            produced += int(count)
        return time.perf_counter() - t0

    prefill_s = _median_time(prefill, repeats)
    decode_s()  # warm-up (compiles)
    decode = statistics.median(decode_s() for _ in range(repeats))
    return {"prefill_ms": prefill_s * 1e3, "decode_tok_s": (new_tokens - 1) / decode, "total_s": prefill_s + decode,
            "jax": jax.__version__, "device": str(jax.devices()[0]), "layer_scan": config.layer_scan}


def bench_transformers(model, prompt_ids: list[int], new_tokens: int, repeats: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    ids = torch.tensor([prompt_ids])
    kw = dict(do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)

    def prefill():
        with torch.no_grad():
            model(ids, use_cache=True)

    def generate():
        with torch.no_grad():
            model.generate(ids, **kw)

    prefill_s = _median_time(prefill, repeats)
    total_s = _median_time(generate, repeats)
    decode_s = max(total_s - prefill_s, 1e-9)
    return {"prefill_ms": prefill_s * 1e3, "decode_tok_s": (new_tokens - 1) / decode_s, "total_s": total_s,
            "torch": torch.__version__, "threads": threads}


def qwen_shape_model(c, tmp: str, dims=None):
    import torch
    import transformers as tf

    torch.manual_seed(c.seed)
    cfg = tf.Qwen2Config(**(c.qwen if dims is None else dims).to_dict())
    model = tf.Qwen2ForCausalLM(cfg).eval().float()
    model.save_pretrained(tmp)
    import shutil

    from ruvllm_jax.backend.jax_backend import default_model_path

    # Any tokenizer (the benchmark feeds token ids): a GGUF needs one for llama.cpp to load it.
    shutil.copy(os.path.join(default_model_path(), "tokenizer.json"), tmp)
    return model


def embedded_model():
    import transformers as tf

    from ruvllm_jax.backend.jax_backend import default_model_path

    path = default_model_path()
    return tf.AutoModelForCausalLM.from_pretrained(path, dtype="float32").eval(), path


def _status_gb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1e6
    return float("nan")


def _rss_gb() -> float:
    return _status_gb("VmRSS")


def _peak_rss_gb() -> float:
    """This process's peak RSS (VmHWM). Not ru_maxrss: Linux keeps that across fork + exec, so a child
    of a big parent would report the parent's size."""
    return _status_gb("VmHWM")


def child(spec: dict) -> dict:
    """One row, in its own process so that its peak RSS is its own: load, first generation, timing.

    `peak_over_load` is the peak RSS from just before the load through the first generation, minus
    the RSS just before it (the interpreter and the engine's libraries), over the bytes of weights
    the engine keeps: the issue's one-copy target is <= 1.25. `beyond_weights_gb` is the rest: for
    ruvllm_jax mostly XLA building the first generation's programs, a cost that grows with the layers,
    not the weights' bytes (the 14 MB embedded model pays 0.18 GB). Measured by stage on the 0.5B shape,
    Q8_0 (`experiments/memory_stages.py`): the load keeps 0.035 GB over the weights; the engine's fresh
    state, the process's first XLA compile, 0.06; the prefill program 0.08-0.10 while it compiles and ~0.04
    kept; the decode program 0.12-0.13 and ~0.05 kept. A warm compilation cache barely helps: loading the
    24-layer executables costs 0.06-0.07 / 0.11-0.12 GB too (a 1-layer model's, 0.01).
    `first_generation_compiles` counts the XLA programs the first generation built (5).
    `after_first_gb` is the RSS left after the first generation (freed compile memory is trimmed back
    to the OS, see `ruvllm_jax.host_memory`).
    """
    engine_name, path, prompt, new = spec["engine"], spec["path"], spec["prompt"], spec["new_tokens"]
    repeats, threads = spec["repeats"], spec["threads"]
    if engine_name == "ruvllm_jax":
        from ruvllm_jax.backend import JaxBackend
        from ruvllm_jax.types import ModelConfig, Precision

        backend = JaxBackend.new()
        q = None if spec["quantization"] is None else Precision[spec["quantization"]]
        base = _rss_gb()
        t0 = time.perf_counter()
        backend.load_model(path, ModelConfig(max_context=max(1024, len(prompt) + new), quantization=q))
        load_s = time.perf_counter() - t0
        weights = backend.memory_stats().params_bytes / 1e9
        after_load = _rss_gb()
        # The first generation as a user runs it (compiles included, unless the cache is warm): the
        # peak and the RSS left after it are this row's memory figures; the timing below may compile
        # its own engine's programs again, after them.
        t0 = time.perf_counter()
        from ruvllm_jax import host_memory
        from ruvllm_jax.types import GenerateParams

        compiles = host_memory.compile_count()
        backend.generate_tokens(prompt, GenerateParams(max_tokens=new, temperature=0.0, repetition_penalty=1.0))
        first = {"first_generation_s": time.perf_counter() - t0, "peak": _peak_rss_gb(), "after": _rss_gb(),
                 "after_load_gb": after_load - base,
                 "first_generation_compiles": host_memory.compile_count() - compiles}
        out = bench_ruvllm(backend, prompt, new, repeats)
        out["dtype"] = backend.model_info().dtype
        from ruvllm_jax.quant import native

        out["native_kernel"] = native.available()
    elif engine_name == "transformers":
        import torch
        import transformers as tf

        torch.set_num_threads(threads)
        base = _rss_gb()
        t0 = time.perf_counter()
        dtype = {"FP32": torch.float32, "BF16": torch.bfloat16}[spec["quantization"]]
        model = tf.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
        load_s = time.perf_counter() - t0
        weights = sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9
        out = bench_transformers(model, prompt, new, repeats, threads)
    elif engine_name == "llama.cpp":
        out, base, load_s, weights = bench_llama_cpp(path, prompt, new, repeats, threads)
    else:
        raise ValueError(engine_name)
    run_peak = _peak_rss_gb()
    if engine_name == "ruvllm_jax":
        peak, after = first.pop("peak"), first.pop("after")
        out.update(first)
    else:  # their first generation is inside the timing runs: the whole run's peak and final RSS
        peak, after = run_peak, _rss_gb()
    out.update(load_s=load_s, weights_gb=weights, rss_before_load_gb=base, peak_rss_gb=peak, run_peak_rss_gb=run_peak,
               peak_over_load=(peak - base) / weights if weights else None, beyond_weights_gb=peak - base - weights,
               after_first_gb=after - base)
    return out


def bench_llama_cpp(path: str, prompt: list[int], new: int, repeats: int, threads: int):
    """llama-cpp-python on the GGUF at `path`: prefill of the prompt, then `new - 1` single-token evals."""
    import numpy as np
    from llama_cpp import Llama

    base = _rss_gb()
    t0 = time.perf_counter()
    llm = Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=max(512, len(prompt) + new),
                n_batch=512, verbose=False)
    load_s = time.perf_counter() - t0

    def prefill():
        llm.reset()
        llm.eval(prompt)

    def generate():
        prefill()
        for _ in range(new - 1):
            llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])

    prefill_s = _median_time(prefill, repeats)
    total_s = _median_time(generate, repeats)
    decode_s = max(total_s - prefill_s, 1e-9)
    import llama_cpp

    weights = sum(t.n_bytes for t in _gguf_tensors(path)) / 1e9
    out = {"prefill_ms": prefill_s * 1e3, "decode_tok_s": (new - 1) / decode_s, "total_s": total_s,
           "llama_cpp_python": llama_cpp.__version__, "threads": threads}
    return out, base, load_s, weights


def _gguf_tensors(path: str):
    import gguf

    return gguf.GGUFReader(path).tensors


def run_child(spec: dict) -> dict:
    import subprocess
    import sys

    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if not spec.get("compilation_cache", False):  # a cold first run: its compiles count in its peak
        env["RUVLLM_JAX_COMPILATION_CACHE"] = "0"
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"rc {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def make_gguf_files(folder: str, out_dir: str, want: list[str]) -> dict[str, str]:
    """F16 / Q8_0 GGUFs written by ruvllm_jax's exporter; Q4_K_M by llama.cpp's own quantizer (its
    mix of Q4_K / Q5_0 / Q6_K / Q8_0), from the F16 file, when llama-cpp-python is installed."""
    from ruvllm_jax.backend import JaxBackend
    from ruvllm_jax.models import gguf_io

    backend = JaxBackend.new()
    backend.load_model(folder)
    files = {}
    for qtype in ("F16", "Q8_0"):
        if qtype in want or (qtype == "F16" and "Q4_K_M" in want):
            files[qtype] = os.path.join(out_dir, f"model-{qtype}.gguf")
            gguf_io.save_gguf(backend.params, backend.config, files[qtype], qtype=qtype,
                              tokenizer=backend.tokenizer(), eos_token_ids=backend.eos_token_ids)
    if "Q4_K_M" in want:
        try:
            import llama_cpp
        except ImportError:
            files["Q4_K_M"] = None
        else:
            files["Q4_K_M"] = os.path.join(out_dir, "model-Q4_K_M.gguf")
            qp = llama_cpp.llama_model_quantize_default_params()
            qp.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
            qp.nthread = 2
            rc = llama_cpp.llama_model_quantize(files["F16"].encode(), files["Q4_K_M"].encode(), qp)
            if rc != 0:
                raise RuntimeError(f"llama_model_quantize failed with {rc}")
    if "Q4_K" in want:
        files["Q4_K"] = os.path.join(out_dir, "model-Q4_K.gguf")
        gguf_io.save_gguf(backend.params, backend.config, files["Q4_K"], qtype="Q4_K",
                          tokenizer=backend.tokenizer(), eos_token_ids=backend.eos_token_ids)
    return files


def _median_run(runs: list[dict]) -> dict:
    """A row's figures over its rounds: each number the median of the rounds (the first error if any
    round failed), and the rounds' decode tok/s and peaks as lists."""
    errors = [r for r in runs if "error" in r]
    if errors:
        return errors[0]
    out = dict(runs[0])
    for k, v in runs[0].items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None:
            out[k] = statistics.median(r[k] for r in runs)
    out["rounds"] = len(runs)
    out["decode_tok_s_runs"] = [r["decode_tok_s"] for r in runs]
    out["peak_over_load_runs"] = [r["peak_over_load"] for r in runs]
    return out


def _type_mix(path: str) -> str:
    """Bytes per GGML type in a GGUF, largest first: what a "Q4_K_M" file really holds."""
    counts: dict[str, int] = {}
    for t in _gguf_tensors(path):
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + int(t.n_bytes)
    total = sum(counts.values())
    return ", ".join(f"{k} {v / total:.0%}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))


def main(argv):
    del argv
    c = _CONFIG.value
    import numpy as np

    rows, mixes = [], {}
    for name in [m.strip() for m in c.models.split(",") if m.strip()]:
        with tempfile.TemporaryDirectory() as tmp:
            if name == "qwen_shape":
                model, folder, new_tokens = qwen_shape_model(c, tmp), tmp, c.new_tokens
            elif name == "qwen_1p5b_shape":
                model, folder, new_tokens = qwen_shape_model(c, tmp, c.large), tmp, c.new_tokens
            elif name == "embedded":
                (model, folder), new_tokens = embedded_model(), c.embedded_new_tokens
            else:
                raise app.UsageError(f"unknown model {name!r}; expected qwen_shape, qwen_1p5b_shape or embedded")
            vocab = model.config.vocab_size
            del model  # every row loads its own copy in a child process
            prompt = np.random.default_rng(c.seed).integers(3, vocab, c.prompt_tokens).tolist()
            listed = {"qwen_shape": c.engines, "qwen_1p5b_shape": c.large_engines}.get(name, c.embedded_engines)
            engines = [e.strip() for e in listed.split(",")]
            gguf_dir = os.path.join(tmp, "gguf")
            os.makedirs(gguf_dir, exist_ok=True)
            wanted = sorted({e.split(":")[2] for e in engines if e.count(":") == 2})
            files = make_gguf_files(folder, gguf_dir, wanted) if wanted else {}
            for f, path in files.items():
                if path:
                    mixes[f"{name} {f}"] = _type_mix(path)
            runs: dict[str, list[dict]] = {}
            for rnd in range(c.rounds):  # rounds alternate the engines, so machine drift hits all alike
                for e in engines:
                    engine_name, quant, *src = e.split(":")
                    path = folder if not src else files.get(src[0])
                    spec = {"engine": engine_name, "path": path, "quantization": None if quant == "keep" else quant,
                            "prompt": prompt, "new_tokens": new_tokens, "repeats": c.repeats, "threads": c.threads,
                            "compilation_cache": c.compilation_cache}
                    if path is None:
                        r = {"error": "llama-cpp-python is not installed (bash experiments/install_bench.sh)"}
                    else:
                        print(f"running {name} {e} (round {rnd + 1} of {c.rounds}) ...", flush=True)
                        r = run_child(spec)
                    runs.setdefault(e, []).append(r)
            for e in engines:
                engine_name, quant, *src = e.split(":")
                label = f"{quant} ({src[0] if src else 'safetensors'})"
                rows.append({"model": name, "engine": engine_name, "weights": label, "prompt_tokens": c.prompt_tokens,
                             "new_tokens": new_tokens, **_median_run(runs[e])})

    by_model: dict[str, dict] = {}
    for r in rows:
        by_model.setdefault(r["model"], {})[(r["engine"], r["weights"])] = r
    print(f"\n{'model':11s} {'engine':13s} {'weights':26s} {'prefill ms':>10s} {'decode tok/s':>12s} "
          f"{'weights GB':>10s} {'peak/weights':>12s} {'beyond GB':>9s} {'after/weights':>13s} {'1st gen s':>9s}")
    for r in rows:
        if "error" in r:
            print(f"{r['model']:11s} {r['engine']:13s} {r['weights']:26s} error: {r['error']}")
            continue
        print(f"{r['model']:11s} {r['engine']:13s} {r['weights']:26s} {r['prefill_ms']:10.1f} "
              f"{r['decode_tok_s']:12.1f} {r['weights_gb']:10.3f} {r['peak_over_load'] or float('nan'):12.2f} "
              f"{r['beyond_weights_gb']:9.3f} {r['after_first_gb'] / r['weights_gb']:13.2f} "
              f"{r.get('first_generation_s', float('nan')):9.1f}")
    ratios, paired_ratios = {}, {}
    for model, got in by_model.items():
        for ours, theirs in c.ratios:
            a, b = got.get(tuple(ours)), got.get(tuple(theirs))
            if a and b and "decode_tok_s" in a and "decode_tok_s" in b:
                key = f"{model}: {ours[0]} {ours[1]} / {theirs[0]} {theirs[1]}"
                ratios[key] = a["decode_tok_s"] / b["decode_tok_s"]
                line = f"{key}: {ratios[key]:.2f}x"
                if a.get("rounds", 1) > 1 and a.get("rounds") == b.get("rounds"):  # same-round pairs
                    paired = [x / y for x, y in zip(a["decode_tok_s_runs"], b["decode_tok_s_runs"], strict=True)]
                    paired_ratios[key] = paired
                    line += f" (round by round: {', '.join(f'{x:.2f}' for x in paired)})"
                print(line)
    for k, v in mixes.items():
        print(f"{k}: {v}")
    out = {"machine": {"platform": platform.platform(), "processor": _cpu_name(), "cpus": os.cpu_count()},
           "config": c.to_dict(), "results": rows, "decode_ratios": ratios, "decode_ratios_by_round": paired_ratios,
           "gguf_type_mix": mixes}
    os.makedirs(os.path.dirname(c.output) or ".", exist_ok=True)
    with open(c.output, "w") as f:
        json.dump(out, f, indent=2)
    print(f"\nwrote {c.output}")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.read().splitlines()
        name = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), "")
        flags = next((ln.split(":", 1)[1].split() for ln in lines if ln.startswith("flags")), [])
        simd = [x for x in flags if x in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_int8")]
        return f"{name} ({' '.join(simd)})"
    except OSError:
        return platform.processor()


if __name__ == "__main__":
    import sys

    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        print(json.dumps(child(json.loads(sys.argv[2]))))
        sys.exit(0)
    # Defined here, not at import: other experiments import this module (`qwen_shape_model`), and a
    # second definition of the flag would raise DuplicateFlagError.
    _CONFIG = config_flags.DEFINE_config_file("config", "configs/bench_decode.py", "Benchmark config.")
    app.run(main)
