"""MicroLoRA cost: `adapt` + `apply_updates` latency on Q/V, and decode tok/s with vs without adapters.

    python experiments/bench_lora.py --config=configs/bench_lora.py
    python experiments/bench_lora.py --config=configs/bench_lora.py --config.model=/path/to/hf_folder

Uses the embedded model when it exists (`ruvllm_jax.assets.DEFAULT_MODEL_PATH`), else a tiny random
llama, and says which. Decode runs alternate with/without adapters in the same process so both see
the same machine load; the adapters get non-zero B so the deltas are really computed.
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

_CONFIG = config_flags.DEFINE_config_file("config", "configs/bench_lora.py", "Benchmark config.")


def _pick_model(name: str) -> tuple[str, str]:
    if name != "auto":
        return name, f"folder {name}"
    from ruvllm_jax.assets import DEFAULT_MODEL_PATH

    if os.path.isfile(os.path.join(DEFAULT_MODEL_PATH, "config.json")):
        return DEFAULT_MODEL_PATH, "embedded default model"
    from ruvllm_jax.testing import build_hf_model, save_hf_model  # tiny random transformers llama

    folder = tempfile.mkdtemp(prefix="bench_lora_")
    save_hf_model(build_hf_model("llama"), folder)
    return folder, "tiny random llama (embedded model not present)"


def bench_adapt(backend, c) -> dict:
    import jax
    import numpy as np

    from ruvllm_jax.lora import AdaptFeedback, MicroLoRA

    cfg = backend.config
    lora = MicroLoRA.for_model(cfg, rank=c.rank, alpha=c.alpha, target_modules=c.targets.split(","), seed=c.seed)
    rng = np.random.default_rng(c.seed)
    x = rng.normal(size=cfg.hidden_size).astype(np.float32)
    out = {}
    dims = {"q": cfg.q_size, "k": cfg.kv_size, "v": cfg.kv_size}
    targets = c.targets.split(",")
    cases = {
        # Hebbian (g = x) needs square modules: under GQA that is Q only.
        "hebbian": [(m, None) for m in targets if dims.get(m) == cfg.hidden_size],
        "gradient_estimate": [(m, rng.normal(size=dims[m]).astype(np.float32)) for m in targets],
    }
    for name, fb_list in cases.items():
        def step(fb_list=fb_list):
            for module, g in fb_list:  # one adapt per module, then one update
                lora.adapt(x, AdaptFeedback(quality=0.8, gradient_estimate=g), module=module, layer=c.layer)
            lora.apply_updates(1e-3)
            jax.block_until_ready(lora.state.params)

        step()
        times = []
        for _ in range(c.adapt_repeats):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        out[name] = {"median_us": statistics.median(times) * 1e6, "modules": [m for m, _ in fb_list]}
    return out


def bench_decode(backend, c) -> dict:
    import jax
    import numpy as np

    from ruvllm_jax.lora import MicroLoRA
    from ruvllm_jax.types import GenerateParams

    cfg = backend.config
    lora = MicroLoRA.for_model(cfg, rank=c.rank, alpha=c.alpha, target_modules=c.targets.split(","), seed=c.seed)
    keys = iter(jax.random.split(jax.random.PRNGKey(c.seed), 4 * cfg.num_layers * 8))
    lora.state = lora.state.replace(
        params=jax.tree.map(lambda p: p + 0.01 * jax.random.normal(next(keys), p.shape), lora.state.params)
    )
    prompt = list(np.random.default_rng(c.seed).integers(2, cfg.vocab_size, c.prompt_tokens))
    params = GenerateParams(max_tokens=c.new_tokens, temperature=0.0, repetition_penalty=1.0)
    eos = backend.eos_token_ids
    backend.eos_token_ids = ()  # decode the full count

    def run(with_adapters: bool) -> float:
        backend.attach_adapters(lora) if with_adapters else backend.detach_adapters()
        t0 = time.perf_counter()
        n = len(backend.generate_tokens(prompt, params))
        return n / (time.perf_counter() - t0)

    run(False), run(True)  # warm-up: compile both
    plain, adapted = [], []
    for _ in range(c.decode_repeats):
        plain.append(run(False))
        adapted.append(run(True))
    backend.eos_token_ids = eos
    backend.detach_adapters()
    p, a = statistics.median(plain), statistics.median(adapted)
    return {"tok_s_without": p, "tok_s_with": a, "overhead_pct": 100.0 * (p - a) / p, "new_tokens": c.new_tokens,
            "note": "tokens/s of prefill + decode (generate_tokens end to end)"}


def main(_):
    import jax

    from ruvllm_jax.backend import JaxBackend

    c = _CONFIG.value
    folder, which = _pick_model(c.model)
    backend = JaxBackend()
    backend.load_model(folder)
    cfg = backend.config
    result = {
        "model": which, "path": os.path.relpath(folder) if os.path.isdir(folder) else folder,
        "hidden_size": cfg.hidden_size, "num_layers": cfg.num_layers, "rank": c.rank, "targets": c.targets,
        "adapt_apply": bench_adapt(backend, c), "decode": bench_decode(backend, c),
        "jax": jax.__version__, "device": str(jax.devices()[0]), "machine": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
    }
    print(f"model: {which} (hidden {cfg.hidden_size}, {cfg.num_layers} layers), rank {c.rank}, targets {c.targets}")
    print(f"{'measure':<56}{'value':>14}")
    for name, r in result["adapt_apply"].items():
        label = f"adapt+apply_updates {name} {'/'.join(r['modules'])} (median µs)"
        print(f"{label:<56}{r['median_us']:>14.1f}")
    d = result["decode"]
    print(f"{'tok/s without adapters':<56}{d['tok_s_without']:>14.1f}")
    print(f"{'tok/s with adapters':<56}{d['tok_s_with']:>14.1f}")
    print(f"{'decode overhead (%; target <= 5)':<56}{d['overhead_pct']:>14.2f}")
    os.makedirs(os.path.dirname(c.output), exist_ok=True)
    with open(c.output, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {c.output}")


if __name__ == "__main__":
    app.run(main)
