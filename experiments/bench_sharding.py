"""Per-device memory and decode tok/s of a model sharded over (data, model) meshes (`ModelConfig.mesh_shape`).

    python experiments/bench_sharding.py --config=configs/bench_sharding.py
    python experiments/bench_sharding.py --config=configs/bench_sharding.py --config.models=embedded
    python experiments/bench_sharding.py --config.meshes=none,1x2,2x4 --config.repeats=1

Runs on the GPUs when `jax.devices()` are GPUs (meshes that need more of them than present are
skipped), else on 8 virtual CPU devices: the script sets `XLA_FLAGS=--xla_force_host_platform_device_count=8`
before jax is imported unless XLA_FLAGS already names a count (`--config.host_devices=N` changes 8,
`--config.platform=cpu` forces the CPU on a GPU machine; both are read from the command line before
jax loads).

For each model and mesh, one `JaxBackend.load_model(path, ModelConfig(mesh_shape=...))` (mesh "none"
is one device, the reference), then:

- params bytes: the whole arrays (`memory_stats().params_bytes`) and the most / least any one device
  holds (`params_bytes_per_device()`);
- KV cache bytes: the paged pool `generate_batch` runs on (`backend.engine_config` with
  `max_slots = batch`, the engine's own sizing), total and the most one device holds, read from
  `serving_engine(config).engine.init_decode_state()` with `sharding.per_device_bytes`;
- batch-1 greedy decode: `generate_tokens` of `new_tokens` on a `prompt_tokens`-token prompt, EOS off,
  tok/s = new_tokens / median wall time (the prefill included), after one warm-up (timed separately
  as `first_call_s`: mostly compilation);
- batched: `generate_batch` of `batch` text prompts, `batch_new_tokens` each, EOS off (so every prompt
  yields exactly that many tokens), tok/s = batch * batch_new_tokens / median wall time;
- correctness: whether the greedy tokens (batch 1) and the texts (batched) equal the one-device run's.

A mesh the model's heads refuse is a row "refused: <the ConfigError>". Prints a markdown table and
writes JSON (`output`). On a CPU the "devices" are slices of the same cores and memory: tok/s shows
the partitioning overhead, not a speedup (see `notes` in the JSON); the per-device bytes are real.
"""

from __future__ import annotations

import os
import sys


def _argv_value(name: str):
    """--config.NAME=VALUE (or --config.NAME VALUE) from the command line, before absl parses it."""
    flag = f"--config.{name}"
    for i, arg in enumerate(sys.argv):
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
        if arg == flag and i + 1 < len(sys.argv):
            return sys.argv[i + 1]
    return None


def _set_device_env() -> None:
    """Before jax is imported: the virtual CPU device count, and the CPU platform when asked for."""
    if __name__ != "__main__":
        return
    if _argv_value("platform") == "cpu":
        os.environ["JAX_PLATFORMS"] = "cpu"
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        n = int(_argv_value("host_devices") or 8)
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()


_set_device_env()

import json  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

from absl import app  # noqa: E402
from ml_collections import config_flags  # noqa: E402

MODELS = ("embedded", "random_qwen2")

# Text prompts for generate_batch (the embedded model's tokenizer; the random model gets a copy).
BATCH_PROMPTS = (
    "ROMEO:", "First Citizen:\nBefore we proceed any further, hear me speak.", "KING RICHARD II:\nNow",
    "To be, or not to be", "JULIET:\nO Romeo, Romeo!", "MENENIUS:\nWhy, masters,", "QUEEN MARGARET:",
    "Second Citizen:\nWould you proceed especially against Caius Marcius?", "GLOUCESTER:\nNow is the winter",
    "LADY ANNE:", "BRUTUS:\nThe people", "HAMLET:\nWhat a piece of work",
)

NOTES = (
    "On a CPU the N mesh 'devices' are virtual (XLA_FLAGS=--xla_force_host_platform_device_count): "
    "all of them run on the same cores and share the same memory and memory bandwidth, and their "
    "collectives (all-reduce, all-gather) are memcpy within one process. So the tok/s columns measure "
    "the overhead of partitioning (more, smaller kernels; collectives; per-device dispatch), not a "
    "speedup: a real multi-chip mesh adds compute and bandwidth per device, a virtual one does not. "
    "The per-device byte columns are real layout facts (what each device's shards hold, the same on "
    "any hardware): weights split over the model axis shrink per device, the data axis replicates "
    "them, and KV heads that do not divide by the model axis are replicated on every device. "
    "The params/dev and KV/dev columns are the most any one device holds. "
    "A data axis on a batch-1 run (8x1, and the data half of 2x4) cannot split one sequence: every "
    "data replica decodes the same sequence, so its work is repeated, not shared. "
    "first_call_s (per row) is mostly XLA compilation; ruvllm_jax's persistent compilation cache "
    "(machine.compilation_cache_dir) makes it far shorter on a rerun and never enters the tok/s. "
    "The machine may be shared: see the load averages (a load above the core count means other "
    "work competed for the cores during the timings)."
)


def _meshes(spec) -> list:
    out = []
    for m in ([s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)):
        if not m:
            continue
        if m.lower() in ("none", "1", "single"):
            out.append(None)
        else:
            d, k = m.lower().split("x")
            out.append((int(d), int(k)))
    return out


def _names(spec) -> list[str]:
    names = [m.strip() for m in spec.split(",") if m.strip()] if isinstance(spec, str) else list(spec)
    for name in names:
        if name not in MODELS:
            raise app.UsageError(f"unknown model {name!r}; expected one of {MODELS}")
    return names


def random_qwen2_folder(c, folder: str) -> str:
    """Random weights of the `c.random` shape, saved with save_hf_folder, plus the embedded tokenizer
    (its 2048 ids all lie inside the model's vocabulary; the rest decode to no text)."""
    import jax

    from ruvllm_jax.backend.jax_backend import default_model_path
    from ruvllm_jax.models.config import LlamaConfig
    from ruvllm_jax.models.llama import init_params
    from ruvllm_jax.models.loader import save_hf_folder

    cfg = LlamaConfig.from_hf_dict(c.random.to_dict(), source="configs/bench_sharding.py random")
    params = init_params(cfg, jax.random.key(c.seed))
    save_hf_folder(params, cfg, folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        src = os.path.join(default_model_path(), name)
        if os.path.isfile(src):
            shutil.copy(src, folder)
    return folder


def _timed(fn, repeats: int):
    """-> (first call seconds, median of `repeats` later calls, the last result)."""
    t0 = time.perf_counter()
    out = fn()
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return first, statistics.median(times), out


def bench_row(folder, mesh, c, prompt_ids: list[int], texts: list[str]) -> dict:
    """One (model, mesh) row; raises ConfigError when the mesh refuses the model."""
    import dataclasses

    from ruvllm_jax.backend import JaxBackend
    from ruvllm_jax.backend.engine import pow2_bucket
    from ruvllm_jax.sharding import per_device_bytes
    from ruvllm_jax.types import GenerateParams, ModelConfig

    backend = JaxBackend.new()
    t0 = time.perf_counter()
    backend.load_model(folder, ModelConfig(max_context=c.max_context, mesh_shape=mesh))
    load_s = time.perf_counter() - t0
    backend.eos_token_ids = ()  # every token decodes
    per_dev = backend.params_bytes_per_device()
    row = {"load_s": load_s, "params_bytes": backend.memory_stats().params_bytes,
           "params_bytes_per_device_max": max(per_dev.values()), "params_bytes_per_device_min": min(per_dev.values()),
           "devices": len(per_dev), "memory_stats_device": backend.memory_stats().device}

    # The paged pool generate_batch allocates for `batch` prompts (same config it builds).
    config = backend.engine_config
    config = dataclasses.replace(config, max_slots=min(config.max_slots, pow2_bucket(c.batch, 1)))
    state = backend.serving_engine(config).engine.init_decode_state()
    kv = per_device_bytes(state.cache)
    row.update(kv_engine={"max_slots": config.max_slots, "max_len": config.max_len,
                          "block_size": config.block_size, "pool_blocks": config.pool_blocks},
               kv_cache_bytes=int(state.cache.nbytes()), kv_cache_bytes_per_device_max=max(kv.values()),
               decode_state_bytes_per_device_max=max(per_device_bytes(state).values()))
    del state

    greedy = GenerateParams(max_tokens=c.new_tokens, temperature=0.0, repetition_penalty=1.0, seed=0)
    first, med, tokens = _timed(lambda: backend.generate_tokens(prompt_ids, greedy), c.repeats)
    if len(tokens) != c.new_tokens:
        raise RuntimeError(f"generate_tokens gave {len(tokens)} tokens, expected {c.new_tokens}")
    row.update(b1_first_call_s=first, b1_s=med, b1_tok_s=c.new_tokens / med, b1_tokens=tokens)

    batch_params = GenerateParams(max_tokens=c.batch_new_tokens, temperature=0.0, repetition_penalty=1.0, seed=0)
    first, med, outs = _timed(lambda: backend.generate_batch(texts, batch_params), c.repeats)
    row.update(batch_first_call_s=first, batch_s=med, batch_tok_s=len(texts) * c.batch_new_tokens / med,
               batch_texts=outs)
    backend.unload()
    return row


def _machine(c) -> dict:
    import jax

    dev = jax.devices()
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {"platform": platform.platform(), "processor": _cpu_name(), "cpus": os.cpu_count(),
            "python": platform.python_version(), "jax": jax.__version__, "jaxlib": _jaxlib_version(),
            "backend": jax.default_backend(), "device_kind": dev[0].device_kind, "devices": len(dev),
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "load_average_1_5_15_at_start": load}


def _jaxlib_version() -> str:
    try:
        import jaxlib

        return jaxlib.__version__
    except (ImportError, AttributeError):
        return "?"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for ln in f:
                if ln.startswith("model name"):
                    return ln.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _mesh_name(mesh) -> str:
    return "single" if mesh is None else f"{mesh[0]}x{mesh[1]}"


def main_rows(c) -> tuple[list[dict], dict]:
    """Every (model, mesh) row of config `c` (no printing of the table, no files) and the run info."""
    import jax
    import numpy as np

    from ruvllm_jax.backend.jax_backend import default_model_path
    from ruvllm_jax.errors import ConfigError

    devices = jax.devices()
    on_gpu = devices[0].platform == "gpu"
    info = {"ran_on": "gpu" if on_gpu else "cpu", "gpu_ran": on_gpu,
            "gpu_note": (f"{len(devices)} GPU(s): {devices[0].device_kind}" if on_gpu else
                         "no GPU present: jax.devices() are CPU devices, so only the virtual CPU mesh ran")}
    rows = []
    for name in _names(c.models):
        with tempfile.TemporaryDirectory() as tmp:
            folder = default_model_path() if name == "embedded" else random_qwen2_folder(c, tmp)
            with open(os.path.join(folder, "config.json")) as f:
                hf = json.load(f)
            vocab = min(int(hf["vocab_size"]), 2048)  # ids the tokenizer knows (any id works for speed)
            prompt = np.random.default_rng(c.seed).integers(3, vocab, c.prompt_tokens).tolist()
            texts = [BATCH_PROMPTS[i % len(BATCH_PROMPTS)] for i in range(c.batch)]
            shape = {k: hf[k] for k in ("model_type", "vocab_size", "hidden_size", "intermediate_size",
                                        "num_hidden_layers", "num_attention_heads", "num_key_value_heads")}
            ref = None
            for mesh in _meshes(c.meshes):
                row = {"model": name, "mesh": _mesh_name(mesh), "mesh_shape": mesh, "shape": shape}
                need = 1 if mesh is None else mesh[0] * mesh[1]
                if need > len(devices):
                    row["status"] = f"skipped: needs {need} devices, {len(devices)} present"
                    rows.append(row)
                    print(f"{name} {row['mesh']}: {row['status']}", flush=True)
                    continue
                print(f"{name} {row['mesh']} ...", flush=True)
                row["load_average_1m_at_start"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
                t0 = time.perf_counter()
                try:
                    row.update(bench_row(folder, mesh, c, prompt, texts))
                    row["status"] = "ok"
                except ConfigError as e:
                    row["status"] = f"refused: {e}"
                row["row_s"] = time.perf_counter() - t0
                if row["status"] == "ok":
                    if mesh is None:
                        ref = row
                    if ref is not None:
                        row["same_b1_tokens"] = row["b1_tokens"] == ref["b1_tokens"]
                        row["b1_common_prefix"] = _common_prefix(row["b1_tokens"], ref["b1_tokens"])
                        row["same_batch_texts"] = sum(a == b for a, b in zip(row["batch_texts"],
                                                                               ref["batch_texts"], strict=True))
                        row["b1_speed_vs_single"] = row["b1_tok_s"] / ref["b1_tok_s"]
                        row["batch_speed_vs_single"] = row["batch_tok_s"] / ref["batch_tok_s"]
                    print(f"  params/dev {row['params_bytes_per_device_max'] / 1e6:.2f} MB of "
                          f"{row['params_bytes'] / 1e6:.2f}; KV/dev {row['kv_cache_bytes_per_device_max'] / 1e6:.2f} MB"
                          f"; b1 {row['b1_tok_s']:.1f} tok/s; batch {row['batch_tok_s']:.1f} tok/s; "
                          f"{row['row_s']:.1f} s", flush=True)
                else:
                    print(f"  {row['status']}", flush=True)
                rows.append(row)
    return rows, info


def _common_prefix(a, b) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def format_table(rows: list[dict], c) -> str:
    head = ("| model | mesh (data x model) | devices | params MB total | params MB / dev | KV MB total | KV MB / dev "
            f"| b1 tok/s | vs single | batch {c.batch} tok/s | vs single | b1 tokens = single | batch texts = single |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['model']} | {r['mesh']} | | {r['status']} |" + " |" * 9)
            continue

        def ratio(k, r=r):
            return f"{r[k]:.2f}x" if k in r else "-"

        same = "-" if "same_b1_tokens" not in r else (
            "yes" if r["same_b1_tokens"] else f"no (first {r['b1_common_prefix']} equal)")
        lines.append(
            f"| {r['model']} | {r['mesh']} | {r['devices']} | {r['params_bytes'] / 1e6:.2f} "
            f"| {r['params_bytes_per_device_max'] / 1e6:.2f} | {r['kv_cache_bytes'] / 1e6:.2f} "
            f"| {r['kv_cache_bytes_per_device_max'] / 1e6:.2f} | {r['b1_tok_s']:.1f} | {ratio('b1_speed_vs_single')} "
            f"| {r['batch_tok_s']:.1f} | {ratio('batch_speed_vs_single')} | {same} "
            f"| {r.get('same_batch_texts', '-')}/{c.batch} |")
    return "\n".join(lines)


def main(argv):
    del argv
    c = _CONFIG.value
    t0 = time.perf_counter()
    machine = _machine(c)
    rows, info = main_rows(c)
    try:
        load_end = os.getloadavg()
    except OSError:
        load_end = None
    machine["load_average_1_5_15_at_end"] = load_end
    import jax

    # Set by the first JaxBackend (ruvllm_jax.compilation_cache): a warm cache shortens first_call_s only.
    machine["compilation_cache_dir"] = jax.config.jax_compilation_cache_dir
    table = format_table(rows, c)
    print()
    print(table)
    out = {"machine": machine, "run": {**info, "total_s": time.perf_counter() - t0}, "notes": NOTES,
           "config": c.to_dict(), "table": table,
           "results": [{k: v for k, v in r.items() if k not in ("b1_tokens", "batch_texts")} for r in rows]}
    os.makedirs(os.path.dirname(c.output) or ".", exist_ok=True)
    with open(c.output, "w") as f:
        json.dump(out, f, indent=1)
    print(f"\nwrote {c.output} ({out['run']['total_s']:.0f} s)")


if __name__ == "__main__":
    # Defined here, not at import: tests import experiment modules into one process.
    _CONFIG = config_flags.DEFINE_config_file("config", "configs/bench_sharding.py", "Benchmark config.")
    app.run(main)
