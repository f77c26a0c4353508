"""Batched-decode throughput: ruvllm_jax's continuous-batching engine vs transformers' batched generate.

    python experiments/bench_batch.py --config=configs/bench_batch.py
    python experiments/bench_batch.py --config=configs/bench_batch.py --config.models=embedded
    python experiments/bench_batch.py --config.models=qwen_0.5b --config.batch_sizes=1,8

For each model and batch size B: B random prompts (prompt i has `prompt_tokens - i % 4` tokens when
`ragged`, so the batch is ragged), greedy, EOS off, every request decoding exactly `new_tokens`.
Every engine gets `warmups` untimed runs, then the median of `repeats` timed ones.

- ruvllm_jax: one paged `ServingEngine` per B (`EngineConfig(max_slots=B, max_len=next pow2 >= prompt +
  new, chunk)`). A run adds the B requests, then `step(limit=0)` admits them all (B one-prompt
  prefills, each sampling its first token; no decode step) and is timed as the prefill; `run()`
  decodes the rest and is timed as the decode. tok/s = B * new_tokens / (prefill + decode);
  decode tok/s = B * (new_tokens - 1) / decode.
- ruvllm_jax single-sequence path (batch 1 only): `JaxBackend.generate_tokens` (contiguous cache).
- transformers (torch CPU, float32, `threads` threads): the same weights via
  `AutoModelForCausalLM.from_pretrained`, the same B prompts LEFT-padded with an attention mask,
  `generate(do_sample=False, max_new_tokens=new, min_new_tokens=new)`.
  tok/s = B * new_tokens / time; "same/B" counts sequences whose greedy tokens equal ruvllm_jax's.

Random weights are fine for speed: the work per token does not depend on them. `main_rows(config)`
returns the rows without printing or writing (a tiny config makes it a smoke test).
"""

from __future__ import annotations

import gc
import json
import os
import platform
import statistics
import tempfile
import time

from absl import app
from ml_collections import config_flags

MODELS = ("embedded", "qwen_0.5b")


def _ints(spec) -> list[int]:
    if isinstance(spec, int):
        return [spec]
    if isinstance(spec, str):
        spec = spec.split(",")
    return [int(s) for s in spec if str(s).strip()]


def _names(spec) -> list[str]:
    names = [m.strip() for m in spec.split(",") if m.strip()] if isinstance(spec, str) else list(spec)
    for name in names:
        if name not in MODELS:
            raise ValueError(f"unknown model {name!r}; expected one of {MODELS}")
    return names


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def make_prompts(vocab: int, batch: int, prompt_tokens: int, ragged: bool, seed: int) -> list[list[int]]:
    """`batch` random prompts; prompt i has prompt_tokens - i % 4 tokens when ragged. Prompt i is the
    same for every batch size (one generator, drawn in order)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    lengths = [prompt_tokens - (i % 4 if ragged else 0) for i in range(batch)]
    if min(lengths) < 1:
        raise ValueError(f"prompt_tokens={prompt_tokens} is too short for a ragged batch (needs >= 4)")
    return [rng.integers(3, vocab, n).tolist() for n in lengths]


def bench_ruvllm_engine(backend, prompts: list[list[int]], new_tokens: int, repeats: int, c) -> dict:
    """The paged continuous-batching engine on B = len(prompts) requests at once."""
    from ruvllm_jax.backend.engine import EngineConfig
    from ruvllm_jax.types import GenerateParams

    b = len(prompts)
    max_len = _next_pow2(max(len(p) for p in prompts) + new_tokens)
    config = EngineConfig(max_slots=b, max_len=max_len, chunk=c.chunk, block_size=c.block_size,
                          num_blocks=c.num_blocks or None)
    server = backend.serving_engine(config)
    params = GenerateParams(max_tokens=new_tokens, temperature=0.0, repetition_penalty=1.0, seed=0)

    def once():
        ids = [server.add_request(p, params) for p in prompts]
        got = {i: [] for i in ids}
        t0 = time.perf_counter()
        for o in server.step(limit=0):  # admits every request (max_slots = B): prefill + first token each
            got[o.request_id].extend(o.tokens)
        t1 = time.perf_counter()
        for rid, toks in server.run().items():
            got[rid].extend(toks)
        t2 = time.perf_counter()
        tokens = [got[i] for i in ids]
        if any(len(t) != new_tokens for t in tokens):
            raise RuntimeError(f"expected {new_tokens} tokens per request, got {[len(t) for t in tokens]}")
        return t1 - t0, t2 - t1, tokens

    for _ in range(c.warmups):  # compiles; see `warmups` in configs/bench_batch.py for why two
        once()
    runs = [once() for _ in range(repeats)]
    prefill_s = statistics.median(r[0] for r in runs)
    decode_s = statistics.median(r[1] for r in runs)
    total_s = statistics.median(r[0] + r[1] for r in runs)
    return {"tok_s": b * new_tokens / total_s, "decode_tok_s": b * (new_tokens - 1) / max(decode_s, 1e-9),
            "prefill_ms": prefill_s * 1e3, "total_s": total_s, "max_len": max_len,
            "engine": {"max_slots": b, "max_len": max_len, "chunk": c.chunk, "block_size": c.block_size,
                       "pool_blocks": config.pool_blocks},
            "tokens": runs[-1][2]}


def bench_ruvllm_single(backend, prompt: list[int], new_tokens: int, repeats: int, warmups: int = 1) -> dict:
    """`JaxBackend.generate_tokens`: the one-sequence contiguous-cache path."""
    from ruvllm_jax.types import GenerateParams

    params = GenerateParams(max_tokens=new_tokens, temperature=0.0, repetition_penalty=1.0, seed=0)
    for _ in range(warmups):
        backend.generate_tokens(prompt, params)
    times, tokens = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        tokens = backend.generate_tokens(prompt, params)
        times.append(time.perf_counter() - t0)
    if len(tokens) != new_tokens:
        raise RuntimeError(f"expected {new_tokens} tokens, got {len(tokens)}")
    total_s = statistics.median(times)
    return {"tok_s": new_tokens / total_s, "total_s": total_s, "tokens": tokens}


def bench_transformers(model, prompts: list[list[int]], new_tokens: int, repeats: int, threads: int,
                       warmups: int = 1) -> dict:
    """Batched greedy `generate`, prompts left-padded (pad id 0, masked)."""
    import torch

    torch.set_num_threads(threads)
    b, width = len(prompts), max(len(p) for p in prompts)
    ids = torch.zeros((b, width), dtype=torch.long)
    mask = torch.zeros((b, width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    kw = dict(do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)

    def gen():
        with torch.no_grad():
            return model.generate(input_ids=ids, attention_mask=mask, **kw)

    for _ in range(warmups):
        gen()
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = gen()
        times.append(time.perf_counter() - t0)
    total_s = statistics.median(times)
    return {"tok_s": b * new_tokens / total_s, "total_s": total_s, "tokens": out[:, width:].tolist()}


def _load_model(name: str, c, tmp: str):
    """-> (folder with the weights, new_tokens, repeats); the qwen shape is written to `tmp`."""
    if name == "embedded":
        from ruvllm_jax.backend.jax_backend import default_model_path

        return default_model_path(), c.embedded_new_tokens, c.embedded_repeats
    from bench_decode import qwen_shape_model  # a sibling script (experiments/ is on sys.path)

    model = qwen_shape_model(c, tmp)  # random Qwen2.5-0.5B-shaped weights, saved to tmp
    del model
    gc.collect()
    return tmp, c.qwen_new_tokens, c.qwen_repeats


def _agreement(a: list[list[int]], b: list[list[int]]) -> dict:
    """How far two engines' greedy tokens agree: identical sequences, and mean common-prefix length."""
    prefix = []
    for x, y in zip(a, b, strict=True):
        n = 0
        while n < min(len(x), len(y)) and x[n] == y[n]:
            n += 1
        prefix.append(n)
    return {"identical": sum(x == y for x, y in zip(a, b, strict=True)), "of": len(a),
            "mean_common_prefix": statistics.mean(prefix) if prefix else 0.0}


def main_rows(c) -> list[dict]:
    """Run every (model, batch size) of config `c` -> one row each (no printing, no files)."""
    import torch
    import transformers

    from ruvllm_jax.backend import JaxBackend
    from ruvllm_jax.types import ModelConfig

    batches = _ints(c.batch_sizes)
    rows = []
    for name in _names(c.models):
        with tempfile.TemporaryDirectory() as tmp:
            folder, new_tokens, repeats = _load_model(name, c, tmp)
            backend = JaxBackend.new()
            backend.load_model(folder, ModelConfig(max_context=max(1024, c.prompt_tokens + new_tokens)))
            backend.eos_token_ids = ()  # decode the full count, as transformers does with min_new_tokens
            vocab = backend.config.vocab_size
            prompts = make_prompts(vocab, max(batches), c.prompt_tokens, c.ragged, c.seed)
            model_rows = []
            for b in batches:
                r = bench_ruvllm_engine(backend, prompts[:b], new_tokens, repeats, c)
                row = {"model": name, "batch": b, "prompt_lens": [len(p) for p in prompts[:b]],
                       "new_tokens": new_tokens, "repeats": repeats, "ruvllm": r}
                if b == 1 and c.run_single:
                    s = bench_ruvllm_single(backend, prompts[0], new_tokens, repeats, c.warmups)
                    s["same_tokens_as_engine"] = s["tokens"] == r["tokens"][0]
                    row["ruvllm_single"] = s
                model_rows.append(row)
                print(f"  {name} B={b}: ruvllm {r['tok_s']:.1f} tok/s (decode {r['decode_tok_s']:.1f}, "
                      f"prefill {r['prefill_ms']:.1f} ms)", flush=True)
            device = str(backend.device())
            del backend
            gc.collect()

            if c.run_transformers:
                model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
                for row in model_rows:
                    t = bench_transformers(model, prompts[: row["batch"]], new_tokens, repeats, c.threads, c.warmups)
                    row["transformers"] = t
                    row["ratio_vs_transformers"] = row["ruvllm"]["tok_s"] / t["tok_s"]
                    row["agreement_vs_transformers"] = _agreement(row["ruvllm"]["tokens"], t["tokens"])
                    print(f"  {name} B={row['batch']}: transformers {t['tok_s']:.1f} tok/s", flush=True)
                del model
                gc.collect()

            base = next((r["ruvllm"]["tok_s"] for r in model_rows if r["batch"] == 1), None)
            for row in model_rows:
                row["device"] = device
                row["speedup_vs_batch1"] = row["ruvllm"]["tok_s"] / base if base else None
            rows.extend(model_rows)
    return rows


def format_table(rows: list[dict]) -> str:
    def num(x, fmt):
        return format(x, fmt) if x is not None else "-"

    head = (f"{'model':10s} {'batch':>5s} {'ruvllm tok/s':>12s} {'decode tok/s':>12s} {'prefill ms':>10s} "
            f"{'vs b1':>6s} {'hf tok/s':>9s} {'ruv/hf':>7s} {'same/B':>6s}")
    lines = [head, "-" * len(head)]
    for r in rows:
        t = r.get("transformers")
        agree = r.get("agreement_vs_transformers")
        lines.append(
            f"{r['model']:10s} {r['batch']:5d} {r['ruvllm']['tok_s']:12.1f} {r['ruvllm']['decode_tok_s']:12.1f} "
            f"{r['ruvllm']['prefill_ms']:10.1f} {num(r['speedup_vs_batch1'], '5.2f'):>5s}x "
            f"{num(t and t['tok_s'], '9.1f'):>9s} {num(r.get('ratio_vs_transformers'), '6.2f'):>6s}x "
            f"{(str(agree['identical']) + '/' + str(agree['of'])) if agree else '-':>6s}")
    for r in rows:
        if "ruvllm_single" in r:
            s = r["ruvllm_single"]
            lines.append(f"{r['model']:10s} generate_tokens (single-sequence path, batch 1): {s['tok_s']:.1f} tok/s"
                         f" ({'same' if s['same_tokens_as_engine'] else 'different'} tokens as the paged engine)")
    return "\n".join(lines)


def targets(rows: list[dict], c) -> list[str]:
    """PASS/FAIL lines for the qwen_0.5b targets (SKIP when a row is missing)."""
    b = c.target_batch
    row = next((r for r in rows if r["model"] == "qwen_0.5b" and r["batch"] == b), None)
    out = []
    sp = row and row["speedup_vs_batch1"]
    out.append(f"{'SKIP' if sp is None else 'PASS' if sp >= c.target_speedup else 'FAIL'}: qwen_0.5b batch {b} "
               f">= {c.target_speedup:g}x batch 1 throughput" + ("" if sp is None else f" ({sp:.2f}x)"))
    ratio = row and row.get("ratio_vs_transformers")
    out.append(f"{'SKIP' if ratio is None else 'PASS' if ratio > 1 else 'FAIL'}: qwen_0.5b ruvllm batch {b} > "
               f"transformers batch {b}" + ("" if ratio is None else f" ({ratio:.2f}x)"))
    return out


def _without_tokens(row: dict) -> dict:
    """The row for JSON: the generated token ids dropped (their agreement is kept)."""
    return {k: ({kk: vv for kk, vv in v.items() if kk != "tokens"} if isinstance(v, dict) else v)
            for k, v in row.items()}


def machine_info() -> dict:
    import jax
    import torch
    import transformers

    return {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
            "python": platform.python_version(), "jax": jax.__version__, "jax_device": str(jax.devices()[0]),
            "torch": torch.__version__, "transformers": transformers.__version__}


def main(argv):
    del argv
    c = _CONFIG.value
    rows = main_rows(c)
    print()
    print(format_table(rows))
    print()
    target_lines = targets(rows, c)
    print("\n".join(target_lines))
    out = {"machine": machine_info(), "config": c.to_dict(), "targets": target_lines,
           "results": [_without_tokens(r) for r in rows]}
    os.makedirs(os.path.dirname(c.output) or ".", exist_ok=True)
    with open(c.output, "w") as f:
        json.dump(out, f, indent=1)
    print(f"\nwrote {c.output}")


if __name__ == "__main__":
    # Defined here, not at import: tests import experiment modules into one process, and a second
    # definition of the flag would raise DuplicateFlagError.
    _CONFIG = config_flags.DEFINE_config_file("config", "configs/bench_batch.py", "Benchmark config.")
    app.run(main)
