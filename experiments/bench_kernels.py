"""Attention kernels against `jax.nn.dot_product_attention` on the current device, in one run.

    python experiments/bench_kernels.py --config=configs/bench_kernels.py
    python experiments/bench_kernels.py --config=configs/bench_kernels.py \
        --config.prefill_lengths=256,512 --config.decode_cache_lengths=1024,4096   # a short CPU run

Prefill: causal self-attention of S tokens (q [B, S, H, D], k/v [B, S, KVH, D]). Decode: one query
per sequence against a full cache of T tokens. Every implementation available here is timed (median
of `repeats` jitted calls after a warm-up) and checked against the XLA `dot_product_attention`
output (max abs error recorded), then a table is printed and JSON written under experiments/results/.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time

from absl import app
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/bench_kernels.py", "Benchmark config.")


def _ints(text: str) -> list[int]:
    return [int(x) for x in str(text).split(",") if x.strip()]


def _median_ms(fn, args, repeats: int) -> float:
    import jax

    jax.block_until_ready(fn(*args))  # warm-up: compile
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def _available(impl: str, backend: str) -> str | None:
    """None if `impl` can run on this backend, else why not."""
    if impl == "pallas" and backend not in ("gpu", "tpu"):
        return f"no GPU/TPU ({backend}); Pallas only runs in interpret mode here, which is not a timing"
    if impl == "cudnn_dpa" and backend != "gpu":
        return f"cuDNN needs an NVIDIA GPU ({backend})"
    return None


def _prefill_fns(impls, cfg):
    import jax

    from ruvllm_jax.kernels import flash_attention

    fns = {
        "jnp": lambda q, k, v: flash_attention(q, k, v, causal=True, impl="jnp"),
        "pallas": lambda q, k, v: flash_attention(q, k, v, causal=True, impl="pallas"),
        "xla_dpa": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla"),
        "cudnn_dpa": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn"),
    }
    return {name: jax.jit(fns[name]) for name in impls}


def _decode_fns(impls, cfg):
    """Ours take the head-major cache [B, KVH, T, D]; dot_product_attention takes [B, T, KVH, D]."""
    import jax

    from ruvllm_jax.kernels import decode_attention

    def dpa(implementation):
        def f(q, k_hm, v_hm, k_sm, v_sm, lengths):
            out = jax.nn.dot_product_attention(q[:, None], k_sm, v_sm, key_value_seq_lengths=lengths,
                                               implementation=implementation)
            return out[:, 0]
        return f

    fns = {
        "jnp": lambda q, k_hm, v_hm, k_sm, v_sm, n: decode_attention(q, k_hm, v_hm, n, impl="jnp"),
        "pallas": lambda q, k_hm, v_hm, k_sm, v_sm, n: decode_attention(q, k_hm, v_hm, n, impl="pallas"),
        "xla_dpa": dpa("xla"),
        "cudnn_dpa": dpa("cudnn"),
    }
    return {name: jax.jit(fns[name]) for name in impls}


def _run_case(fns, args, reference_name, repeats):
    import jax.numpy as jnp
    import numpy as np

    row, outs = {}, {}
    for name, fn in fns.items():
        try:
            row[name] = {"ms": round(_median_ms(fn, args, repeats), 3)}
            outs[name] = np.asarray(fn(*args).astype(jnp.float32))
        except Exception as e:  # a kernel that fails to compile here is a result, not a crash
            row[name] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
    if reference_name in outs:
        for name, out in outs.items():
            row[name]["max_abs_err_vs_xla_dpa"] = float(np.abs(out - outs[reference_name]).max())
    return row


def main(_):
    import jax
    import jax.numpy as jnp
    import numpy as np

    cfg = _CONFIG.value
    backend = jax.default_backend()
    dtype = jnp.dtype(("float32" if backend == "cpu" else "bfloat16") if cfg.dtype == "auto" else cfg.dtype)
    impls, skipped = [], {}
    for impl in [s.strip() for s in cfg.impls.split(",") if s.strip()]:
        why = _available(impl, backend)
        (skipped.__setitem__(impl, why) if why else impls.append(impl))
    b, h, kvh, d = cfg.batch, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    rng = np.random.default_rng(cfg.seed)

    def rand(*shape):
        return jnp.asarray(rng.standard_normal(shape, dtype=np.float32), dtype)

    results = {"prefill": {}, "decode": {}}
    prefill = _prefill_fns(impls, cfg)
    for s in _ints(cfg.prefill_lengths):
        q, k, v = rand(b, s, h, d), rand(b, s, kvh, d), rand(b, s, kvh, d)
        results["prefill"][s] = _run_case(prefill, (q, k, v), "xla_dpa", cfg.repeats)
        print(f"prefill S={s}: {results['prefill'][s]}", flush=True)
    decode = _decode_fns(impls, cfg)
    for t in _ints(cfg.decode_cache_lengths):
        q, k_sm, v_sm = rand(b, h, d), rand(b, t, kvh, d), rand(b, t, kvh, d)
        k_hm, v_hm = k_sm.transpose(0, 2, 1, 3), v_sm.transpose(0, 2, 1, 3)
        lengths = jnp.full((b,), t, jnp.int32)
        results["decode"][t] = _run_case(decode, (q, k_hm, v_hm, k_sm, v_sm, lengths), "xla_dpa", cfg.repeats)
        print(f"decode T={t}: {results['decode'][t]}", flush=True)

    print(f"\n{backend} ({jax.devices()[0].device_kind}), {dtype.name}, B={b} H={h} KVH={kvh} D={d}; median ms")
    header = "| phase | length | " + " | ".join(impls) + " |"
    print(header + "\n|" + " --- |" * (2 + len(impls)))
    for phase, rows in results.items():
        for length, row in rows.items():
            cells = [f"{row[i]['ms']:.3f}" if "ms" in row[i] else "error" for i in impls]
            print(f"| {phase} | {length} | " + " | ".join(cells) + " |")
    for impl, why in skipped.items():
        print(f"skipped {impl}: {why}")

    record = {
        "device": {"backend": backend, "kind": jax.devices()[0].device_kind, "count": jax.device_count(),
                   "host": platform.processor() or platform.machine(), "cpu_count": os.cpu_count()},
        "jax": jax.__version__,
        "config": cfg.to_dict(),
        "dtype": dtype.name,
        "unit": "ms, median of repeats after a warm-up call",
        "skipped": skipped,
        "results": {phase: {str(k): v for k, v in rows.items()} for phase, rows in results.items()},
    }
    out = cfg.output or f"experiments/results/bench_kernels_{backend}.json"
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(record, f, indent=2)
    print(f"wrote {out}")


if __name__ == "__main__":
    app.run(main)
