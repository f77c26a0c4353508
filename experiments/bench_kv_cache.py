"""Decode speed with the two-tier quantized KV cache against the contiguous cache, in one run.

    python experiments/bench_kv_cache.py --config=configs/bench_kv_cache.py
    python experiments/bench_kv_cache.py --config=configs/bench_kv_cache.py --config.smoke=True

For each model (the embedded one; random weights with the Qwen2.5-0.5B dimensions of
configs/bench_decode.py) and each cache (contiguous FP32, `kv_cache_config=None`; two-tier with an
FP16 tail and a Q8 or Q4 store), one greedy request of `new_tokens` after a prompt of
`context - new_tokens` random tokens, through the engine as `JaxBackend` drives it: the cache from
`engine.new_cache` (sized as `JaxBackend._token_stream` sizes it), `engine.prefill_and_sample`, then
`engine.decode_chunk` until `new_tokens` are out (EOS disabled). The prefill runs once per cache; each
timed repetition decodes from a copy of its state (the copy is not timed). Repetitions are
interleaved, every cache once per round in a rotated order, so a change of machine speed (the
machine is shared) hits every cache alike; the table shows median tokens/s and the median of the
same-round ratios to the contiguous cache. Random weights are fine for speed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from kv_cache_quality import resolve  # noqa: E402  (sibling script: smoke overrides, the same rule)
from ml_collections import config_flags

from ruvllm_jax.backend import engine
from ruvllm_jax.backend.sampling import SamplingParams
from ruvllm_jax.models import llama
from ruvllm_jax.models.config import LlamaConfig
from ruvllm_jax.types import GenerateParams, KvCacheConfig, Precision

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONTIGUOUS = "contiguous FP32"


def qwen_shape(seed: int):
    """(params, cfg): random weights with the Qwen2.5-0.5B dimensions bench_decode uses."""
    spec = importlib.util.spec_from_file_location("bench_decode_config", os.path.join(REPO, "configs",
                                                                                      "bench_decode.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = LlamaConfig.from_hf_dict({**module.get_config().qwen.to_dict(), "model_type": "qwen2"})
    return llama.init_params(cfg, jax.random.key(seed)), cfg


def embedded():
    from ruvllm_jax import JaxBackend

    backend = JaxBackend()
    backend.load_model()
    return backend.params, backend.config


def variants(c, tail: int, context: int) -> list[tuple[str, object]]:
    out = [(CONTIGUOUS, None)]
    for store in [s.strip() for s in c.stores.split(",") if s.strip()]:
        kv = KvCacheConfig(tail_length=tail, store_precision=Precision[store], max_tokens=context,
                           migration_batch=min(tail, 64))
        out.append((f"two-tier {store} (tail {tail} FP16)", kv))
    return out


def bench_model(name: str, params, cfg, c, context: int, tail: int, repeats: int) -> dict:
    new = c.new_tokens
    prompt_len = context - new
    rng = np.random.default_rng(c.seed)
    prompt = rng.integers(3, cfg.vocab_size, prompt_len)
    bucket, cache_len = engine.buckets(prompt_len, new, context)
    tokens = np.zeros((1, bucket), np.int32)
    tokens[0, :prompt_len] = prompt
    tokens, lengths = jnp.asarray(tokens), jnp.asarray([prompt_len], jnp.int32)
    sampling = SamplingParams.from_generate_params(GenerateParams(max_tokens=new, temperature=0.0,
                                                                  repetition_penalty=1.0))
    no_eos = jnp.asarray([-1], jnp.int32)  # every requested token is decoded

    def decode(state):
        produced, out = 1, []
        while produced < new:
            state, toks, count = engine.decode_chunk(params, state, sampling, no_eos, jnp.int32(new - produced),
                                                     cfg=cfg, chunk=c.chunk)
            out.append(np.asarray(toks[0, :int(count)]))
            produced += len(out[-1])
        return np.concatenate(out), state

    states, rows = {}, {}
    for vname, kv in variants(c, tail, context):
        cache = engine.new_cache(cfg, 1, cache_len if kv is None else prompt_len + new, kv_cache_config=kv)
        nbytes = cache.nbytes()
        t0 = time.perf_counter()
        state = jax.block_until_ready(engine.prefill_and_sample(params, tokens, lengths, cache, sampling,
                                                                engine.make_rng(c.seed), no_eos, cfg=cfg))
        prefill_s = time.perf_counter() - t0
        states[vname] = state
        warm = jax.tree_util.tree_map(lambda x: x.copy(), state)
        t0 = time.perf_counter()
        out, _ = decode(warm)  # warm-up: compiles
        rows[vname] = {"cache": vname, "kv_cache_config": None if kv is None else {
            k: (v.name if isinstance(v, Precision) else v) for k, v in kv.__dict__.items()},
            "cache_bytes": int(nbytes), "prefill_s_with_compile": prefill_s,
            "first_decode_s_with_compile": time.perf_counter() - t0, "tokens": [int(state.token[0]), *out.tolist()],
            "times_s": []}
        print(f"  {name} {vname}: cache {nbytes / 2**20:.2f} MiB, prefill {prefill_s:.1f}s (compile included)",
              flush=True)
    names = list(rows)
    for r in range(repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for vname in order:
            st = jax.block_until_ready(jax.tree_util.tree_map(lambda x: x.copy(), states[vname]))
            t0 = time.perf_counter()
            decode(st)
            rows[vname]["times_s"].append(time.perf_counter() - t0)
    steps = new - 1
    base = rows[CONTIGUOUS]
    for row in rows.values():
        tok_s = [steps / t for t in row["times_s"]]
        row["decode_tok_s"] = tok_s
        row["median_tok_s"] = statistics.median(tok_s)
        row["same_round_ratios"] = [a / b for a, b in zip(tok_s, [steps / t for t in base["times_s"]], strict=True)]
        row["median_ratio_vs_contiguous"] = statistics.median(row["same_round_ratios"])
        row["same_tokens_as_contiguous"] = row["tokens"] == base["tokens"]
        row["first_divergence"] = next((i for i, (a, b) in enumerate(zip(row["tokens"], base["tokens"], strict=True))
                                        if a != b), None)
    return {"model": name, "context": context, "prompt_tokens": prompt_len, "new_tokens": new, "decode_steps": steps,
            "tail": tail, "repeats": repeats, "cache_len_contiguous": cache_len, "variants": list(rows.values())}


def markdown_table(results: list[dict]) -> str:
    lines = ["| model | context | cache | cache MiB | decode tok/s (median) | vs contiguous (same-round median) "
             "| min–max tok/s |", "|---|---:|---|---:|---:|---:|---:|"]
    for m in results:
        for v in m["variants"]:
            lines.append(f"| {m['model']} | {m['context']} | {v['cache']} | {v['cache_bytes'] / 2**20:.2f} | "
                         f"{v['median_tok_s']:.1f} | {v['median_ratio_vs_contiguous']:.2f}x | "
                         f"{min(v['decode_tok_s']):.1f}–{max(v['decode_tok_s']):.1f} |")
    return "\n".join(lines)


def run(c) -> dict:
    c = resolve(c)
    results = []
    for name in [m.strip() for m in c.models.split(",") if m.strip()]:
        if name == "embedded":
            params, cfg = embedded()
            context, tail, repeats = c.embedded_context, c.embedded_tail, c.embedded_repeats
        elif name == "qwen_shape":
            params, cfg = qwen_shape(c.seed)
            context, tail, repeats = c.qwen_context, c.qwen_tail, c.qwen_repeats
        else:
            raise app.UsageError(f"unknown model {name!r}; expected embedded or qwen_shape")
        print(f"{name}: context {context}, {c.new_tokens} new tokens, {repeats} interleaved repetitions", flush=True)
        results.append(bench_model(name, params, cfg, c, context, tail, repeats))
        del params
    print()
    print(markdown_table(results))
    out = {"machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                       "jax": jax.__version__, "device": str(jax.devices()[0])},
           "config": c.to_dict(), "results": results}
    os.makedirs(os.path.dirname(c.output) or ".", exist_ok=True)
    with open(c.output, "w", encoding="utf-8") as f:
        json.dump(out, f, indent=1)
    print(f"\nwrote {c.output}")
    return out


def main(argv):
    del argv
    run(_CONFIG.value)


if __name__ == "__main__":
    # Defined here, not at import: tests import several study modules into one process.
    _CONFIG = config_flags.DEFINE_config_file("config", "configs/bench_kv_cache.py", "Benchmark config.")
    app.run(main)
