"""Decode throughput of ruvllm_jax against transformers on the same model, in one run.

    python experiments/bench_decode.py --config=configs/bench_decode.py
    python experiments/bench_decode.py --config=configs/bench_decode.py --config.models=embedded

For each model: prefill latency of a `prompt_tokens` prompt and greedy decode tokens/s (batch 1,
median of `repeats` after a warm-up), for ruvllm_jax and transformers (torch CPU, float32). Prints a
table and writes JSON. Random weights are fine for speed: the work per token does not depend on them.
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


def bench_ruvllm(folder: str, prompt_ids: list[int], new_tokens: int, repeats: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from ruvllm_jax.backend import JaxBackend, engine
    from ruvllm_jax.backend.sampling import SamplingParams
    from ruvllm_jax.types import GenerateParams, ModelConfig

    backend = JaxBackend.new()
    backend.load_model(folder, ModelConfig(max_context=max(1024, len(prompt_ids) + new_tokens)))
    params, cfg = backend.params, backend.config
    greedy = GenerateParams(max_tokens=new_tokens, temperature=0.0, repetition_penalty=1.0)
    sampling = SamplingParams.from_generate_params(greedy)
    bucket, cache_len = engine.buckets(len(prompt_ids), new_tokens, backend.max_context())
    tokens = np.zeros((1, bucket), np.int32)
    tokens[0, : len(prompt_ids)] = prompt_ids
    no_eos = jnp.asarray([-1], jnp.int32)  # decode the full count, as transformers does with min_new_tokens
    # The one-slot engine JaxBackend.generate runs (contiguous cache, segmented decode chunks).
    eng = engine.Engine(cfg, engine.EngineConfig(max_slots=1, layout="contiguous", max_len=cache_len,
                                                 chunk=backend.decode_chunk_size))
    rows = SamplingParams.stack([sampling])
    presence = np.zeros((1, cfg.vocab_size), np.bool_)
    presence[0, prompt_ids] = True

    def prefill():
        st = eng.prefill(params, eng.init_decode_state(), [0], tokens, [len(prompt_ids)], sampling=rows,
                         rngs=jnp.stack([engine.make_rng(0)]), max_tokens=[new_tokens], eos_ids=no_eos,
                         presence=presence)
        return jax.block_until_ready(st)

    def generate():
        st = prefill()
        produced = 1
        while produced < new_tokens:
            st, _, count = eng.generate(params, st, eos_ids=no_eos, limit=new_tokens - produced)
            produced += int(count)
        return produced

    prefill_s = _median_time(prefill, repeats)
    total_s = _median_time(generate, repeats)
    decode_s = max(total_s - prefill_s, 1e-9)
    return {"prefill_ms": prefill_s * 1e3, "decode_tok_s": (new_tokens - 1) / decode_s, "total_s": total_s,
            "jax": jax.__version__, "device": str(jax.devices()[0])}


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


def qwen_shape_model(c, tmp: str):
    import torch
    import transformers as tf

    torch.manual_seed(c.seed)
    cfg = tf.Qwen2Config(**c.qwen.to_dict())
    model = tf.Qwen2ForCausalLM(cfg).eval().float()
    model.save_pretrained(tmp)
    return model


def embedded_model():
    import transformers as tf

    from ruvllm_jax.backend.jax_backend import default_model_path

    path = default_model_path()
    return tf.AutoModelForCausalLM.from_pretrained(path, dtype="float32").eval(), path


def main(argv):
    del argv
    c = _CONFIG.value
    import numpy as np

    rows = []
    for name in [m.strip() for m in c.models.split(",") if m.strip()]:
        with tempfile.TemporaryDirectory() as tmp:
            if name == "qwen_shape":
                model, folder, new_tokens = qwen_shape_model(c, tmp), tmp, c.new_tokens
            elif name == "embedded":
                (model, folder), new_tokens = embedded_model(), c.embedded_new_tokens
            else:
                raise app.UsageError(f"unknown model {name!r}; expected qwen_shape or embedded")
            vocab = model.config.vocab_size
            prompt = np.random.default_rng(c.seed).integers(3, vocab, c.prompt_tokens).tolist()
            result = {"model": name, "prompt_tokens": c.prompt_tokens, "new_tokens": new_tokens}
            result["ruvllm_jax"] = bench_ruvllm(folder, prompt, new_tokens, c.repeats)
            if c.run_transformers:
                result["transformers"] = bench_transformers(model, prompt, new_tokens, c.repeats, c.threads)
                result["decode_speedup"] = result["ruvllm_jax"]["decode_tok_s"] / result["transformers"]["decode_tok_s"]
                result["prefill_speedup"] = result["transformers"]["prefill_ms"] / result["ruvllm_jax"]["prefill_ms"]
            del model
            rows.append(result)

    print(f"\n{'model':12s} {'engine':14s} {'prefill ms':>11s} {'decode tok/s':>13s}")
    for r in rows:
        for eng in ("ruvllm_jax", "transformers"):
            if eng in r:
                print(f"{r['model']:12s} {eng:14s} {r[eng]['prefill_ms']:11.1f} {r[eng]['decode_tok_s']:13.1f}")
        if "decode_speedup" in r:
            print(f"{r['model']:12s} {'ratio':14s} {r['prefill_speedup']:10.2f}x {r['decode_speedup']:12.2f}x")
    out = {"machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count()},
           "config": c.to_dict(), "results": rows}
    os.makedirs(os.path.dirname(c.output) or ".", exist_ok=True)
    with open(c.output, "w") as f:
        json.dump(out, f, indent=2)
    print(f"\nwrote {c.output}")


if __name__ == "__main__":
    # Defined here, not at import: other experiments import this module (`qwen_shape_model`), and a
    # second definition of the flag would raise DuplicateFlagError.
    _CONFIG = config_flags.DEFINE_config_file("config", "configs/bench_decode.py", "Benchmark config.")
    app.run(main)
