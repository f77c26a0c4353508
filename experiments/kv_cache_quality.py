"""How much the two-tier quantized KV cache costs in perplexity, and what it saves in memory.

    python experiments/kv_cache_quality.py --config=configs/kv_cache_quality.py
    python experiments/kv_cache_quality.py --config=configs/kv_cache_quality.py --config.smoke=True

Perplexity is teacher-forced *through the cache*: one jitted `lax.scan` over a window's tokens calls
`llama.decode` once per token on the cache `engine.new_cache` builds, so every token's attention reads
the older tokens as the cache holds them (the store quantized, the tail in FP16), exactly as in
generation; the log-prob of the next token is collected at each step. Rows:

- `contiguous FP32`: the same scan on the exact contiguous cache (`kv_cache_config=None`), checked
  against `llama.forward` logits of the whole window (the scan reproduces the model);
- `FP32 store`: a two-tier cache with FP32 tail and store, an exactness check of the tier plumbing
  (it must equal the contiguous row to float rounding);
- `FP16 store`: FP16 tail and store, *the FP16 KV cache*: the reference every ratio is taken against
  (tail and store hold the same FP16 values, so its perplexity does not depend on the tail length);
- Q8 and Q4 stores (FP16 tail) for each tail length, with and without sink tokens;
- eviction rows: a Q4 cache of `eviction_max_tokens`, so older blocks are dropped inside a window.

Memory: each row's cache after a whole window (`two_tier.stats` per layer: tokens and real bytes per
tier, scales included), checked against the bytes per token the KIVI layout implies, and the same
for the Qwen2.5-0.5B KV shape at 4k and 32k tokens (allocated bytes from `jax.eval_shape`, held bytes
from the one-layer `TwoTierKvCache` filled with random keys/values). KIVI-2 (2-bit codes) is not
implemented: `Precision` has no 2-bit cache precision. Writes a table, JSON and a plot.
"""

from __future__ import annotations

import functools
import json
import math
import os
import platform
import sys
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from ml_collections import config_flags

from ruvllm_jax.backend import engine
from ruvllm_jax.cache import two_tier
from ruvllm_jax.models import llama
from ruvllm_jax.training import bpe, data
from ruvllm_jax.types import KvCacheConfig, Precision

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import continual_data  # noqa: E402  (sibling module: the cleaned Alice text, the Shakespeare split)

FP16_ROW = "FP16 store"  # the reference row of every ratio
BASELINE_ROW = "contiguous FP32"
EXACT_ROW = "FP32 store"
KIVI2_NOTE = "KIVI-2 (2-bit codes): not implemented; Precision has no 2-bit KV cache precision (Q8 and Q4 only)."


def resolve(c):
    """The config to run: `c` with `smoke_overrides` applied when `c.smoke` is set."""
    c = c.copy_and_resolve_references()
    if c.smoke:
        with c.unlocked():
            for k, v in c.smoke_overrides.items():
                c[k] = v
    return c


# --------------------------------------------------------------------------------------------------
# Data.


def text_ids(name: str, tok) -> np.ndarray:
    """Token ids of a named text: "alice" (cleaned, whole book) or "shakespeare" (validation split)."""
    if name == "alice":
        text = continual_data.clean(data.read_text(continual_data.DOMAINS["alice"]), continual_data.BODY_START["alice"])
    elif name == "shakespeare":
        text = continual_data.parts(continual_data.SHAKESPEARE)[1]
    else:
        raise ValueError(f"unknown text {name!r}; expected alice or shakespeare")
    return np.asarray(bpe.encode(tok, text), np.int32)


# --------------------------------------------------------------------------------------------------
# Variants.


def variants(c) -> list[dict]:
    """The rows: name, store, tail, sinks, and the KvCacheConfig (None: the contiguous cache)."""
    def two_tier_cfg(store: Precision, tail: int, sinks: int, *, tail_precision=Precision.FP16,
                     max_tokens: Optional[int] = None) -> KvCacheConfig:
        return KvCacheConfig(tail_length=tail, tail_precision=tail_precision, store_precision=store,
                             max_tokens=c.window if max_tokens is None else max_tokens,
                             migration_batch=min(tail, c.max_migration), num_sink_tokens=sinks)

    rows = [dict(name=BASELINE_ROW, store="contiguous FP32", tail=None, sinks=0, kv=None),
            dict(name=EXACT_ROW, store="FP32", tail=c.reference_tail, sinks=0,
                 kv=two_tier_cfg(Precision.FP32, c.reference_tail, 0, tail_precision=Precision.FP32)),
            dict(name=FP16_ROW, store="FP16", tail=c.reference_tail, sinks=0,
                 kv=two_tier_cfg(Precision.FP16, c.reference_tail, 0))]
    for store in [s.strip() for s in c.stores.split(",") if s.strip()]:
        for tail in c.tails:
            for sinks in c.sinks:
                name = f"{store} tail {tail}" + (f" + {sinks} sinks" if sinks else "")
                rows.append(dict(name=name, store=store, tail=tail, sinks=sinks,
                                 kv=two_tier_cfg(Precision[store], tail, sinks)))
    if c.eviction_max_tokens:
        for sinks in c.eviction_sinks:
            name = f"Q4 tail {c.reference_tail}" + (f" + {sinks} sinks" if sinks else "") + \
                f", max_tokens {c.eviction_max_tokens} (evicts)"
            rows.append(dict(name=name, store="Q4", tail=c.reference_tail, sinks=sinks, evicts=True,
                             kv=two_tier_cfg(Precision.Q4, c.reference_tail, sinks, max_tokens=c.eviction_max_tokens)))
    return rows


# --------------------------------------------------------------------------------------------------
# Teacher forcing through the cache.


@functools.partial(jax.jit, static_argnames=("cfg", "with_logits"))
def teacher_forced(params, cfg, tokens: jax.Array, cache, with_logits: bool = False):
    """Feed tokens [1, S] one at a time through `llama.decode` on `cache` (one `lax.scan`).

    Returns (log-probs [S - 1] of each next token, logits [S, V] or None, the cache after all S).
    """
    s = tokens.shape[1]

    def step(cache, i):
        logits, cache = llama.decode(params, cfg, tokens[:, i], jnp.full((1,), i, jnp.int32), cache)
        logp = jax.nn.log_softmax(logits[0].astype(jnp.float32))
        target = tokens[0, jnp.minimum(i + 1, s - 1)]
        return cache, (logp[target], logits[0] if with_logits else None)

    cache, (logps, logits) = jax.lax.scan(step, cache, jnp.arange(s, dtype=jnp.int32))
    return logps[:-1], logits, cache  # the last step predicts past the window


@functools.partial(jax.jit, static_argnames=("cfg",))
def forward_logits(params, cfg, tokens):
    return llama.forward(params, cfg, tokens)[0]


# --------------------------------------------------------------------------------------------------
# Memory.


def layout_bytes_per_token(precision: Precision, block: int, kvh: int, d: int) -> float:
    """Store bytes per token per layer the KIVI layout implies (codes + f16 scales/zeros), or FP."""
    if precision in (Precision.FP32, Precision.FP16, Precision.BF16):
        return 2 * kvh * d * (4 if precision is Precision.FP32 else 2)
    codes = 2 * kvh * d * (1 if precision is Precision.Q8 else 0.5)
    per_param = 1 if precision is Precision.Q8 else 2  # scale, (zero)
    key_scales = kvh * d * 2 * per_param / block  # per channel per block
    value_scales = kvh * 2 * per_param  # per token
    return codes + key_scales + value_scales


def cache_memory(cache, kv: Optional[KvCacheConfig], num_layers: int, kvh: int, d: int) -> dict:
    """Tokens and bytes of a model cache holding one sequence, summed over layers."""
    fp16_row = 2 * kvh * d * 2  # one token's keys and values in FP16, one layer
    if kv is None:
        return {"allocated_bytes": int(cache.nbytes()), "store_bytes_per_token_layer": None,
                "bytes_per_token_layer": cache.nbytes() / num_layers / cache.max_len,
                "compression_ratio_vs_fp16": fp16_row / (cache.nbytes() / num_layers / cache.max_len)}
    spec = cache.spec
    total = {k: 0 for k in ("total_tokens", "tail_tokens", "store_tokens", "sink_tokens", "tail_bytes", "store_bytes",
                            "sink_bytes", "evicted_tokens", "allocated_bytes")}
    for tiers in cache.layers:
        s = two_tier.stats(two_tier.TwoTierState(tiers, cache.length[0], spec))
        for k in total:
            total[k] += getattr(s, k)
    layers = len(cache.layers)
    out = {k: v // layers if k.endswith("tokens") else v for k, v in total.items()}
    held_bytes = total["tail_bytes"] + total["store_bytes"] + total["sink_bytes"]
    out["held_bytes"] = held_bytes
    out["allocated_bytes"] = int(cache.nbytes())
    stored = total["store_tokens"]
    out["store_bytes_per_token_layer"] = total["store_bytes"] / stored if stored else None
    out["layout_store_bytes_per_token_layer"] = layout_bytes_per_token(kv.store_precision, spec.block, kvh, d)
    spt = out["store_bytes_per_token_layer"]
    out["layout_matches_stats"] = spt is None or abs(spt - out["layout_store_bytes_per_token_layer"]) < 1e-9
    out["store_compression_ratio"] = fp16_row / out["store_bytes_per_token_layer"] if total["store_tokens"] else None
    out["compression_ratio_vs_fp16"] = out["total_tokens"] * layers * fp16_row / held_bytes if held_bytes else None
    return out


def qwen_memory(c) -> list[dict]:
    """KV memory of the Qwen2.5-0.5B shape at `c.qwen_tokens`: contiguous FP32 (what the engine
    allocates with kv_cache_config=None) and FP16, and two-tier Q8 / Q4 with max_tokens = the context."""
    from ruvllm_jax.cache import ContiguousKVCache

    layers, kvh, d = c.qwen_layers, c.qwen_kv_heads, c.qwen_head_dim
    fp16_bytes = lambda n: layers * 2 * kvh * d * 2 * n  # noqa: E731

    def shape_bytes(fn) -> int:
        return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(jax.eval_shape(fn)))

    rows = []
    for n in c.qwen_tokens:
        for dtype, name in ((jnp.float32, "contiguous FP32"), (jnp.float16, "contiguous FP16")):
            alloc = shape_bytes(lambda dtype=dtype, n=n: ContiguousKVCache.init(
                num_layers=layers, batch=1, num_kv_heads=kvh, head_dim=d, max_len=n, dtype=dtype))
            rows.append({"tokens": n, "cache": name, "allocated_bytes": alloc, "held_bytes": alloc,
                         "ratio_vs_fp16": fp16_bytes(n) / alloc})
        for store in (Precision.Q8, Precision.Q4):
            kv = KvCacheConfig(tail_length=c.qwen_tail, store_precision=store, max_tokens=n, num_kv_heads=kvh,
                               head_dim=d, migration_batch=min(64, c.qwen_tail))
            spec = two_tier.TwoTierSpec.from_config(kv)
            alloc = shape_bytes(lambda spec=spec: two_tier.TwoTierKVCache.init(spec, num_layers=layers, batch=1))
            one = two_tier.TwoTierKvCache(kv)  # one layer, filled with n random tokens: real held bytes
            rng = np.random.default_rng(c.seed)
            one.append(rng.standard_normal((n, kvh, d), np.float32), rng.standard_normal((n, kvh, d), np.float32))
            st = one.stats()
            held = layers * (st.tail_bytes + st.store_bytes + st.sink_bytes)
            rows.append({"tokens": n, "cache": f"two-tier {store.name} (tail {c.qwen_tail} FP16)",
                         "allocated_bytes": alloc, "held_bytes": held, "ratio_vs_fp16": fp16_bytes(n) / held,
                         "store_compression_ratio": st.store_compression_ratio,
                         "one_layer_stats": {k: getattr(st, k) for k in st.__dataclass_fields__}})
    return rows


# --------------------------------------------------------------------------------------------------
# The study.


def run(c) -> dict:
    """Run the study for a resolved config; returns (and writes) the results."""
    c = resolve(c)
    folder = c.model_path
    if not folder:
        from ruvllm_jax.assets import DEFAULT_MODEL_PATH

        folder = DEFAULT_MODEL_PATH
    from ruvllm_jax import JaxBackend

    backend = JaxBackend()
    backend.load_model(folder)
    params, cfg = backend.params, backend.config
    if c.window > cfg.max_position_embeddings:
        raise ValueError(f"window {c.window} exceeds the model's {cfg.max_position_embeddings} positions")
    tok = bpe.load_tokenizer(folder)
    texts = [t.strip() for t in c.texts.split(",") if t.strip()]
    windows = {t: data.fixed_windows(text_ids(t, tok), window=c.window, max_windows=c.windows_per_text) for t in texts}
    late = np.arange(1, c.window) >= c.late_from  # target positions 1..S-1

    rows, check = [], {"max_abs_logit_diff": 0.0, "max_abs_logprob_diff": 0.0}
    baseline_logps: dict = {}
    for var in variants(c):
        t0 = time.perf_counter()
        nll = {}
        cache = None
        for t, wins in windows.items():
            per_window = []
            for w, win in enumerate(wins):
                cache = engine.new_cache(cfg, 1, c.window, kv_cache_config=var["kv"])
                tokens = jnp.asarray(win[None])
                logps, logits, cache = teacher_forced(params, cfg, tokens, cache, with_logits=var["kv"] is None)
                logps = np.asarray(logps, np.float64)
                if var["kv"] is None:  # the baseline scan against the model's own forward
                    ref = forward_logits(params, cfg, tokens)
                    check["max_abs_logit_diff"] = max(check["max_abs_logit_diff"],
                                                      float(jnp.max(jnp.abs(logits - ref))))
                    ref_lp = jax.nn.log_softmax(ref[:-1], -1)[jnp.arange(c.window - 1), tokens[0, 1:]]
                    check["max_abs_logprob_diff"] = max(check["max_abs_logprob_diff"],
                                                        float(np.max(np.abs(np.asarray(ref_lp) - logps))))
                    baseline_logps[(t, w)] = logps
                per_window.append(-logps)
            nll[t] = np.stack(per_window)  # [W, S - 1]
        seconds = time.perf_counter() - t0
        mem = cache_memory(cache, var["kv"], cfg.num_layers, cfg.num_kv_heads, cfg.head_dim)
        row = {k: v for k, v in var.items() if k != "kv"}
        row["kv_cache_config"] = None if var["kv"] is None else {
            k: (v.name if isinstance(v, Precision) else v) for k, v in var["kv"].__dict__.items()}
        row["ppl"] = {t: math.exp(float(x.mean())) for t, x in nll.items()}
        row["ppl_late"] = {t: math.exp(float(x[:, late].mean())) for t, x in nll.items()}
        row["ppl_all_texts"] = math.exp(float(np.mean([x.mean() for x in nll.values()])))
        row["ppl_late_all_texts"] = math.exp(float(np.mean([x[:, late].mean() for x in nll.values()])))
        row["max_abs_logprob_diff_vs_contiguous"] = float(max(
            np.max(np.abs(-nll[t][w] - baseline_logps[(t, w)])) for t in nll for w in range(len(nll[t]))))
        row["memory"] = mem
        row["seconds"] = seconds
        rows.append(row)
        print(f"{row['name']:<44s} ppl " + " ".join(f"{t} {p:8.3f}" for t, p in row["ppl"].items()) +
              f"  ({seconds:.1f}s)", flush=True)

    ref = next(r for r in rows if r["name"] == FP16_ROW)
    base = rows[0]
    for r in rows:
        r["ppl_ratio_vs_fp16"] = {t: r["ppl"][t] / ref["ppl"][t] for t in r["ppl"]}
        r["ppl_late_ratio_vs_fp16"] = {t: r["ppl_late"][t] / ref["ppl_late"][t] for t in r["ppl_late"]}
        r["ppl_ratio_vs_fp16_all_texts"] = r["ppl_all_texts"] / ref["ppl_all_texts"]
        r["ppl_ratio_vs_contiguous"] = {t: r["ppl"][t] / base["ppl"][t] for t in r["ppl"]}
    check["agrees_to_1e-4"] = check["max_abs_logit_diff"] <= 1e-4
    qwen = qwen_memory(c)
    targets = _targets(c, rows)
    results = {"config": c.to_dict(), "model_path": os.path.relpath(folder),
               "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "jax": jax.__version__},
               "texts": {t: {"windows": int(w.shape[0]), "window": c.window, "scored_tokens": int(w.shape[0]) *
                             (c.window - 1)} for t, w in windows.items()},
               "baseline": "contiguous FP32 cache (exact); ratios are against the FP16 two-tier store (FP16 tail and "
                           "store: the FP16 KV cache)",
               "baseline_check_vs_forward": check, "rows": rows, "qwen_memory": qwen, "targets": targets,
               "not_implemented": [KIVI2_NOTE]}
    print()
    print(markdown_table(results))
    print()
    print(qwen_table(qwen))
    print()
    print(f"baseline check: the contiguous scan's logits vs llama.forward: max |diff| "
          f"{check['max_abs_logit_diff']:.2e} (log-probs {check['max_abs_logprob_diff']:.2e}); "
          f"{'agree' if check['agrees_to_1e-4'] else 'DO NOT agree'} to 1e-4")
    for line in targets["lines"]:
        print(line)
    print(KIVI2_NOTE)
    os.makedirs(os.path.dirname(c.output) or ".", exist_ok=True)
    with open(c.output, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1)
    if c.plot:
        plot(results, c.plot)
    print(f"wrote {c.output}" + (f" and {c.plot}" if c.plot else ""))
    return results


def _targets(c, rows) -> dict:
    """The issue's targets: Q4 store >= 3.5x smaller than FP16 per stored token; ppl within 1 % of FP16
    at tail 64 (every text, with and without sinks)."""
    out = {"lines": []}
    q4 = [r for r in rows if r["store"] == "Q4" and r["memory"].get("store_compression_ratio")]
    for r in q4:
        if r.get("evicts"):
            continue
        out.setdefault("q4_store_compression", {})[r["name"]] = r["memory"]["store_compression_ratio"]
    for r in q4:
        if not r.get("evicts") and not r["sinks"]:
            ratio = r["memory"]["store_compression_ratio"]
            out["lines"].append(f"target Q4 store >= 3.5x smaller than FP16 per stored token: tail {r['tail']} "
                                f"(migration {r['kv_cache_config']['migration_batch']}): {ratio:.2f}x "
                                f"{'MET' if ratio >= 3.5 else 'NOT met'}")
    for r in rows:
        if r["tail"] == 64 and r["store"] in ("Q8", "Q4") and not r.get("evicts"):
            worst = max(r["ppl_ratio_vs_fp16"].values())
            out.setdefault("ppl_within_1pct_at_tail_64", {})[r["name"]] = worst <= 1.01
            out["lines"].append(f"target ppl within 1 % of FP16 at tail 64: {r['name']}: worst text "
                                f"{100 * (worst - 1):+.2f} % {'MET' if worst <= 1.01 else 'NOT met'}")
    return out


def markdown_table(results: dict) -> str:
    rows = results["rows"]
    texts = list(rows[0]["ppl"])
    head = ("| cache | " + " | ".join(f"{t} ppl (vs FP16)" for t in texts) + " | " +
            " | ".join(f"{t} ppl pos ≥ {results['config']['late_from']} (vs FP16)" for t in texts) +
            " | store B/token/layer | store vs FP16 | whole cache vs FP16 | held KiB |")
    sep = "|---|" + "---:|" * (2 * len(texts) + 4)
    lines = [head, sep]
    for r in rows:
        m = r["memory"]
        ppl = " | ".join(f"{r['ppl'][t]:.3f} ({100 * (r['ppl_ratio_vs_fp16'][t] - 1):+.2f} %)" for t in texts)
        ppl_late = " | ".join(f"{r['ppl_late'][t]:.3f} ({100 * (r['ppl_late_ratio_vs_fp16'][t] - 1):+.2f} %)"
                              for t in texts)
        if r["kv_cache_config"] is None:
            mem = f"{m['bytes_per_token_layer']:.0f} (FP32) | {m['compression_ratio_vs_fp16']:.2f}x | " \
                  f"{m['compression_ratio_vs_fp16']:.2f}x | {m['allocated_bytes'] / 1024:.0f} (allocated)"
        else:
            spt = m["store_bytes_per_token_layer"]
            spt_s = "—" if spt is None else f"{spt:.0f}"
            scr = "—" if m["store_compression_ratio"] is None else f"{m['store_compression_ratio']:.2f}x"
            mem = f"{spt_s} | {scr} | {m['compression_ratio_vs_fp16']:.2f}x | {m['held_bytes'] / 1024:.0f}"
        lines.append(f"| {r['name']} | {ppl} | {ppl_late} | {mem} |")
    return "\n".join(lines)


def qwen_table(rows: list[dict]) -> str:
    lines = ["| Qwen2.5-0.5B KV shape (24 layers, 2 KV heads, head_dim 64) | tokens | allocated MiB | held MiB "
             "| vs FP16 |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['cache']} | {r['tokens']} | {r['allocated_bytes'] / 2**20:.2f} | "
                     f"{r['held_bytes'] / 2**20:.2f} | {r['ratio_vs_fp16']:.2f}x |")
    return "\n".join(lines)


def plot(results: dict, path: str) -> None:
    """Left: ppl change vs FP16 (all texts) by tail length, one line per store and sinks. Middle: store
    bytes per token per layer. Right: Qwen2.5-0.5B KV memory by context."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results["rows"] if r["store"] in ("Q8", "Q4") and not r.get("evicts")]
    pct = lambda r: 100 * (r["ppl_ratio_vs_fp16_all_texts"] - 1)  # noqa: E731
    fig, (a, b, q) = plt.subplots(1, 3, figsize=(16, 4.8))
    for store, color in (("Q8", "tab:blue"), ("Q4", "tab:red")):
        for sinks in sorted({r["sinks"] for r in rows}):
            line = sorted((r for r in rows if r["store"] == store and r["sinks"] == sinks), key=lambda r: r["tail"])
            if line:
                a.plot([r["tail"] for r in line], [pct(r) for r in line], "o-" if sinks == 0 else "s--", color=color,
                       label=f"{store} store" + (f", {sinks} sinks" if sinks else ""))
    evicting = [r for r in results["rows"] if r.get("evicts")]
    for i, r in enumerate(evicting):
        a.scatter([r["tail"]], [pct(r)], marker="x", color="k", zorder=3,
                  label="Q4, evicting (max_tokens " f"{r['kv_cache_config']['max_tokens']})" if i == 0 else None)
        a.annotate(f"{r['sinks']} sinks", (r["tail"], pct(r)), fontsize=7, textcoords="offset points",
                   xytext=(6, -4))
    a.axhline(0.0, color="grey", lw=0.8)
    a.set_xscale("log", base=2)
    a.set_xlabel("tail length (FP16 tokens)")
    a.set_ylabel("perplexity change vs the FP16 cache (%)")
    worst = max((100 * abs(x - 1) for r in rows + evicting for x in r["ppl_ratio_vs_fp16"].values()), default=0.0)
    a.set_title(f"perplexity, teacher-forced through the cache\n(target within 1 % at tail 64; "
                f"worst here {worst:.2f} %)", fontsize=9)
    a.legend(fontsize=8)
    a.grid(alpha=0.3)
    mem = [r for r in results["rows"] if r["kv_cache_config"] is not None and not r.get("evicts") and r["sinks"] == 0
           and r["memory"]["store_bytes_per_token_layer"]]
    b.bar(range(len(mem)), [r["memory"]["store_bytes_per_token_layer"] for r in mem], color="tab:gray")
    for i, r in enumerate(mem):
        b.annotate(f"{r['memory']['store_compression_ratio']:.2f}x", (i, r["memory"]["store_bytes_per_token_layer"]),
                   ha="center", fontsize=7, textcoords="offset points", xytext=(0, 2))
    b.set_xticks(range(len(mem)), [r["name"].replace(" store", "") for r in mem], rotation=45, ha="right", fontsize=7)
    b.set_ylabel("store bytes per token per layer (scales included)")
    b.set_title("store bytes per token (migration = min(tail, 64))\nlabels: times smaller than FP16", fontsize=9)
    qw = results["qwen_memory"]
    names = list(dict.fromkeys(r["cache"] for r in qw))
    ns = sorted({r["tokens"] for r in qw})
    width = 0.8 / len(names)
    for j, name in enumerate(names):
        q.bar([i + j * width for i in range(len(ns))],
              [next(r["held_bytes"] for r in qw if r["cache"] == name and r["tokens"] == n) / 2**20 for n in ns],
              width, label=name)
    q.set_xticks([i + 0.4 - width / 2 for i in range(len(ns))], [f"{n} tokens" for n in ns])
    q.set_yscale("log")
    q.set_ylabel("KV cache MiB (held)")
    q.set_title("Qwen2.5-0.5B KV shape", fontsize=9)
    q.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv):
    del argv
    run(_CONFIG.value)


if __name__ == "__main__":
    # Defined here, not at import: tests import several study modules into one process.
    _CONFIG = config_flags.DEFINE_config_file("config", "configs/kv_cache_quality.py", "Study config.")
    app.run(main)
