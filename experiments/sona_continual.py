"""Continual learning of a new domain: how much a method gains there against how much it forgets.

    python experiments/sona_continual.py --config=configs/sona_continual.py
    python experiments/sona_continual.py --config=configs/sona_continual.py --config.domains=milton

The embedded tiny-shakespeare model learns from one pass over `n_train` passages of a new domain
(request -> response windows, `continual_data.passages`). Each method is a `train_fn(params, cfg,
passages) -> adapters` (the pytree `llama.forward(..., adapters=...)` takes); `Study.run_method`
times it and measures held-out perplexity on the new domain (gain) and on Shakespeare's validation
split (forgetting) against the base model. The frontier is plain LoRA + Adam at several learning
rates; add a method by registering a factory in `METHODS` (config -> [(row name, train_fn)]).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Callable

from absl import app
from continual_data import SHAKESPEARE, Passage, heldout_ids, passages, perplexity
from ml_collections import config_flags

from ruvllm_jax.lora import AdaptFeedback, MicroLoRA
from ruvllm_jax.training import bpe

TrainFn = Callable[[dict, object, list[Passage]], dict]  # (params, cfg, passages) -> adapters pytree


def evaluate(params, cfg, adapters, eval_ids: dict, *, context: int = 256, stride: int = 128) -> dict[str, float]:
    """Perplexity of each named held-out token stream under the model with `adapters` (None: base)."""
    return {name: perplexity(params, cfg, ids, adapters, context, stride) for name, ids in eval_ids.items()}


@dataclasses.dataclass
class Study:
    """One new domain: the base model, its training passages, held-out streams and base perplexities,
    so that every method is measured on exactly the same data and against the same baseline."""

    params: dict
    cfg: object
    domain: str
    passages: list[Passage]
    eval_ids: dict  # {domain: ids, "shakespeare": ids}
    context: int = 256
    stride: int = 128
    before: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if not self.before:
            self.before = self.evaluate(None)

    def evaluate(self, adapters) -> dict[str, float]:
        return evaluate(self.params, self.cfg, adapters, self.eval_ids, context=self.context, stride=self.stride)

    def run_method(self, name: str, train_fn: TrainFn) -> dict:
        """Train with `train_fn` on this study's passages and measure; returns one results row."""
        t0 = time.perf_counter()
        adapters = train_fn(self.params, self.cfg, self.passages)
        seconds = time.perf_counter() - t0
        t1 = time.perf_counter()
        after = self.evaluate(adapters)
        eval_seconds = time.perf_counter() - t1
        new_b, new_a = self.before[self.domain], after[self.domain]
        sh_b, sh_a = self.before[SHAKESPEARE], after[SHAKESPEARE]
        return {"method": name, "domain": self.domain, "new_ppl_before": new_b, "new_ppl_after": new_a,
                "gain_pct": 100.0 * (1.0 - new_a / new_b), "shakespeare_ppl_before": sh_b,
                "shakespeare_ppl_after": sh_a, "forgetting_pct": 100.0 * (sh_a / sh_b - 1.0), "seconds": seconds,
                "steps": len(self.passages), "eval_seconds": eval_seconds}


def plain_lora_adam(lr: float, *, rank: int = 2, alpha: float = 4.0, seed: int = 0) -> TrainFn:
    """The frontier: fresh rank-`rank` Q/V LoRA on every layer, one Adam step per passage on
    log p(response | request) (reward 1: `apply_updates` ascends reward · log-likelihood)."""
    def train(params, cfg, ps: list[Passage]) -> dict:
        lora = MicroLoRA.for_model(cfg, rank=rank, alpha=alpha, optimizer="adam", seed=seed)
        feedback = AdaptFeedback(quality=1.0, reward=1.0)
        for p in ps:
            lora.adapt_sequence(params, p.request_ids, p.response_ids, feedback)
            lora.apply_updates(lr)
        return lora.adapters

    return train


def sona_stream(backend, sona_config, *, background: bool, deep: bool, quality: float = 0.9,
                log: list | None = None) -> TrainFn:
    """Serve the passages to a fresh `SonaLlm` as rated exchanges: `instant_adapt` on each; with
    `background`, `maybe_background()` after each (interval 0: every `background_min_samples`) and a
    last `background_consolidate()`; with `deep`, `deep_optimize` over the samples served since the
    last deep run whenever `should_trigger_deep()`, and once more at the end for the rest."""
    from ruvllm_jax.sona import SonaLlm, TrainingSample

    def train(params, cfg, ps: list[Passage]) -> dict:
        sona = SonaLlm(sona_config, backend=backend)
        served: list = []
        for p in ps:
            r = sona.instant_adapt(p.request, p.response, quality)
            served.append(TrainingSample(p.request, p.response, quality))
            if log is not None:
                log.append({"loop": "instant", "quality_delta": r.quality_delta, "latency_us": r.latency_us})
            if background:
                sona.maybe_background()
            if deep and sona.should_trigger_deep():
                sona.deep_optimize(served)
                served = []
        if background and sona.pending:
            sona.background_consolidate()
        if deep and served:
            sona.deep_optimize(served)
        return sona.adapters

    return train


def _sona_config(c, **overrides):
    from ruvllm_jax.sona import SonaLlmConfig, TrainingConfig

    s = c.sona
    tc = TrainingConfig(learning_rate=s.deep_lr, warmup_steps=s.deep_warmup, decay_to=s.deep_decay_to,
                        batch_size=s.batch_size, epochs=s.deep_epochs, ewc_lambda=s.ewc_lambda,
                        kl_lambda=s.kl_lambda, replay_batch=s.replay_batch)
    kw = dict(training=tc, instant_lr=s.instant_lr, instant_optimizer=s.instant_optimizer,
              background_interval_ms=0, background_min_samples=s.background_min_samples,
              deep_trigger_threshold=s.deep_trigger_threshold, background_lr=s.background_lr,
              background_epochs=s.background_epochs, fisher_samples=s.fisher_samples,
              fisher_sample_tokens=s.fisher_sample_tokens, seed=c.seed)
    training_overrides = {k[3:]: overrides.pop(k) for k in list(overrides) if k.startswith("tc_")}
    if training_overrides:
        kw["training"] = dataclasses.replace(tc, **training_overrides)
    kw.update(overrides)
    return SonaLlmConfig(**kw)


def sona_methods(c, backend) -> list[tuple[str, TrainFn]]:
    """The SONA rows: instant only; instant + background for each strategy; + deep; and EWC off."""
    from ruvllm_jax.sona import ConsolidationStrategy

    rows = [("sona instant only", sona_stream(backend, _sona_config(c), background=False, deep=False))]
    wanted = [w.strip() for w in c.sona.strategies.split(",") if w.strip()]
    for strategy in [ConsolidationStrategy.parse(w) for w in wanted]:
        cfg = _sona_config(c, consolidation_strategy=strategy)
        rows.append((f"sona instant + background {strategy.name}", sona_stream(backend, cfg, background=True,
                                                                               deep=False)))
    rows.append(("sona instant + background EwcMerge + deep",
                 sona_stream(backend, _sona_config(c), background=True, deep=True)))
    rows.append(("sona ... + deep, diagonal EWC only (no anchor KL)",
                 sona_stream(backend, _sona_config(c, tc_kl_lambda=0.0), background=True, deep=True)))
    for f in c.sona.ewc_off_lr_scales:  # EWC off at smaller rates: its own frontier, to compare at equal gain
        s = c.sona
        cfg = _sona_config(c, tc_kl_lambda=0.0, tc_ewc_lambda=0.0, tc_learning_rate=s.deep_lr * f,
                           instant_lr=s.instant_lr * f, background_lr=s.background_lr * f)
        name = "sona ... + deep, EWC off" + ("" if f == 1 else f", all rates x{f:g}")
        rows.append((name, sona_stream(backend, cfg, background=True, deep=True)))
    return rows


# Method families: (config, backend) -> [(row name, train_fn)], selected by `--config.methods`.
METHODS: dict[str, Callable[..., list[tuple[str, TrainFn]]]] = {
    "plain_adam": lambda c, backend: [(f"plain adam lr={lr:g}", plain_lora_adam(lr, rank=c.rank, alpha=c.alpha,
                                                                              seed=c.seed)) for lr in c.lrs],
    "sona": sona_methods,
}


def forgetting_at_gain(frontier: list[dict], gain: float) -> float | None:
    """The forgetting a frontier (rows of one method family) shows at `gain`, by linear interpolation
    between its two runs around it (None when `gain` is outside its range)."""
    pts = sorted((r["gain_pct"], r["forgetting_pct"]) for r in frontier)
    for (g0, f0), (g1, f1) in zip(pts, pts[1:], strict=False):
        if g0 <= gain <= g1 and g1 > g0:
            return f0 + (gain - g0) / (g1 - g0) * (f1 - f0)
    return None


def equal_gain_comparison(rows: list[dict]) -> list[dict]:
    """Each SONA row with EWC on against the EWC-off runs and the plain-Adam frontier at its gain."""
    out = []
    for domain in sorted({r["domain"] for r in rows}):
        rs = [r for r in rows if r["domain"] == domain]
        off = [r for r in rs if "EWC off" in r["method"]]
        plain = [r for r in rs if r["method"].startswith("plain adam")]
        for r in rs:
            if r["method"].startswith("sona") and "EWC off" not in r["method"] and r["gain_pct"] > 0:
                out.append({"domain": domain, "method": r["method"], "gain_pct": r["gain_pct"],
                            "forgetting_pct": r["forgetting_pct"],
                            "ewc_off_forgetting_at_gain": forgetting_at_gain(off, r["gain_pct"]),
                            "plain_adam_forgetting_at_gain": forgetting_at_gain(plain, r["gain_pct"])})
    return out


def markdown_table(rows: list[dict]) -> str:
    head = ("| method | domain | new ppl before → after | gain % | Shakespeare ppl before → after | forgetting % "
            "| train s |\n|---|---|---|---:|---|---:|---:|")
    lines = [f"| {r['method']} | {r['domain']} | {r['new_ppl_before']:.1f} → {r['new_ppl_after']:.1f} | "
             f"{r['gain_pct']:.1f} | {r['shakespeare_ppl_before']:.2f} → {r['shakespeare_ppl_after']:.2f} | "
             f"{r['forgetting_pct']:.2f} | {r['seconds']:.1f} |" for r in rows]
    return "\n".join([head, *lines])


def plot_frontier(rows: list[dict], path: str) -> None:
    """Gain (y) against forgetting (x), one panel per domain: the plain-Adam frontier and the EWC-off
    runs as lines (their learning rates), every other method as a labelled point; up and left is better."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    domains = sorted({r["domain"] for r in rows})
    fig, axes = plt.subplots(1, len(domains), figsize=(7 * len(domains), 5.5), squeeze=False)
    for ax, domain in zip(axes[0], domains, strict=True):
        rs = [r for r in rows if r["domain"] == domain]
        for family, style in (("plain adam", "o-"), ("EWC off", "s--")):
            line = sorted((r for r in rs if family in r["method"]), key=lambda r: r["gain_pct"])
            if line:
                ax.plot([r["forgetting_pct"] for r in line], [r["gain_pct"] for r in line], style,
                        label=family + (" (the frontier)" if family == "plain adam" else " (SONA, rates scaled)"))
        points = [r for r in rs if "plain adam" not in r["method"] and "EWC off" not in r["method"]]
        for i, r in enumerate(points):
            label = r["method"].replace("sona instant + background ", "bg ").replace("sona ", "")
            ax.scatter([r["forgetting_pct"]], [r["gain_pct"]], zorder=3)
            ax.annotate(label, (r["forgetting_pct"], r["gain_pct"]), textcoords="offset points",
                        xytext=(6, 8 - 11 * (i % 3)), fontsize=7)
        ax.axhline(30, color="grey", lw=0.6, ls=":")
        ax.axvline(2, color="grey", lw=0.6, ls=":")
        ax.set_xlabel("forgetting: Shakespeare validation ppl increase (%)")
        ax.set_ylabel(f"gain: {domain} held-out ppl decrease (%)")
        ax.set_title(f"{domain}: one pass over {rs[0]['steps']} passages (target: gain >= 30 %, forgetting <= 2 %)",
                     fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv):
    del argv
    c = _CONFIG.value
    folder = c.model_path
    if not folder:
        from ruvllm_jax.assets import DEFAULT_MODEL_PATH

        folder = DEFAULT_MODEL_PATH
    from ruvllm_jax import JaxBackend

    backend = JaxBackend()  # the SONA rows serve through it; every row reads the same params
    backend.load_model(folder)
    cfg, params = backend.config, backend.params
    tok = bpe.load_tokenizer(folder)
    shakespeare = heldout_ids(SHAKESPEARE, tok, c.eval_tokens)
    methods = [m.strip() for m in c.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; known: {sorted(METHODS)}")
    rows = []
    for domain in [d.strip() for d in c.domains.split(",") if d.strip()]:
        ps = passages(domain, tok, c.n_train, c.request_tokens, c.response_tokens, seed=c.seed)
        t0 = time.perf_counter()
        study = Study(params, cfg, domain, ps, {domain: heldout_ids(domain, tok, c.eval_tokens),
                                                 SHAKESPEARE: shakespeare}, c.context, c.stride)
        print(f"{domain}: base ppl {study.before[domain]:.2f}, Shakespeare {study.before[SHAKESPEARE]:.2f} "
              f"(evaluated in {time.perf_counter() - t0:.1f}s, compile included)", flush=True)
        for m in methods:
            for name, train_fn in METHODS[m](c, backend):
                row = study.run_method(name, train_fn)
                rows.append(row)
                print(f"  {name}: gain {row['gain_pct']:.1f} %, forgetting {row['forgetting_pct']:.2f} % "
                      f"({row['seconds']:.1f}s train, {1e3 * row['seconds'] / row['steps']:.0f} ms/step; "
                      f"{row['eval_seconds']:.1f}s eval)", flush=True)
    print(markdown_table(rows))
    comparison = equal_gain_comparison(rows)
    for r in comparison:
        fmt = lambda v: "n/a (outside its range)" if v is None else f"{v:.2f} %"  # noqa: E731
        print(f"{r['domain']}, {r['method']}: gain {r['gain_pct']:.1f} % at forgetting {r['forgetting_pct']:.2f} %; "
              f"at that gain EWC off forgets {fmt(r['ewc_off_forgetting_at_gain'])}, plain Adam "
              f"{fmt(r['plain_adam_forgetting_at_gain'])}")
    os.makedirs(os.path.dirname(c.output), exist_ok=True)
    with open(c.output, "w", encoding="utf-8") as f:
        json.dump({"config": c.to_dict(), "model_path": os.path.relpath(folder), "rows": rows,
                   "equal_gain": comparison}, f, indent=1)
    plot_frontier(rows, c.plot)
    print(f"wrote {c.output} and {c.plot}")


if __name__ == "__main__":
    # Defined here, not at import: tests import several study modules into one process.
    _CONFIG = config_flags.DEFINE_config_file("config", "configs/sona_continual.py", "Study config.")
    app.run(main)
