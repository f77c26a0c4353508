"""SONA's costs and one behaviour check, on the embedded model, side by side in one run.

    python experiments/bench_sona.py --config=configs/bench_sona.py

0. `bucket_ab`: the instant step's padding, power-of-two buckets against multiples of 32, in one run.
1. `instant_adapt` latency (median, p99) against response length, with the gradient through all
   layers and through the last layer only (`SonaLlmConfig.instant_layers=1`), and what the last-layer
   gradient costs in gain (one instant-only pass over the study's passages, held-out perplexity).
2. Serving throughput with learning off (no adapters), adapters attached, and learning on (every
   response fed back through `instant_adapt`, background consolidation every 10).
3. Preference: reward one of two candidate responses and penalise the other; their log-prob gap must
   move the right way in every trial.

Prints tables and writes JSON (`--config.output`).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time

import numpy as np
from absl import app
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from continual_data import SHAKESPEARE, heldout_ids, passages, perplexity  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/bench_sona.py", "Benchmark config.")


def _words(tok, n: int, offset: int = 0) -> str:
    """A text of exactly `n` tokens (Alice in Wonderland prose) for the tokenizer `tok`."""
    from continual_data import parts

    ids = tok.encode(parts("alice")[0], add_special_tokens=False)
    ids = ids.ids if hasattr(ids, "ids") else ids
    return tok.decode(ids[offset:offset + n])


def latency(backend, c) -> list[dict]:
    from ruvllm_jax.sona import SonaLlm, SonaLlmConfig

    tok = backend.tokenizer()
    rows = []
    for layers in (None, 1):
        sona = SonaLlm(SonaLlmConfig(instant_layers=layers, instant_optimizer="adam", instant_lr=1e-4,
                                     fisher_samples=0), backend=backend)
        for n in c.response_lengths:
            request = _words(tok, c.request_tokens)
            response = _words(tok, n, offset=1000)
            times = []
            for i in range(c.warmup + c.repeats):
                r = sona.instant_adapt(request, response, 0.9)
                if i >= c.warmup:
                    times.append(r.latency_us / 1e3)
            rows.append({"gradient through": "all layers" if layers is None else f"last {layers} layer",
                         "response tokens": n, "request tokens": c.request_tokens,
                         "median_ms": statistics.median(times), "p99_ms": float(np.percentile(times, 99)),
                         "repeats": len(times)})
            print(f"  instant_adapt, {rows[-1]['gradient through']}, {n} tokens: median "
                  f"{rows[-1]['median_ms']:.1f} ms, p99 {rows[-1]['p99_ms']:.1f} ms", flush=True)
    return rows


def bucket_ab(backend, c) -> list[dict]:
    """Padding before/after in one process, alternating: power-of-two buckets (the old `encode`) against
    multiples of 32 (`sona_llm.BUCKET_STEP`), all-layer gradient, medians of `c.ab_rounds` rounds."""
    from ruvllm_jax.sona import SonaLlm, SonaLlmConfig, sona_llm

    tok = backend.tokenizer()
    request = _words(tok, c.request_tokens)
    step0, res = sona_llm.BUCKET_STEP, {}
    try:
        for _ in range(c.ab_rounds):
            for name, step in (("power of two", 10 ** 9), ("multiple of 32", 32)):
                sona_llm.BUCKET_STEP = step
                sona = SonaLlm(SonaLlmConfig(instant_optimizer="adam", instant_lr=1e-4, fisher_samples=0),
                               backend=backend)
                for n in c.response_lengths[1:]:
                    response = _words(tok, n, offset=1000)
                    ts = [sona.instant_adapt(request, response, 0.9).latency_us / 1e3
                          for _ in range(c.warmup + 10)][c.warmup:]
                    res.setdefault((name, n), []).append(statistics.median(ts))
    finally:
        sona_llm.BUCKET_STEP = step0
    rows = [{"padding": name, "response tokens": n, "median_ms": statistics.median(v), "rounds_ms": v}
            for (name, n), v in sorted(res.items(), key=lambda kv: (kv[0][1], kv[0][0] != "power of two"))]
    for r in rows:
        print(f"  padding {r['padding']}, {r['response tokens']} tokens: median {r['median_ms']:.1f} ms", flush=True)
    return rows


def layer_gain(backend, c) -> list[dict]:
    """Instant-only learning over the study's passages: all layers vs the last layer."""
    from ruvllm_jax.sona import SonaLlm, SonaLlmConfig
    from ruvllm_jax.training import bpe

    tok = bpe.load_tokenizer(backend.model_info().path)
    ps = passages("alice", tok, c.n_train, seed=0)
    evals = {"alice": heldout_ids("alice", tok, c.eval_tokens), SHAKESPEARE: heldout_ids(SHAKESPEARE, tok,
                                                                                          c.eval_tokens)}
    base = {k: perplexity(backend.params, backend.config, ids) for k, ids in evals.items()}
    rows = []
    for layers in (None, 1):
        sona = SonaLlm(SonaLlmConfig(instant_layers=layers, instant_optimizer="adam", instant_lr=c.gain_lr,
                                     fisher_samples=0), backend=backend)
        t0 = time.perf_counter()
        for p in ps:
            sona.instant_adapt(p.request, p.response, 0.9)
        seconds = time.perf_counter() - t0
        after = {k: perplexity(backend.params, backend.config, ids, sona.adapters) for k, ids in evals.items()}
        rows.append({"gradient through": "all layers" if layers is None else f"last {layers} layer",
                     "instant_lr": c.gain_lr, "passages": len(ps),
                     "gain_pct": 100 * (1 - after["alice"] / base["alice"]),
                     "forgetting_pct": 100 * (after[SHAKESPEARE] / base[SHAKESPEARE] - 1),
                     "ms_per_passage": 1e3 * seconds / len(ps)})
        print(f"  instant only, {rows[-1]['gradient through']}: gain {rows[-1]['gain_pct']:.1f} %, forgetting "
              f"{rows[-1]['forgetting_pct']:.2f} %, {rows[-1]['ms_per_passage']:.1f} ms/passage", flush=True)
    return rows


def serving(backend, c) -> list[dict]:
    from ruvllm_jax.sona import SonaLlm, SonaLlmConfig
    from ruvllm_jax.types import GenerateParams

    tok = backend.tokenizer()
    prompts = [_words(tok, 24, offset=200 * i) for i in range(c.requests)]
    gp = GenerateParams(max_tokens=c.new_tokens, temperature=0.0)
    rows = []

    def run(mode: str):
        sona = None
        if mode == "off":
            backend.detach_adapters()
        else:
            sona = SonaLlm(SonaLlmConfig(instant_optimizer="adam", instant_lr=1e-4, fisher_samples=0,
                                         background_interval_ms=0, background_min_samples=10,
                                         consolidation_strategy="Average"), backend=backend)
        generated = 0
        t0 = time.perf_counter()
        for p in prompts:
            text = backend.generate(p, gp)
            generated += len(tok.encode(text, add_special_tokens=False))
            if mode == "learning on" and text:
                sona.instant_adapt(p, text, 0.9)
                sona.maybe_background()
        return generated, time.perf_counter() - t0

    modes = ("off", "adapters attached", "learning on")
    for mode in modes:
        run(mode)  # warm: compiles every shape once
    times, generated = {m: [] for m in modes}, {}
    for _ in range(c.serving_repeats):  # modes alternate, so each sees the same machine load
        for mode in modes:
            generated[mode], seconds = run(mode)
            times[mode].append(seconds)
    for mode in modes:
        s = statistics.median(times[mode])
        rows.append({"mode": mode, "requests": len(prompts), "tokens": generated[mode], "seconds": s,
                     "tok_per_s": generated[mode] / s})
        print(f"  serving, {mode}: {generated[mode] / s:.0f} tok/s ({generated[mode]} tokens, {s:.2f} s)",
              flush=True)
    backend.detach_adapters()
    return rows


def preference(backend, c) -> dict:
    from ruvllm_jax.sona import SonaLlm, SonaLlmConfig
    from ruvllm_jax.sona import functional as F

    tok = backend.tokenizer()
    sona = SonaLlm(SonaLlmConfig(instant_optimizer="adam", instant_lr=1e-3, fisher_samples=0), backend=backend)
    trials = []
    for t in range(c.preference_trials):
        sona.reset()
        request = _words(tok, 24, offset=3000 + 500 * t)
        good, bad = _words(tok, 32, offset=3024 + 500 * t), _words(tok, 32, offset=20000 + 500 * t)

        def gap(request=request, good=good, bad=bad):
            lp = []
            for r in (good, bad):
                tokens, weights = sona.encode(request, r)
                lp.append(float(F.served_logprob(sona.state, backend.params, tokens[None], weights[None],
                                                 cfg=backend.config)[0]))
            return lp[0] - lp[1]

        before = gap()
        for _ in range(c.preference_steps):
            sona.instant_adapt(request, good, 1.0)
            sona.instant_adapt(request, bad, 0.0)
        after = gap()
        trials.append({"gap_before": before, "gap_after": after, "right_way": after > before})
    ok = sum(t["right_way"] for t in trials)
    print(f"  preference: the gap moved the right way in {ok} of {len(trials)} trials "
          f"(mean change {statistics.mean(t['gap_after'] - t['gap_before'] for t in trials):+.3f} nats/token)")
    return {"trials": trials, "right_way": ok, "of": len(trials), "steps_per_trial": c.preference_steps}


def markdown(rows: list[dict]) -> str:
    keys = list(rows[0])
    fmt = lambda v: f"{v:.2f}" if isinstance(v, float) else str(v)  # noqa: E731
    return "\n".join([f"| {' | '.join(keys)} |", f"|{'---|' * len(keys)}",
                      *[f"| {' | '.join(fmt(r[k]) for k in keys)} |" for r in rows]])


def main(argv):
    del argv
    import jax

    from ruvllm_jax import JaxBackend

    c = _CONFIG.value
    backend = JaxBackend()
    backend.load_model(c.model or None)
    out = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "jax": jax.__version__,
                       "device": str(jax.devices()[0])}, "config": c.to_dict()}
    parts = [p.strip() for p in c.parts.split(",") if p.strip()]
    if "latency" in parts:
        out["instant_latency"] = latency(backend, c)
        print(markdown(out["instant_latency"]))
    if "bucket_ab" in parts:
        out["bucket_ab"] = bucket_ab(backend, c)
        print(markdown([{k: v for k, v in r.items() if k != "rounds_ms"} for r in out["bucket_ab"]]))
    if "layer_gain" in parts:
        out["instant_layer_gain"] = layer_gain(backend, c)
        print(markdown(out["instant_layer_gain"]))
    if "serving" in parts:
        out["serving"] = serving(backend, c)
        print(markdown(out["serving"]))
    if "preference" in parts:
        out["preference"] = preference(backend, c)
    os.makedirs(os.path.dirname(c.output), exist_ok=True)
    if c.merge and os.path.isfile(c.output):  # keep the parts this run did not redo
        with open(c.output, encoding="utf-8") as f:
            out = {**json.load(f), **out}
    with open(c.output, "w", encoding="utf-8") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {c.output}")


if __name__ == "__main__":
    app.run(main)
