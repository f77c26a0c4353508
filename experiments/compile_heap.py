"""What an XLA:CPU program keeps in RSS per compiled kernel, and how much of that is live heap.

    python experiments/compile_heap.py                 # 10, 100 and 400 unrolled steps
    python experiments/compile_heap.py --steps=24,240

`memory_stages.py` found the decode program of the 0.5B shape (about 1000 kernels, 40 per layer)
costing ~0.1 GB to compile or to load from the cache, against ~0.01 GB for one layer. This isolates
that cost from the model: a fresh process compiles a chain of `steps` unrolled steps (a tanh, then a
max over the row, so every step is two kernels: a loop fusion and a reduction) on an [896] vector,
then reports, in MB over the process before the compile:

- RSS after the compile (glibc's free heap returned first with `malloc_trim`);
- the bytes malloc holds in use (`mallinfo2`: uordblks + hblkhd): what the executable really keeps;
- RSS and in-use bytes after the executable is deleted and jax's caches cleared.

RSS minus in-use is heap that malloc holds free but cannot return, because live blocks sit on its
pages. Linux with glibc only. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import subprocess
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def child(steps: int) -> dict:
    import gc

    import jax
    import jax.numpy as jnp

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2

    def rss_mb() -> float:
        libc.malloc_trim(0)
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) / 1e3 for line in f if line.startswith("VmRSS:"))

    def in_use_mb() -> float:
        m = libc.mallinfo2()
        return (m.uordblks + m.hblkhd) / 1e6

    def chain(x):
        for i in range(steps):
            x = jnp.tanh(x * (1.0 + i * 1e-3))
            x = x - jnp.max(x)  # a reduction between the steps: two kernels per step
        return x

    x = jnp.ones((896,), jnp.float32)
    jax.jit(lambda y: y + 1)(x).block_until_ready()  # the backend's first compile is not the chain's
    rss0, use0 = rss_mb(), in_use_mb()
    t = time.perf_counter()
    compiled = jax.jit(chain).lower(x).compile()
    seconds = time.perf_counter() - t
    kernels = compiled.as_text().count(" fusion(")
    rss1, use1 = rss_mb(), in_use_mb()
    del compiled
    gc.collect()
    jax.clear_caches()
    rss2, use2 = rss_mb(), in_use_mb()
    return {"steps": steps, "kernels": kernels, "compile_s": seconds, "rss_kept_mb": rss1 - rss0,
            "in_use_kept_mb": use1 - use0, "rss_after_delete_mb": rss2 - rss0, "in_use_after_delete_mb": use2 - use0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", default="10,100,400", help="comma-separated numbers of unrolled steps")
    ap.add_argument("--output", default=os.path.join(_HERE, "results", "compile_heap.json"))
    a = ap.parse_args()
    rows = []
    for steps in [int(s) for s in a.steps.split(",")]:
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", str(steps)], capture_output=True,
                             text=True, env=dict(os.environ, RUVLLM_JAX_COMPILATION_CACHE="0"))
        if out.returncode != 0:
            raise SystemExit(out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"rc {out.returncode}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"{'steps':>6s} {'kernels':>8s} {'compile s':>10s} {'RSS kept':>9s} {'in use':>7s} {'per kernel KB':>14s}"
          f" {'RSS after del':>14s} {'in use after del':>17s}   (MB)")
    for r in rows:
        per = 1e3 * r["rss_kept_mb"] / max(r["kernels"], 1)
        print(f"{r['steps']:6d} {r['kernels']:8d} {r['compile_s']:10.2f} {r['rss_kept_mb']:9.1f}"
              f" {r['in_use_kept_mb']:7.1f} {per:14.0f} {r['rss_after_delete_mb']:14.1f}"
              f" {r['in_use_after_delete_mb']:17.1f}")
    out = {"what": "RSS and malloc in-use bytes kept by an XLA:CPU executable of N unrolled two-kernel steps",
           "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
           "time": time.strftime("%Y-%m-%d %H:%M"), "results": rows}
    os.makedirs(os.path.dirname(a.output) or ".", exist_ok=True)
    with open(a.output, "w") as f:
        json.dump(out, f, indent=1)
    print(f"\nwrote {a.output}")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        print(json.dumps(child(int(sys.argv[2]))))
        sys.exit(0)
    main()
