"""Quantized matrix-vector products on CPU: the native kernel against XLA's f32 GEMV and the jnp path.

    python experiments/bench_quant_matmul.py                # the Qwen2.5-0.5B shapes, 1 and 8 rows
    python experiments/bench_quant_matmul.py --rounds 3 --shapes 4864x896 --rows 1
    python experiments/bench_quant_matmul.py --variant no_vnni=-DRUVLLM_QMM_NO_VNNI   # VNNI against AVX2

For each weight shape [rows, cols] and activation rows n: G weights/s (rows * cols / time, one pass
over the matrix) and the weight bytes read per second, for

* `xla_f32`: `(w @ x.T).T` with w float32, jitted: the bandwidth anchor (4 bytes a weight);
* `native <qtype>`: `ruvllm_jax.quant.native.matmul` on the GGML blocks, all of XLA's threads, and
  for Q8_0 (every format with `--one-thread-all`) also one thread (`max_threads=1`); with
  `--variant LABEL=FLAGS`, the same for the kernel built with those extra flags,
  `native <qtype> [LABEL]`, in the same rounds;
* `jnp <qtype>`: `ruvllm_jax.quant.matmul.quantized_matmul_jnp` when that module provides it;
* `llama.cpp <qtype>`: when llama-cpp-python is installed, ggml's own `ggml_mul_mat` on the same
  bytes, through the libggml it bundles (ctypes), on a persistent 2-thread ggml threadpool as
  llama.cpp decodes (`--ggml-threads`), and on 1 thread (its kernels against ours). Plain ggml
  tensors: no CPU repacking, which llama.cpp's model loader applies to some formats (Q4_0, IQ4_NL,
  Q4_K on some CPUs).

Two regimes, each the best over `--rounds` rounds in which the candidates of one shape take turns
(so load from other processes hits them alike): hot, calls back to back on one weight, which stays
in the last-level cache if it fits; and cold, each call on the next of several equal weights that
together overflow that cache twice, so the bytes come from memory as every layer's do in decoding
(the vocabulary projection is cold either way). JAX candidates are single jitted calls (their ~10 us
dispatch included). Weights are random valid blocks (sane f16 scales): speed does not depend on
the values. K formats need cols % 256 == 0, so they run on 896x4864 only.
Prints a table and writes experiments/results/bench_quant_matmul.json.
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from ruvllm_jax.quant import native
from ruvllm_jax.quant.tensor import FORMATS, QuantizedTensor

QTYPES = ("Q8_0", "Q4_1", "Q5_0", "Q4_K", "Q6_K")
SHAPES = ((4864, 896), (896, 4864), (151936, 896))  # gate/up, down, tied vocabulary projection
# Qwen2.5-0.5B's projections, [rows, cols]: 24 layers of these, then the tied vocabulary projection
LAYER_SHAPES = {"q": (896, 896), "k": (128, 896), "v": (128, 896), "o": (896, 896),
                "gate": (4864, 896), "up": (4864, 896), "down": (896, 4864)}
HEAD_SHAPE = (151936, 896)
SCALE_OFFSETS = {"Q8_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q4_K": (0, 2), "Q6_K": (208,)}
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "bench_quant_matmul.json")


def random_blocks(qtype: str, rows: int, cols: int, rng) -> np.ndarray:
    fmt = FORMATS[qtype]
    nb = cols // fmt.block_size
    blocks = rng.integers(0, 256, size=(rows, nb, fmt.type_size), dtype=np.uint8)
    for off in SCALE_OFFSETS[qtype]:
        scale = (rng.uniform(0.5, 2.0, (rows, nb)) / 64).astype(np.float16)
        blocks[..., off:off + 2] = scale.view(np.uint8).reshape(rows, nb, 2)
    return blocks.reshape(rows, nb * fmt.type_size)


def cpu_info() -> dict:
    info = {"machine": platform.machine(), "cpus": os.cpu_count()}
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
        for line in text.splitlines():
            if line.startswith("model name"):
                info["model"] = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                info["simd"] = sorted(flags & {"avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx512bw", "avx_vnni"})
                break
    except OSError:
        pass
    return info


class Ggml:
    """ggml_mul_mat from llama-cpp-python's bundled libggml, run as llama.cpp runs it (threadpool, plan)."""

    class _InitParams(ctypes.Structure):
        _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]

    class _PoolParams(ctypes.Structure):  # ggml.h, GGML_MAX_N_THREADS = 512
        _fields_ = [("cpumask", ctypes.c_bool * 512), ("n_threads", ctypes.c_int), ("prio", ctypes.c_int),
                    ("poll", ctypes.c_uint32), ("strict_cpu", ctypes.c_bool), ("paused", ctypes.c_bool)]

    class _CPlan(ctypes.Structure):  # ggml-cpu.h
        _fields_ = [("work_size", ctypes.c_size_t), ("work_data", ctypes.c_void_p), ("n_threads", ctypes.c_int),
                    ("threadpool", ctypes.c_void_p), ("abort_callback", ctypes.c_void_p),
                    ("abort_callback_data", ctypes.c_void_p), ("use_ref", ctypes.c_bool)]

    def __init__(self, n_threads: int):
        import llama_cpp

        libdir = os.path.join(os.path.dirname(llama_cpp.__file__), "lib")
        b = self.base = ctypes.CDLL(os.path.join(libdir, "libggml-base.so"), mode=ctypes.RTLD_GLOBAL)
        c = self.cpu = ctypes.CDLL(os.path.join(libdir, "libggml-cpu.so"), mode=ctypes.RTLD_GLOBAL)
        vp = ctypes.c_void_p
        b.ggml_init.restype, b.ggml_init.argtypes = vp, [self._InitParams]
        b.ggml_new_tensor_2d.restype = vp
        b.ggml_new_tensor_2d.argtypes = [vp, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
        b.ggml_mul_mat.restype, b.ggml_mul_mat.argtypes = vp, [vp, vp, vp]
        b.ggml_new_graph.restype, b.ggml_new_graph.argtypes = vp, [vp]
        b.ggml_build_forward_expand.argtypes = [vp, vp]
        b.ggml_get_data.restype, b.ggml_get_data.argtypes = vp, [vp]
        b.ggml_graph_overhead.restype = b.ggml_tensor_overhead.restype = ctypes.c_size_t
        b.ggml_free.argtypes = [vp]
        b.ggml_threadpool_params_default.restype = self._PoolParams
        b.ggml_threadpool_params_default.argtypes = [ctypes.c_int]
        c.ggml_threadpool_new.restype = vp
        c.ggml_threadpool_new.argtypes = [ctypes.POINTER(self._PoolParams)]
        c.ggml_threadpool_pause.argtypes = c.ggml_threadpool_free.argtypes = [vp]
        c.ggml_graph_plan.restype, c.ggml_graph_plan.argtypes = self._CPlan, [vp, ctypes.c_int, vp]
        c.ggml_graph_compute.restype = ctypes.c_int
        c.ggml_graph_compute.argtypes = [vp, ctypes.POINTER(self._CPlan)]
        c.ggml_cpu_init()
        self.n_threads = n_threads
        params = b.ggml_threadpool_params_default(n_threads)
        self.pool = c.ggml_threadpool_new(ctypes.byref(params))

    def pause(self) -> None:
        """Park the pool's polling threads, so they do not load the other candidates' timings."""
        self.cpu.ggml_threadpool_pause(self.pool)

    def matmul(self, data: np.ndarray, ggml_type: int, rows: int, cols: int, x: np.ndarray):
        """(run, close): run() computes x @ dequant(data).T into a ggml tensor and returns it [n, rows]."""
        b, c = self.base, self.cpu
        n = x.shape[0]
        size = data.nbytes + x.nbytes + n * rows * 4 + b.ggml_graph_overhead() + 8 * b.ggml_tensor_overhead()
        ctx = b.ggml_init(self._InitParams(size + (1 << 20), None, False))
        wt = b.ggml_new_tensor_2d(ctx, ggml_type, cols, rows)  # ggml: ne0 is the row length
        xt = b.ggml_new_tensor_2d(ctx, 0, cols, n)  # GGML_TYPE_F32
        yt = b.ggml_mul_mat(ctx, wt, xt)
        graph = b.ggml_new_graph(ctx)
        b.ggml_build_forward_expand(graph, yt)
        ctypes.memmove(b.ggml_get_data(wt), data.ctypes.data, data.nbytes)
        xc = np.ascontiguousarray(x, np.float32)
        ctypes.memmove(b.ggml_get_data(xt), xc.ctypes.data, xc.nbytes)
        plan = c.ggml_graph_plan(graph, self.n_threads, self.pool)
        work = np.empty(max(plan.work_size, 1), np.uint8)
        plan.work_data = work.ctypes.data
        y = np.ctypeslib.as_array(ctypes.cast(b.ggml_get_data(yt), ctypes.POINTER(ctypes.c_float)), shape=(n, rows))

        def run(_keep=(work, plan)):
            if c.ggml_graph_compute(graph, ctypes.byref(plan)) != 0:
                raise RuntimeError("ggml_graph_compute failed")
            return y

        return run, lambda: b.ggml_free(ctx)

    def decode_stack(self, layers: list[dict], head: np.ndarray, ggml_type: int, x: np.ndarray):
        """(run, close) for one graph of `decode_step`'s dataflow on these bytes (see there)."""
        b, c = self.base, self.cpu
        vp = ctypes.c_void_p
        b.ggml_rms_norm.restype, b.ggml_rms_norm.argtypes = vp, [vp, vp, ctypes.c_float]
        b.ggml_mul.restype, b.ggml_mul.argtypes = vp, [vp, vp, vp]
        mats = [m for layer in layers for m in layer.values()] + [head]
        size = sum(m.nbytes for m in mats) + (len(mats) * 4 + 16) * (b.ggml_tensor_overhead() + 4 * 4864 * 4)
        ctx = b.ggml_init(self._InitParams(size + b.ggml_graph_overhead() + (8 << 20), None, False))

        def weight(data, rows, cols):
            t = b.ggml_new_tensor_2d(ctx, ggml_type, cols, rows)
            ctypes.memmove(b.ggml_get_data(t), data.ctypes.data, data.nbytes)
            return t

        xt = b.ggml_new_tensor_2d(ctx, 0, x.shape[1], x.shape[0])
        xc = np.ascontiguousarray(x, np.float32)
        ctypes.memmove(b.ggml_get_data(xt), xc.ctypes.data, xc.nbytes)
        graph = b.ggml_new_graph(ctx)
        h = xt
        for layer in layers:
            w = {k: weight(v, *LAYER_SHAPES[k]) for k, v in layer.items()}
            hn = b.ggml_rms_norm(ctx, h, 1e-6)
            q = b.ggml_mul_mat(ctx, w["q"], hn)
            for k in ("k", "v"):
                b.ggml_build_forward_expand(graph, b.ggml_mul_mat(ctx, w[k], hn))
            o = b.ggml_rms_norm(ctx, b.ggml_mul_mat(ctx, w["o"], q), 1e-6)
            gu = b.ggml_mul(ctx, b.ggml_mul_mat(ctx, w["gate"], o), b.ggml_mul_mat(ctx, w["up"], o))
            h = b.ggml_mul_mat(ctx, w["down"], gu)
        out = b.ggml_mul_mat(ctx, weight(head, *HEAD_SHAPE), b.ggml_rms_norm(ctx, h, 1e-6))
        b.ggml_build_forward_expand(graph, out)
        plan = c.ggml_graph_plan(graph, self.n_threads, self.pool)
        work = np.empty(max(plan.work_size, 1), np.uint8)
        plan.work_data = work.ctypes.data

        def run(_keep=(work, plan)):
            if c.ggml_graph_compute(graph, ctypes.byref(plan)) != 0:
                raise RuntimeError("ggml_graph_compute failed")

        return run, lambda: b.ggml_free(ctx)


def jnp_path():
    try:
        from ruvllm_jax.quant import matmul as qm
    except ImportError:
        return None
    return getattr(qm, "quantized_matmul_jnp", None)


def llc_mbytes() -> int:
    try:
        with open("/sys/devices/system/cpu/cpu0/cache/index3/size") as f:
            text = f.read().strip().upper()
        return int(text[:-1]) // 1024 if text.endswith("K") else int(text.rstrip("M"))
    except (OSError, ValueError):
        return 32


def bench_shape(rows: int, cols: int, ns, rounds: int, rng, with_jnp: bool, ggmls: list, llc_bytes: int,
                variants: dict, one_thread_all: bool = False) -> list[dict]:
    """Every candidate on one weight shape over `rounds` interleaved rounds; best times of

    * hot: one weight, calls back to back (it stays in the last-level cache if it fits);
    * cold: each call on the next of `copies` equal weights that together overflow the LLC twice,
      so its bytes come from memory, as every layer's do in decoding, while the code and the
      runtime stay warm (a cache flush would evict those too, and time XLA's cold dispatch).
    """
    jnp_fn = jnp_path() if with_jnp else None
    big = rows * cols > 50e6  # the vocabulary projection: the slow jnp and f32 paths get fewer calls

    def copies_of(nbytes: int) -> int:
        return 1 if nbytes >= 2 * llc_bytes else -(-2 * llc_bytes // nbytes) + 1

    # (name, qtype, runner factory (weight index -> callable(x)), weight bytes, copies)
    cands = []
    w32 = rng.standard_normal((rows, cols), dtype=np.float32)
    c32 = copies_of(w32.nbytes)
    w32s = [jnp.array(w32) for _ in range(c32)]
    f32 = jax.jit(lambda x, w: (w @ x.T).T)  # XLA's fast GEMV form; x @ w.T is up to 15x slower at n=1
    cands.append(("xla_f32", "F32", lambda i, x: lambda: jax.block_until_ready(f32(x, w32s[i])), w32.nbytes, c32))
    nats = {f" [{label}]" if label else "": (jax.jit(k.matmul), jax.jit(functools.partial(k.matmul, max_threads=1)))
            for label, k in variants.items()}
    jnp_jit = jax.jit(jnp_fn) if jnp_fn is not None else None
    for qtype in QTYPES:
        if cols % FORMATS[qtype].block_size:
            continue
        blocks = random_blocks(qtype, rows, cols, rng)
        c = copies_of(blocks.nbytes)
        ws = [QuantizedTensor(jnp.array(np.array(blocks)), qtype, (rows, cols)) for _ in range(c)]
        fns = []
        for label, (nat, nat1) in nats.items():
            fns.append((f"native {qtype}{label}", nat))
            if qtype == "Q8_0" or one_thread_all:
                fns.append((f"native {qtype} 1 thread{label}", nat1))
        if jnp_jit is not None:
            fns.append((f"jnp {qtype}", jnp_jit))
        for name, fn in fns:
            cands.append((name, qtype, lambda i, x, fn=fn, ws=ws: lambda: jax.block_until_ready(fn(x, ws[i])),
                          blocks.nbytes, c))
        for g in ggmls:
            suffix = "" if g.n_threads == ggmls[0].n_threads else f" {g.n_threads} thread"
            cands.append((f"llama.cpp {qtype}{suffix}", qtype, ("ggml", g, blocks), blocks.nbytes, c))

    out = []
    for n in ns:
        x = jnp.asarray(rng.standard_normal((n, cols), dtype=np.float32))
        runners, closers = {}, []
        for name, qtype, factory, _, c in cands:
            if isinstance(factory, tuple):  # one ggml context (own copy of the bytes) per weight copy
                _, g, blocks = factory
                runners[name] = []
                for _ in range(c):
                    run, close = g.matmul(blocks, FORMATS[qtype].ggml_type, rows, cols, np.asarray(x))
                    runners[name].append(run)
                    closers.append(close)
            else:
                runners[name] = [factory(i, x) for i in range(c)]
            for run in runners[name]:
                run()  # compile, warm up, and fault the pages in
        for g in ggmls:
            g.pause()
        hot = {name: float("inf") for name in runners}
        cold = dict(hot)
        turn = dict.fromkeys(runners, 0)
        for rnd in range(rounds):
            for name, _, factory, _, c in cands:
                slow = big and (name.startswith("jnp") or name == "xla_f32")
                if slow and rnd >= 2:
                    continue
                runs = runners[name]
                for _ in range(2 if slow else 4):  # back to back on one weight: the first of them warms
                    t0 = time.perf_counter()
                    runs[0]()
                    hot[name] = min(hot[name], time.perf_counter() - t0)
                for _ in range(1 if slow else 4):
                    turn[name] = turn[name] % (c - 1) + 1 if c > 1 else 0  # never the hot copy
                    t0 = time.perf_counter()
                    runs[turn[name]]()
                    cold[name] = min(cold[name], time.perf_counter() - t0)
                if isinstance(factory, tuple):
                    factory[1].pause()  # park its polling threads before the next candidate
        for close in closers:
            close()
        for name, qtype, _, nbytes, c in cands:
            out.append(dict(shape=[rows, cols], n=n, impl=name, qtype=qtype, weight_copies=c,
                            hot_seconds=hot[name], cold_seconds=cold[name],
                            hot_gweights_per_s=rows * cols / hot[name] / 1e9,
                            cold_gweights_per_s=rows * cols / cold[name] / 1e9,
                            cold_gbytes_per_s=nbytes / cold[name] / 1e9))
    return out


def rms_norm(h):
    return h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + 1e-6)


def decode_step(x, layers, head, mm):
    """The projections of one decode step of the 0.5B shape, in their dataflow: per layer
    norm -> q, k, v; o(q) -> norm -> gate, up; down(gate * up); then the vocabulary projection.
    (Attention is left out: this times the weight streaming, which is most of decoding.)"""
    h, side = x, jnp.zeros((), jnp.float32)
    for layer in layers:
        hn = rms_norm(h)
        q = mm(hn, layer["q"])
        side = side + mm(hn, layer["k"])[0, 0] + mm(hn, layer["v"])[0, 0]  # computed, as in ggml's graph
        o = rms_norm(mm(q, layer["o"]))
        h = mm(mm(o, layer["gate"]) * mm(o, layer["up"]), layer["down"])
    return mm(rms_norm(h), head), side


def call_jit(f, *args) -> None:
    jax.block_until_ready(f(*args))


def bench_decode_stack(qtypes, n_layers: int, reps: int, rng, ggmls: list, variants: dict) -> list[dict]:
    """Best time of a whole decode step's projections (`decode_step`) per format and engine."""
    n_weights = n_layers * sum(r * c for r, c in LAYER_SHAPES.values()) + HEAD_SHAPE[0] * HEAD_SHAPE[1]
    x = rng.standard_normal((1, 896), dtype=np.float32)
    out = []

    def timed(run) -> float:
        run()
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            run()
            best = min(best, time.perf_counter() - t0)
        return best

    def record(impl, qtype, seconds, nbytes):
        out.append(dict(impl=impl, qtype=qtype, layers=n_layers, weights=n_weights, seconds=seconds,
                        steps_per_s=1 / seconds, gweights_per_s=n_weights / seconds / 1e9,
                        gbytes_per_s=nbytes / seconds / 1e9))

    # f32 anchor: the same step with float32 weights and XLA's fast GEMV form
    layers = [{k: jnp.asarray(rng.standard_normal(s, dtype=np.float32) / 30) for k, s in LAYER_SHAPES.items()}
              for _ in range(n_layers)]
    head = jnp.asarray(rng.standard_normal(HEAD_SHAPE, dtype=np.float32) / 30)
    f = jax.jit(lambda x, layers, head: decode_step(x, layers, head, lambda h, w: (w @ h.T).T))
    record("xla_f32", "F32", timed(functools.partial(call_jit, f, jnp.asarray(x), layers, head)), n_weights * 4)
    del layers, head, f

    for qtype in qtypes:
        fmt = FORMATS[qtype]
        blocks = [{k: random_blocks(qtype, *s, rng) for k, s in LAYER_SHAPES.items()} for _ in range(n_layers)]
        head_blocks = random_blocks(qtype, *HEAD_SHAPE, rng)
        nbytes = sum(m.nbytes for layer in blocks for m in layer.values()) + head_blocks.nbytes
        qlayers = [{k: QuantizedTensor(jnp.asarray(v), qtype, LAYER_SHAPES[k]) for k, v in layer.items()}
                   for layer in blocks]
        qhead = QuantizedTensor(jnp.asarray(head_blocks), qtype, HEAD_SHAPE)
        for mt in (0, 1):
            for label, k in variants.items():
                impl = f"native {qtype}{' 1 thread' if mt else ''}{f' [{label}]' if label else ''}"
                f = jax.jit(lambda x, layers, head, mt=mt, k=k: decode_step(
                    x, layers, head, lambda h, w: k.matmul(h, w, max_threads=mt)))
                record(impl, qtype, timed(functools.partial(call_jit, f, jnp.asarray(x), qlayers, qhead)), nbytes)
        del qlayers, qhead
        for g in ggmls:
            run, close = g.decode_stack(blocks, head_blocks, fmt.ggml_type, x)
            suffix = "" if g.n_threads == ggmls[0].n_threads else f" {g.n_threads} thread"
            record(f"llama.cpp {qtype}{suffix}", qtype, timed(run), nbytes)
            g.pause()
            close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds (best of)")
    ap.add_argument("--shapes", default=",".join(f"{r}x{c}" for r, c in SHAPES), help="rowsxcols,...")
    ap.add_argument("--rows", default="1,8", help="activation rows n, comma separated")
    ap.add_argument("--no-jnp", action="store_true", help="skip the jnp path")
    ap.add_argument("--ggml-threads", type=int, default=2, help="llama.cpp's threads (0: skip llama.cpp)")
    ap.add_argument("--stack-layers", type=int, default=24, help="layers of the decode-step stack (0: skip it)")
    ap.add_argument("--stack-formats", default="Q8_0,Q4_1,Q5_0", help="formats of the decode-step stack")
    ap.add_argument("--variant", action="append", default=[], metavar="LABEL=FLAGS",
                    help="also time the native kernel built with these extra compiler flags (space separated), "
                         "e.g. no_vnni=-DRUVLLM_QMM_NO_VNNI; repeatable")
    ap.add_argument("--one-thread-all", action="store_true",
                    help="time every format on one thread too (the kernels' compute, without the split)")
    ap.add_argument("--out", default=RESULTS)
    args = ap.parse_args()
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",") if s]
    ns = [int(v) for v in args.rows.split(",") if v]

    if not native.available():
        raise SystemExit(f"native kernel unavailable: {native.build_error()}")
    kernel = native.build()
    variants = {"": kernel}
    for v in args.variant:
        label, _, flags = v.partition("=")
        variants[label] = native.build(tuple(flags.split()))
    ggmls = []
    if args.ggml_threads > 0:
        try:
            ggmls = [Ggml(t) for t in sorted({args.ggml_threads, 1}, reverse=True)]  # and 1 thread: the kernels
        except (ImportError, OSError, AttributeError) as e:
            print(f"llama.cpp skipped: {type(e).__name__}: {e}")
    rng = np.random.default_rng(0)
    results = []
    for rows, cols in shapes:
        results += bench_shape(rows, cols, ns, args.rounds, rng, not args.no_jnp, ggmls, llc_mbytes() << 20,
                               variants, args.one_thread_all)

    print(f"{'shape':>12} {'n':>2}  {'impl':<34} {'hot Gw/s':>9} {'cold Gw/s':>9} {'cold GB/s':>9} {'cold us':>9}")
    for r in results:
        print(f"{r['shape'][0]:>6}x{r['shape'][1]:<5} {r['n']:>2}  {r['impl']:<34} {r['hot_gweights_per_s']:>9.2f} "
              f"{r['cold_gweights_per_s']:>9.2f} {r['cold_gbytes_per_s']:>9.2f} {r['cold_seconds'] * 1e6:>9.0f}")
    stack = []
    if args.stack_layers > 0:
        stack = bench_decode_stack([q for q in args.stack_formats.split(",") if q], args.stack_layers,
                                   max(3, 2 * args.rounds), rng, ggmls, variants)
        print(f"\ndecode-step projections, {args.stack_layers} layers + vocabulary, n = 1:")
        print(f"{'impl':<36} {'ms/step':>8} {'steps/s':>8} {'G weights/s':>12} {'GB/s':>7}")
        for r in stack:
            print(f"{r['impl']:<36} {r['seconds'] * 1e3:>8.2f} {r['steps_per_s']:>8.1f} {r['gweights_per_s']:>12.2f} "
                  f"{r['gbytes_per_s']:>7.2f}")
    doc = dict(
        what=("quantized matrix-vector products, jitted single calls, best of rounds; G weights/s = rows*cols/s;"
              " hot: back to back on one weight, cold: rotating over weights that overflow the LLC twice"),
        jax=jax.__version__, cpu=cpu_info(), native=dict(simd=kernel.simd, compile=list(kernel.compile_flags)),
        variants={label: dict(simd=k.simd, flags=list(k.flags)) for label, k in variants.items() if label},
        ggml_threads=[g.n_threads for g in ggmls], rounds=args.rounds,
        time=time.strftime("%Y-%m-%d %H:%M:%S"), results=results, decode_stack=stack,
    )
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
