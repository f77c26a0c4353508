"""Would `lax.scan` over the layers bring the quantized first generation under 1.25x the weights?

    python experiments/scan_memory.py                      # 0.5B shape, Q8_0: unrolled / scan, cold / warm
    python experiments/scan_memory.py --layers=24 --rounds=3

The model code walks its layers in a Python loop, so the prefill and decode programs hold every
layer's kernels (~40 a layer) and XLA:CPU keeps ~83 KB of RSS per kernel (`compile_heap.py`). This
measures the alternative before anyone rewrites the params layout for it: the 0.5B shape with
random Q8_0 weights (tied Q8_0 embedding, like the GGUF `bench_decode` races), built here in two
layouts, and the first generation (a 32-token prompt, then 128 greedy tokens in one on-device
loop) run through `ruvllm_jax.models.llama`'s own layer body (`_block`) and attention, with

* `unrolled`: a tuple of per-layer weights and per-layer caches, a Python loop over the layers (the
  engine's layout);
* `scan`: weights stacked on a leading layer axis and one [L, ...] cache, `lax.scan` over the layers,
  each layer's K/V written into the stacked cache in place.

and two compile orders: `cold`, the programs compiled after the weights exist (what a user's first
generation does), and `warm`, compiled from shapes alone (`jit(...).lower(ShapeDtypeStruct).compile()`)
before any weight is built, as a server would at start-up for its known buckets. `:trim` returns
the heap's free pages to the OS (`host_memory.release_free_heap`, malloc_trim) after the compiles
and after the prefill run; without it the freed compile and run buffers stay resident.

Each (layout, order) runs in a fresh process, `--rounds` times alternating; peak RSS (VmHWM, reset
after the imports) minus the RSS then, over the weights' bytes, is the issue's one-copy figure.
Not the engine: no tokenizer, no sampling program, a contiguous cache written in place rather than
the engine's segmented one, so the `unrolled` row calibrates the figure against `bench_decode`'s.
Caveat for speed: `scan` slices each layer's weights out of the stack, and XLA copies a slice that
feeds a custom call, so its decode tok/s is a floor (a real implementation would hand the kernel
the stacked buffer and the layer index). Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

from memory_stages import _status_gb  # this folder is on sys.path when a script here runs

_HERE = os.path.dirname(os.path.abspath(__file__))
SHAPE = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_heads=14, num_kv_heads=2, head_dim=64)


def child(layout: str, order: str, layers: int, prompt: int, new: int, max_len: int, trim: bool = False) -> dict:
    import functools

    import jax
    import jax.numpy as jnp
    import numpy as np

    from ruvllm_jax import host_memory
    from ruvllm_jax.cache.base import KVPart
    from ruvllm_jax.kernels import KernelOptions
    from ruvllm_jax.models import attention, llama, weights_io
    from ruvllm_jax.models.config import LlamaConfig
    from ruvllm_jax.quant.tensor import FORMATS, QuantizedTensor

    cfg = LlamaConfig(num_layers=layers, rope_theta=1e6, tie_word_embeddings=True, attention_bias=True,
                      model_type="qwen2", **SHAPE)
    kernel = KernelOptions(impl="auto")
    scale = cfg.attention_config().effective_scale()
    e, kvh, d = cfg.hidden_size, cfg.num_kv_heads, cfg.head_dim
    qkv = cfg.q_size + 2 * cfg.kv_size
    mats = {"wqkv": (qkv, e), "wo": (e, cfg.q_size), "w_gate_up": (2 * cfg.intermediate_size, e),
            "w_down": (e, cfg.intermediate_size)}
    vecs = {"attn_norm": e, "bqkv": qkv, "mlp_norm": e}
    row_bytes = lambda cols: cols // 32 * FORMATS["Q8_0"].type_size  # noqa: E731
    stack = (layers,) if layout == "scan" else ()

    def q8_blocks(lead, rows, cols, rng):
        """Random valid Q8_0 blocks (int8 codes, f16 scales 1e-3: values ~0.1) as a device array, built
        the way the loaders build weights: one aligned host buffer filled in chunks, which XLA:CPU
        adopts without a copy (`weights_io`), so no second copy of the weights ever exists."""
        out = weights_io.aligned_empty((*lead, rows, row_bytes(cols)), np.uint8)
        blocks = out.reshape(-1, cols // 32, 34)
        scale = np.full((1, 1), 1e-3, np.float16).view(np.uint8)
        for start in range(0, len(blocks), 4096):
            chunk = blocks[start:start + 4096]
            chunk[:] = rng.integers(-127, 128, chunk.shape, dtype=np.int8).view(np.uint8)
            chunk[..., 0:2] = scale
        return weights_io.place(out)

    def one_layer(lead, rng):
        layer = {k: QuantizedTensor(q8_blocks(lead, *s, rng), "Q8_0", s) for k, s in mats.items()}
        return layer | {k: (jnp.ones if "norm" in k else jnp.zeros)((*lead, n), jnp.float32) for k, n in vecs.items()}

    def build_params(rng):
        layer = one_layer(stack, rng) if layout == "scan" else tuple(one_layer((), rng) for _ in range(layers))
        return {"embed": QuantizedTensor(q8_blocks((), cfg.vocab_size, e, rng), "Q8_0",
                                         (cfg.vocab_size, e)),
                "final_norm": jnp.ones((e,), jnp.float32), "layers": layer}

    def abstract_params():
        qt = lambda lead, s: QuantizedTensor(jax.ShapeDtypeStruct((*lead, s[0], row_bytes(s[1])), jnp.uint8),  # noqa: E731
                                             "Q8_0", s)
        layer = {k: qt(stack, s) for k, s in mats.items()}
        layer |= {k: jax.ShapeDtypeStruct((*stack, n), jnp.float32) for k, n in vecs.items()}
        if layout == "unrolled":
            layer = tuple(dict(layer) for _ in range(layers))
        return {"embed": qt((), (cfg.vocab_size, e)), "final_norm": jax.ShapeDtypeStruct((e,), jnp.float32),
                "layers": layer}

    cache_shape = (layers, 1, kvh, max_len, d) if layout == "scan" else (1, kvh, max_len, d)

    def prompt_attend(q, k, v, *, write):
        out = attention.attend_prompt(q, k, v, scale=scale, sliding_window=None, kernel=kernel)
        return out, write(k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3))  # [1, KVH, S, D]

    def token_attend(q, k, v, *, pos, write, read):
        write(k[:, :, None, :], v[:, :, None, :])
        k_l, v_l = read()
        out = attention.attend_parts(q, [KVPart(k_l, v_l, pos[None] + 1)], scale=scale, sliding_window=None,
                                     kernel=kernel)
        return out, None

    def run_layers(params, x, cos, sin, cache, attend_factory):
        """x through every layer; attend_factory(cell) -> the layer's attend, cell = [k cache, v cache, layer]."""
        if layout == "unrolled":
            ks, vs = list(cache[0]), list(cache[1])
            for i, lp in enumerate(params["layers"]):
                cell = [ks, vs, i]
                x, _ = llama._block(lp, cfg, x, cos, sin, None, attend_factory(cell), kernel)
            return x, (tuple(ks), tuple(vs))

        def body(carry, xs):
            x, kc, vc = carry
            lp, i = xs
            cell = [kc, vc, i]
            x, _ = llama._block(lp, cfg, x, cos, sin, None, attend_factory(cell), kernel)
            return (x, cell[0], cell[1]), None

        (x, kc, vc), _ = jax.lax.scan(body, (x, *cache), (params["layers"], jnp.arange(layers)))
        return x, (kc, vc)

    def store(cell, k_new, v_new, at):
        """Write k/v [1, KVH, n, D] into the cell's layer at token `at` (in place in the loop)."""
        kc, vc, i = cell
        if layout == "unrolled":
            kc[i] = jax.lax.dynamic_update_slice(kc[i], k_new, (0, 0, at, 0))
            vc[i] = jax.lax.dynamic_update_slice(vc[i], v_new, (0, 0, at, 0))
        else:
            cell[0] = jax.lax.dynamic_update_slice(kc, k_new[None], (i, 0, 0, at, 0))
            cell[1] = jax.lax.dynamic_update_slice(vc, v_new[None], (i, 0, 0, at, 0))

    def read(cell):
        kc, vc, i = cell
        if layout == "unrolled":
            return kc[i], vc[i]
        return (jax.lax.dynamic_index_in_dim(cell[0], i, keepdims=False),
                jax.lax.dynamic_index_in_dim(cell[1], i, keepdims=False))

    def prefill(params, tokens):
        zeros = jnp.zeros(cache_shape, jnp.float32)
        cache = (zeros, zeros) if layout == "scan" else ((zeros,) * layers, (zeros,) * layers)
        x = llama.embed(params, tokens)
        cos, sin = llama.rope_tables(cfg, jnp.arange(tokens.shape[1])[None])
        factory = lambda cell: functools.partial(prompt_attend, write=lambda k, v: store(cell, k, v, 0))  # noqa: E731
        x, cache = run_layers(params, x, cos, sin, cache, factory)
        logits = llama.head_logits(params, cfg, x[:, -1])
        return jnp.argmax(logits, -1).astype(jnp.int32), cache

    def decode(params, cache, token, pos):
        def step(j, carry):
            tok, cache, out = carry
            p = pos + j
            x = llama.embed(params, tok[:, None])[:, 0]
            cos, sin = llama.rope_tables(cfg, p[None])
            factory = lambda cell: functools.partial(  # noqa: E731
                token_attend, pos=p, write=lambda k, v: store(cell, k, v, p), read=lambda: read(cell))
            x, cache = run_layers(params, x, cos, sin, cache, factory)
            tok = jnp.argmax(llama.head_logits(params, cfg, x), -1).astype(jnp.int32)
            return tok, cache, out.at[j].set(tok[0])

        return jax.lax.fori_loop(0, new, step, (token, cache, jnp.zeros((new,), jnp.int32)))[2]

    prefill_jit = jax.jit(prefill)
    decode_jit = jax.jit(decode, donate_argnums=1)
    tokens = jnp.asarray((np.arange(prompt) * 7 + 3)[None] % cfg.vocab_size, jnp.int32)
    base = _status_gb("VmRSS")
    base_file, base_anon = _status_gb("RssFile"), _status_gb("RssAnon")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    t0 = time.perf_counter()

    def compile_both():
        ap = abstract_params()
        pf = prefill_jit.lower(ap, jax.ShapeDtypeStruct(tokens.shape, jnp.int32)).compile()
        cs = jax.ShapeDtypeStruct(cache_shape, jnp.float32)
        cache = (cs, cs) if layout == "scan" else ((cs,) * layers, (cs,) * layers)
        dc = decode_jit.lower(ap, cache, jax.ShapeDtypeStruct((1,), jnp.int32),
                              jax.ShapeDtypeStruct((), jnp.int32)).compile()
        return pf, dc

    if order == "warm":
        pf, dc = compile_both()
    compiled_s = time.perf_counter() - t0
    params = build_params(np.random.default_rng(0))
    jax.block_until_ready(params)
    weights = sum(x.nbytes for x in jax.tree_util.tree_leaves(params)) / 1e9
    after_weights = _status_gb("VmRSS") - base
    if order == "cold":
        t1 = time.perf_counter()
        pf, dc = compile_both()
        compiled_s = time.perf_counter() - t1
    if trim:
        host_memory.release_free_heap()
    stages = {"weights": after_weights, "compiled": _status_gb("VmRSS") - base}
    tok, cache = pf(params, tokens)
    jax.block_until_ready(cache)
    if trim:
        host_memory.release_free_heap()
    stages["prefill run"] = _status_gb("VmRSS") - base
    out = dc(params, cache, tok, jnp.int32(prompt))
    jax.block_until_ready(out)
    stages["decode run"] = _status_gb("VmRSS") - base
    peak = _status_gb("VmHWM") - base
    after = _status_gb("VmRSS") - base
    # what stays beyond the weights, split: file pages (libjax's code paged in) and anonymous memory
    after_file, after_anon = _status_gb("RssFile") - base_file, _status_gb("RssAnon") - base_anon - weights
    kernels, temps = {}, {}
    for name, c in (("prefill", pf), ("decode", dc)):
        text = c.as_text()
        temps[name] = c.memory_analysis().temp_size_in_bytes / 1e9
        kernels[name] = sum(text.count(op) for op in (" fusion(", " custom-call(", " copy(", " dot(", " convolution("))
    host_memory.release_free_heap()
    stages["after malloc_trim"] = _status_gb("VmRSS") - base
    t2 = time.perf_counter()
    tok, cache = pf(params, tokens)
    jax.block_until_ready(dc(params, cache, tok, jnp.int32(prompt)))
    second = time.perf_counter() - t2
    return dict(layout=layout, order=order, trim=trim, layers=layers, weights_gb=weights,
                after_weights_gb=after_weights,
                peak_beyond_gb=peak - weights, peak_over_weights=peak / weights, after_over_weights=after / weights,
                after_file_gb=after_file, after_anon_beyond_weights_gb=after_anon, compile_s=compiled_s,
                kernels=kernels, temp_gb=temps, second_generation_s=second, rss_by_stage_gb=stages,
                decode_tok_s_floor=new / second)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--max-len", type=int, default=1024)
    ap.add_argument("--runs", default="unrolled:cold,unrolled:cold:trim,unrolled:warm:trim,scan:cold,scan:cold:trim,"
                                      "scan:warm:trim",
                    help="layout:order[:trim], comma separated; trim: malloc_trim after the compiles and the prefill")
    ap.add_argument("--child", default="")
    ap.add_argument("--out", default=os.path.join(_HERE, "results", "scan_memory.json"))
    a = ap.parse_args()
    if a.child:
        layout, order, *more = a.child.split(":")
        print(json.dumps(child(layout, order, a.layers, a.prompt, a.new, a.max_len, trim=more == ["trim"])))
        return
    env = dict(os.environ, RUVLLM_JAX_COMPILATION_CACHE="0", JAX_ENABLE_COMPILATION_CACHE="false")
    runs: dict[str, list[dict]] = {}
    for rnd in range(a.rounds):
        for spec in a.runs.split(","):
            print(f"round {rnd + 1}: {spec} ...", flush=True)
            cmd = [sys.executable, __file__, "--child", spec, "--layers", str(a.layers), "--prompt", str(a.prompt),
                   "--new", str(a.new), "--max-len", str(a.max_len)]
            p = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if p.returncode:
                raise SystemExit(f"{spec} failed:\n{p.stderr[-3000:]}")
            runs.setdefault(spec, []).append(json.loads(p.stdout.strip().splitlines()[-1]))
    rows = []
    print(f"\n{'layout':9s} {'order':10s} {'weights GB':>10s} {'peak/weights':>12s} {'beyond GB':>9s} "
          f"{'after/weights':>13s} {'file GB':>7s} {'anon GB':>7s} {'compile s':>9s} {'kernels p/d':>11s} "
          f"{'tok/s floor':>11s}")
    for rs in runs.values():
        med = {k: statistics.median(r[k] for r in rs) for k in rs[0] if isinstance(rs[0][k], float)}
        row = {**rs[0], **med, "peak_over_weights_runs": [r["peak_over_weights"] for r in rs]}
        rows.append(row)
        order = row["order"] + (" trim" if row["trim"] else "")
        print(f"{row['layout']:9s} {order:10s} {row['weights_gb']:10.3f} {row['peak_over_weights']:12.2f} "
              f"{row['peak_beyond_gb']:9.3f} {row['after_over_weights']:13.2f} {row['after_file_gb']:7.3f} "
              f"{row['after_anon_beyond_weights_gb']:7.3f} {row['compile_s']:9.1f} "
              f"{row['kernels']['prefill']:>5d}/{row['kernels']['decode']:<5d} {row['decode_tok_s_floor']:11.1f}")
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump({"machine": {"platform": platform.platform(), "cpus": os.cpu_count()}, "args": vars(a),
                   "rows": rows}, f, indent=1)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
