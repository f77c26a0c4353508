"""The Llama-family decoder (Llama, Qwen2, Mistral) as pure functions over a params pytree.

Params layout (weights in PyTorch's [out, in] order, which XLA:CPU multiplies fastest as `x @ w.T`):

    {"embed": [V, E], "final_norm": [E], "lm_head": [V, E] (absent when tied),
     "layers": ({"attn_norm": [E], "wqkv": [(H + 2 KVH) D, E], "bqkv"?: [...], "wo": [E, H D],
                 "bo"?: [E], "mlp_norm": [E], "w_gate_up": [2 I, E], "b_gate_up"?, "w_down": [E, I],
                 "b_down"?}, ...)}

(axes as in the package docstring: E hidden size, D head_dim, I MLP width, V vocabulary)

Q/K/V and gate/up are fused so decode runs two large GEMVs instead of five small ones. Layers are a
tuple, walked by a Python loop; a `lax.scan` over stacked layers would hold the weights twice or copy
each layer's out of the stack. The one exception is a cached prefill or decode whose layers' matrices
are all native-kernel `QuantizedTensor`s (a GGUF model): consecutive layers alike in shapes run as one
`lax.scan` whose products hand the native kernel every layer's blocks and the scan's index
(`layer_quantized_matmul`), so no weight is stacked or copied, over a cache whose layers are stacked
(`ContiguousKVCache.init(stacked=True)`; the engine's `EngineConfig(layer_scan=True)`). The program
then holds one layer body per run instead of one per layer (24x fewer kernels for a uniform 0.5B
GGUF), and compiling it is most of what a quantized model's first generation needs beyond its
weights (`experiments/memory_stages.py`). `KernelOptions(layer_scan=False)` turns it off. Everything
computes in float32. Any 2-D weight may instead be a `ruvllm_jax.quant.QuantizedTensor` (GGML
blocks) or a tuple of weights stacked along `out`.

Optional `adapters` add LoRA deltas `scaling * (x @ A) @ B` per layer and module ("q", "k", "v",
"o", "gate", "up", "down"); they are jit arguments, so new adapter values never recompile.

Every layer runs one body (`_block`): norm, fused projections and adapters, RoPE, attention, MLP.
Attention goes through `ruvllm_jax.models.attention` over whatever the cache hands it (see
`ruvllm_jax.cache.base`). `kernel=` (a `KernelOptions`) chooses how the kernels run, with
`impl=` / `interpret=` as shorthands: "auto" is Pallas on GPU/TPU and jnp on CPU;
`interpret=True` runs the Pallas kernels on CPU, for tests.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Optional

import chex
import jax
import jax.numpy as jnp

from ruvllm_jax.cache.contiguous import ContiguousKVCache
from ruvllm_jax.cache.segmented import SegmentedKVCache
from ruvllm_jax.errors import ConfigError
from ruvllm_jax.kernels import KernelOptions
from ruvllm_jax.models import attention
from ruvllm_jax.models.config import LlamaConfig
from ruvllm_jax.quant.matmul import (
    embed_rows,
    layer_quantized_matmul,
    native_available,
    quantized_matmul,
    quantized_matmul_sharded,
)
from ruvllm_jax.quant.tensor import QuantizedTensor

Params = dict[str, Any]
Adapters = Optional[dict[str, Any]]


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    x32 = x.astype(jnp.float32)
    var = jnp.mean(x32 * x32, axis=-1, keepdims=True)
    return weight.astype(jnp.float32) * (x32 * jax.lax.rsqrt(var + eps))


def rope_tables(cfg: LlamaConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos, sin [..., head_dim // 2] for integer positions [...]."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(cfg.inv_freq())
    return jnp.cos(freqs), jnp.sin(freqs)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate-half RoPE as in transformers. x [..., heads, D]; cos/sin [..., D/2] broadcast over heads."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    cos, sin = cos[..., None, :], sin[..., None, :]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


ROW_REDUCE_MAX_ROWS = 16  # see `_linear`


@dataclasses.dataclass(frozen=True)
class _ScannedWeight:
    """One layer's weight inside a `lax.scan` over layers: every layer's blocks and the scan's index."""

    ws: tuple[QuantizedTensor, ...]
    index: jax.Array

    @property
    def shape(self) -> tuple[int, int]:
        return self.ws[0].shape


def _linear(x: jax.Array, w, b: Optional[jax.Array], kernel: KernelOptions) -> jax.Array:
    """x [..., in] @ w[out, in].T (+ b) in float32.

    `w` is a float array, a `QuantizedTensor` (GGML blocks, multiplied by `quantized_matmul`
    without dequantizing the matrix; per shard on `kernel.mesh`), or a tuple of those stacked along
    `out` (a fused weight whose parts a GGUF stores in different formats, or the split layout of a mesh).

    Contracts with w's input axis directly: a `w.T` inside a while loop makes XLA:CPU copy the
    transposed weights every iteration. One row is a GEMV that streams the weights at memory
    speed; but for 2..16 rows (a batched decode step) XLA:CPU's GEMM packs the whole weight matrix
    on every call and ran at half the speed of a multiply-and-reduce over whole rows, which
    streams it once for all of them (2.3x faster at 8 rows of the 0.5B shape's MLP).
    """
    if isinstance(w, tuple):
        y = jnp.concatenate([_linear(x, part, None, kernel) for part in w], axis=-1)
        return y if b is None else y + b.astype(jnp.float32)
    if isinstance(w, _ScannedWeight):
        y = layer_quantized_matmul(x.astype(jnp.float32), w.index, w.ws)
        return y if b is None else y + b.astype(jnp.float32)
    if isinstance(w, QuantizedTensor):
        x = x.astype(jnp.float32)
        if kernel.mesh is None:
            y = quantized_matmul(x, w, impl=kernel.quantized_matmul)
        else:
            y = quantized_matmul_sharded(x, w, kernel.mesh, kernel.quantized_matmul)
        return y if b is None else y + b.astype(jnp.float32)
    w = w.astype(jnp.float32)
    rows = math.prod(x.shape[:-1])
    if 2 <= rows <= ROW_REDUCE_MAX_ROWS and jax.default_backend() == "cpu":
        y = jnp.sum(w[None] * x.reshape(rows, 1, x.shape[-1]), axis=-1).reshape(*x.shape[:-1], w.shape[0])
    else:
        y = jax.lax.dot_general(x, w, (((x.ndim - 1,), (1,)), ((), ())))
    return y if b is None else y + b.astype(jnp.float32)


def lora_delta(x: jax.Array, adapter: dict[str, jax.Array]) -> jax.Array:
    """scaling * (x @ A) @ B for one module's adapter {"A": [in, r], "B": [r, out], "scaling": []}."""
    return ((x @ adapter["A"]) @ adapter["B"]) * adapter["scaling"]


def _with_lora(y: jax.Array, x: jax.Array, layer_adapters: Optional[dict], name: str) -> jax.Array:
    if layer_adapters is not None and name in layer_adapters:
        return y + lora_delta(x, layer_adapters[name])
    return y


def _with_fused_lora(y: jax.Array, x: jax.Array, layer_adapters: Optional[dict], slots: dict) -> jax.Array:
    """Add the adapters of several modules that share one fused weight with a single matmul pair.

    `slots` maps module name -> (start, size) in y's last axis. The adapters' A are concatenated
    along the rank axis and their scaled B placed block-diagonally, so q/k/v (or gate/up) cost one
    low-rank product instead of one each; the blocks are loop-invariant, so XLA builds them once.
    """
    names = [n for n in slots if layer_adapters is not None and n in layer_adapters]
    if not names:
        return y
    a = jnp.concatenate([layer_adapters[n]["A"] for n in names], axis=1)
    b = jnp.zeros((a.shape[1], y.shape[-1]), y.dtype)
    row = 0
    for n in names:
        ad, (start, size) = layer_adapters[n], slots[n]
        rank = ad["A"].shape[1]
        b = b.at[row : row + rank, start : start + size].set(ad["B"] * ad["scaling"])
        row += rank
    return y + (x @ a) @ b


def _projections(h: jax.Array, w, b: Optional[jax.Array], la: Optional[dict], slots: dict,
                 kernel: KernelOptions) -> list[jax.Array]:
    """The outputs of a fused projection (q/k/v or gate/up), one per module of `slots` (name ->
    (start, size) in the fused output), adapters added.

    A tuple of exactly one part per module (the split layout of a mesh, see `ruvllm_jax.sharding`)
    multiplies part by part, so each output keeps its part's sharding; otherwise one fused product
    and one fused adapter product, split after.
    """
    sizes = [size for _, size in slots.values()]
    if isinstance(w, tuple) and [p.shape[0] for p in w] == sizes:
        outs = []
        for (name, (start, size)), part in zip(slots.items(), w, strict=True):
            y = _linear(h, part, None if b is None else b[start:start + size], kernel)
            outs.append(_with_lora(y, h, la, name))
        return outs
    y = _with_fused_lora(_linear(h, w, b, kernel), h, la, slots)
    starts = [start for start, _ in slots.values()]
    return jnp.split(y, starts[1:], axis=-1)


def _qkv(lp: Params, cfg: LlamaConfig, h: jax.Array, la: Optional[dict], kernel: KernelOptions):
    q_kv = cfg.q_size + cfg.kv_size
    slots = {"q": (0, cfg.q_size), "k": (cfg.q_size, cfg.kv_size), "v": (q_kv, cfg.kv_size)}
    return _projections(h, lp["wqkv"], lp.get("bqkv"), la, slots, kernel)


def _mlp(lp: Params, cfg: LlamaConfig, x: jax.Array, la: Optional[dict], kernel: KernelOptions) -> jax.Array:
    h = rms_norm(x, lp["mlp_norm"], cfg.rms_norm_eps)
    inter = cfg.intermediate_size
    gate, up = _projections(h, lp["w_gate_up"], lp.get("b_gate_up"), la, {"gate": (0, inter), "up": (inter, inter)},
                            kernel)
    act = jax.nn.silu(gate) * up
    return x + _with_lora(_linear(act, lp["w_down"], lp.get("b_down"), kernel), act, la, "down")


def _attn_out(lp: Params, attn: jax.Array, la: Optional[dict], kernel: KernelOptions) -> jax.Array:
    return _with_lora(_linear(attn, lp["wo"], lp.get("bo"), kernel), attn, la, "o")


def _layer_adapters(adapters: Adapters, i: int) -> Optional[dict]:
    return None if adapters is None else adapters["layers"][i]


def _logits(params: Params, cfg: LlamaConfig, x: jax.Array, kernel: KernelOptions) -> jax.Array:
    h = rms_norm(x, params["final_norm"], cfg.rms_norm_eps)
    head = params["embed"] if cfg.tie_word_embeddings else params["lm_head"]
    return _linear(h, head, None, kernel)


def _block(lp: Params, cfg: LlamaConfig, x: jax.Array, cos: jax.Array, sin: jax.Array, la: Optional[dict],
           attend: Callable, kernel: KernelOptions):
    """One decoder layer, the same for prefill, decode, training and scoring.

    x [..., E] with leading axes (B, S) or (B,); cos/sin broadcast against them. `attend(q, k,
    v)` gets the rotated q [..., H, D], k, v [..., KVH, D] and returns (out [..., H, D], cache).
    """
    lead = x.shape[:-1]
    h = rms_norm(x, lp["attn_norm"], cfg.rms_norm_eps)
    q, k, v = _qkv(lp, cfg, h, la, kernel)
    q = apply_rope(q.reshape(*lead, cfg.num_heads, cfg.head_dim), cos, sin)
    k = apply_rope(k.reshape(*lead, cfg.num_kv_heads, cfg.head_dim), cos, sin)
    v = v.reshape(*lead, cfg.num_kv_heads, cfg.head_dim)
    out, cache = attend(q, k, v)
    chex.assert_shape(out, q.shape)
    x = x + _attn_out(lp, out.reshape(*lead, cfg.q_size), la, kernel)
    return _mlp(lp, cfg, x, la, kernel), cache


def _prompt_attend(q, k, v, *, cache, layer, window: Optional[int], cfg: LlamaConfig, kernel: KernelOptions,
                   lengths=None, start=None):
    context = None if start is None else cache.context(layer, start)
    out = attention.attend_prompt(q, k, v, scale=cfg.attention_config().effective_scale(),
                                  sliding_window=window, kernel=kernel, context=context)
    if cache is None:
        return out, None
    return out, (cache.write_prompt(layer, k, v, lengths) if start is None
                 else cache.write_prompt(layer, k, v, lengths, start=start))


def _token_attend(q, k, v, *, cache, layer, window: Optional[int], positions, cfg: LlamaConfig,
                  kernel: KernelOptions):
    ordered = hasattr(cache, "read")  # caches that write after attention read them (see cache.base)
    if ordered:
        parts = cache.read(layer, k, v, positions)
    else:
        cache, parts = cache.append(layer, k, v, positions)
    out = attention.attend_parts(q, parts, scale=cfg.attention_config().effective_scale(),
                                 sliding_window=window, kernel=kernel)
    if ordered:
        cache = cache.write(layer, k, v, positions, after=out)
    return out, cache


def _kernel(kernel: Optional[KernelOptions], impl: Optional[str], interpret: Optional[bool]) -> KernelOptions:
    """`kernel`, or one built from the `impl` / `interpret` shorthands (not both)."""
    if kernel is None:
        return KernelOptions(impl="auto" if impl is None else impl, interpret=bool(interpret))
    if impl is not None or interpret is not None:
        raise ConfigError("pass either kernel= or impl=/interpret=, not both")
    return kernel


def embed(params: Params, tokens: jax.Array) -> jax.Array:
    """Token embeddings in f32: tokens [B, S] -> x [B, S, E], the residual stream entering layer 0."""
    return embed_rows(params["embed"], tokens)


def _weight_signature(w):
    """What a layer's entry must share with its neighbours' to scan with them; None: it cannot scan
    (a float matrix, which the scan would have to stack: a second copy of the weights)."""
    from ruvllm_jax.quant.native import SUPPORTED

    if isinstance(w, QuantizedTensor):
        return ("q", w.shape) if w.qtype in SUPPORTED else None
    if isinstance(w, tuple):
        parts = tuple(_weight_signature(p) for p in w)
        return None if None in parts else ("t", parts)
    if getattr(w, "ndim", 2) <= 1:  # norms and biases: stacking them copies a few KB
        return ("f", tuple(w.shape), str(w.dtype))
    return None


def _layer_signature(lp: Params, window: Optional[int]):
    entries = tuple((name, _weight_signature(lp[name])) for name in sorted(lp))
    return None if any(sig is None for _, sig in entries) else (window, entries)


def _layer_runs(params: Params, cfg: LlamaConfig, start: int, stop: int, cache, adapters: Adapters,
                kernel: KernelOptions) -> list[tuple[int, int, bool]]:
    """[(first, end, scanned)] covering layers [start, stop): runs of >= 2 consecutive layers with one
    signature scan when the step can (a stacked contiguous or segmented cache, no adapters, no mesh,
    the native kernel); everything else, and every uncached pass (training differentiates it), unrolls."""
    contiguous = cache.base if isinstance(cache, SegmentedKVCache) else cache
    if not (adapters is None and isinstance(contiguous, ContiguousKVCache) and contiguous.stacked):
        return [(start, stop, False)]
    return _signature_runs(params, cfg, start, stop, kernel)


def _signature_runs(params: Params, cfg: LlamaConfig, start: int, stop: int,
                    kernel: KernelOptions) -> list[tuple[int, int, bool]]:
    if not (kernel.layer_scan and kernel.mesh is None and kernel.quantized_matmul != "jnp" and stop - start >= 2
            and jax.default_backend() == "cpu" and native_available()):
        return [(start, stop, False)]
    sigs = [_layer_signature(params["layers"][i], cfg.sliding_windows[i]) for i in range(start, stop)]
    runs: list[tuple[int, int, bool]] = []
    i = start
    while i < stop:
        j = i + 1
        while sigs[i - start] is not None and j < stop and sigs[j - start] == sigs[i - start]:
            j += 1
        scanned = j - i >= 2
        if runs and not scanned and not runs[-1][2]:
            runs[-1] = (runs[-1][0], j, False)
        else:
            runs.append((i, j, scanned))
        i = j
    return runs


def layers_scan(params: Params, cfg: LlamaConfig, kernel: Optional[KernelOptions] = None) -> bool:
    """Whether a cached prefill or decode over a stacked cache (no adapters) would run some of these
    layers as a `lax.scan`: the engine then stacks its cache (`EngineConfig.layer_scan`)."""
    return any(scanned for _, _, scanned in _signature_runs(params, cfg, 0, cfg.num_layers,
                                                            _kernel(kernel, None, None)))


def _gather(values: list):
    """One entry of every layer in a run, for `_select`: blocks kept per layer, small floats stacked."""
    if isinstance(values[0], QuantizedTensor):
        return ("q", tuple(values))
    if isinstance(values[0], tuple):
        return ("t", tuple(_gather([v[k] for v in values]) for k in range(len(values[0]))))
    return ("f", jnp.stack([jnp.asarray(v) for v in values]))


def _select(gathered, j: jax.Array):
    kind, value = gathered
    if kind == "q":
        return _ScannedWeight(value, j)
    if kind == "t":
        return tuple(_select(part, j) for part in value)
    return value[j]


def _layers(params, cfg, x, cache, adapters, kernel, start: int, stop: int, cos, sin, make_attend: Callable):
    """x (and the cache) through layers [start, stop); `make_attend(cache, layer, window)` gives a
    layer's attention over the cache as it is then, `layer` an int or, inside a scan, the traced index."""
    for first, end, scanned in _layer_runs(params, cfg, start, stop, cache, adapters, kernel):
        if not scanned:
            for i in range(first, end):
                x, cache = _block(params["layers"][i], cfg, x, cos, sin, _layer_adapters(adapters, i),
                                  make_attend(cache, i, cfg.sliding_windows[i]), kernel)
            continue
        names = sorted(params["layers"][first])
        gathered = {n: _gather([params["layers"][i][n] for i in range(first, end)]) for n in names}
        window = cfg.sliding_windows[first]

        def body(carry, i, gathered=gathered, first=first, window=window):
            x, cache = carry
            lp = {n: _select(g, i - first) for n, g in gathered.items()}
            return _block(lp, cfg, x, cos, sin, None, make_attend(cache, i, window), kernel), None

        (x, cache), _ = jax.lax.scan(body, (x, cache), jnp.arange(first, end, dtype=jnp.int32))
    return x, cache


def _prompt_layers(params, cfg, x, cache, adapters, kernel, start: int, stop: int, lengths=None, offset=None):
    s = x.shape[1]
    positions = jnp.arange(s)[None, :] if offset is None else offset[:, None] + jnp.arange(s)[None, :]
    cos, sin = rope_tables(cfg, positions)

    def make_attend(cache, layer, window):
        return functools.partial(_prompt_attend, cache=cache, layer=layer, window=window, cfg=cfg, kernel=kernel,
                                 lengths=lengths, start=offset)

    return _layers(params, cfg, x, cache, adapters, kernel, start, stop, cos, sin, make_attend)


def run_layers(
    params: Params, cfg: LlamaConfig, x: jax.Array, start: int, stop: int, *, adapters: Adapters = None,
    kernel: Optional[KernelOptions] = None,
) -> jax.Array:
    """The residual stream x [B, S, E] (positions 0..S-1) through layers [start, stop), no cache.

    `forward` is `head_logits(run_layers(embed(tokens), 0, num_layers))`; splitting it lets a learner
    run the layers it does not train once, without a gradient, and differentiate only the rest.
    """
    if not 0 <= start <= stop <= cfg.num_layers:
        raise ConfigError(f"layers [{start}, {stop}) are not a range of the model's {cfg.num_layers} layers")
    return _prompt_layers(params, cfg, x, None, adapters, _kernel(kernel, None, None), start, stop)[0]


def head_logits(params: Params, cfg: LlamaConfig, x: jax.Array, *, kernel: Optional[KernelOptions] = None
                ) -> jax.Array:
    """Final norm and vocabulary projection: x [..., E] -> logits [..., V]."""
    return _logits(params, cfg, x, _kernel(kernel, None, None))


def prefill(
    params: Params,
    cfg: LlamaConfig,
    tokens: jax.Array,
    cache=None,
    *,
    adapters: Adapters = None,
    kernel: Optional[KernelOptions] = None,
    impl: Optional[str] = None,
    interpret: Optional[bool] = None,
    logit_positions: Optional[jax.Array] = None,
    lengths: Optional[jax.Array] = None,
    start: Optional[jax.Array] = None,
):
    """Run a prompt. tokens [B, S] at positions 0..S-1 -> (logits, cache).

    Logits are [B, S, V], or [B, V] at `logit_positions` [B] when given (generation needs only the
    last real token, and the vocabulary projection is the largest matmul of the model). With no
    cache, keys and values are attended and dropped (training, scoring). `lengths` [B] are the
    real (unpadded) prompt lengths the cache should hold (None: all S). `start` [B] continues
    sequences the cache already holds `start` tokens of (a paged cache: `cache.context`): the
    tokens sit at positions start + 0..S-1 and attend to the cached ones too.
    """
    if start is not None and cache is None:
        raise ConfigError("prefill(start=...) continues cached sequences and needs their cache")
    kernel = _kernel(kernel, impl, interpret)
    b, s = tokens.shape
    x = embed(params, tokens)
    chex.assert_shape(x, (b, s, cfg.hidden_size))
    x, cache = _prompt_layers(params, cfg, x, cache, adapters, kernel, 0, cfg.num_layers, lengths,
                              None if start is None else jnp.asarray(start, jnp.int32))
    if logit_positions is not None:
        x = jnp.take_along_axis(x, logit_positions[:, None, None], axis=1)[:, 0]
    return _logits(params, cfg, x, kernel), cache


def decode(
    params: Params,
    cfg: LlamaConfig,
    tokens: jax.Array,
    positions: jax.Array,
    cache,
    *,
    adapters: Adapters = None,
    kernel: Optional[KernelOptions] = None,
    impl: Optional[str] = None,
    interpret: Optional[bool] = None,
):
    """One token per sequence: tokens [B] at positions [B] -> (logits [B, V], cache)."""
    kernel = _kernel(kernel, impl, interpret)
    (b,) = tokens.shape
    chex.assert_shape(positions, (b,))
    x = embed(params, tokens)
    cos, sin = rope_tables(cfg, positions)

    def make_attend(cache, layer, window):
        return functools.partial(_token_attend, cache=cache, layer=layer, window=window, positions=positions,
                                 cfg=cfg, kernel=kernel)

    x, cache = _layers(params, cfg, x, cache, adapters, kernel, 0, cfg.num_layers, cos, sin, make_attend)
    logits = _logits(params, cfg, x, kernel)
    chex.assert_shape(logits, (b, cfg.vocab_size))
    return logits, cache


def forward(
    params: Params, cfg: LlamaConfig, tokens: jax.Array, *, adapters: Adapters = None,
    kernel: Optional[KernelOptions] = None, impl: Optional[str] = None, interpret: Optional[bool] = None,
):
    """Causal logits [B, S, V] for whole sequences, no cache: the training and scoring forward."""
    return prefill(params, cfg, tokens, None, adapters=adapters, kernel=_kernel(kernel, impl, interpret))[0]


def init_params(cfg: LlamaConfig, key: jax.Array, dtype=jnp.float32, std: float = 0.02) -> Params:
    """Random params in the layout above (for training from scratch and tests)."""
    d, i = cfg.hidden_size, cfg.intermediate_size
    qkv = cfg.q_size + 2 * cfg.kv_size
    keys = iter(jax.random.split(key, 2 + 4 * cfg.num_layers))
    normal = lambda shape: (std * jax.random.normal(next(keys), shape)).astype(dtype)  # noqa: E731
    layers = []
    for _ in range(cfg.num_layers):
        lp = {
            "attn_norm": jnp.ones((d,), dtype),
            "wqkv": normal((qkv, d)),
            "wo": normal((d, cfg.q_size)),
            "mlp_norm": jnp.ones((d,), dtype),
            "w_gate_up": normal((2 * i, d)),
            "w_down": normal((d, i)),
        }
        if cfg.attention_bias:
            lp["bqkv"] = jnp.zeros((qkv,), dtype)
        layers.append(lp)
    params = {"embed": normal((cfg.vocab_size, d)), "final_norm": jnp.ones((d,), dtype), "layers": tuple(layers)}
    if not cfg.tie_word_embeddings:
        params["lm_head"] = normal((cfg.vocab_size, d))
    return params
