"""Products and lookups with `QuantizedTensor` weights: a jnp path for every backend, a native one for CPU.

`quantized_matmul_jnp` decodes the GGML blocks in jnp and contracts with x's last axis directly (no `w.T`).
XLA:CPU does not fuse a decoder into its GEMM/GEMV (it did only for Q8_0 with rows under 4096 values, into
a slow scalar loop), so "decode, then one f32 dot" writes the whole f32 matrix to a temporary each call:
for Qwen2.5-0.5B's 151936x896 Q8_0 head that was 830 ms and 545 MB against f32's 75 ms. On CPU we
therefore decode and multiply a chunk of rows at a time inside a `lax.map`, the chunk sized so that its
f32 temporary (~128 KiB at decode widths) stays in cache: the head took 53 ms, faster than f32, and the
4864x896 / 896x4864 MLP shapes ran 1.5-3x faster than the whole-matrix form for Q8_0, Q4_1 and Q4_K (and
than the whole-row multiply-and-reduce and per-block-partial-sum forms, which fall off XLA:CPU's fast
path); see `uses_chunks` for Q5_0/Q6_K. Other backends get the plain decode-then-dot, which their
compilers fuse. Either way the decoded floats live only inside one call; the weights stay GGML bytes.
On CPU the native kernel (`ruvllm_jax.quant.native`), when built, is faster still; `impl="auto"` prefers it.
"""

from __future__ import annotations

import functools
import math
from types import ModuleType
from typing import Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from ruvllm_jax.errors import ConfigError
from ruvllm_jax.quant.formats import dequantize_rows_jnp
from ruvllm_jax.quant.tensor import QuantizedTensor

IMPLS = ("auto", "jnp", "native")


def _check_x(x: jax.Array, w: QuantizedTensor) -> None:
    if x.ndim < 1 or x.shape[-1] != w.shape[1]:
        raise ConfigError(f"x's last axis must be the weight's {w.shape[1]} columns, got x shape {tuple(x.shape)}")


CHUNK_BYTES = 128 * 1024  # f32 temporary per chunk at up to 16 rows of x; grows with x's rows (see cpu_chunk_rows)
# Q5_0's and Q6_K's decoders ran slower inside the loop than over a whole matrix whose f32 temporary stays in
# the last-level cache (4864x896 Q5_0: 8-17 ms chunked, 5-7 ms whole), so they are chunked only beyond that.
ALWAYS_CHUNKED = ("Q8_0", "Q4_1", "Q4_K")
WHOLE_MAX_BYTES = 32 << 20


def cpu_chunk_rows(n: int, cols: int) -> int:
    """Weight rows decoded per step on CPU for n rows of x: a power of two in [8, 1024] whose f32 chunk is
    CHUNK_BYTES, scaled up to 16x for many rows of x (each step re-reads x, so big x wants big chunks)."""
    target = CHUNK_BYTES * min(max(n // 16, 1), 16)
    return max(8, min(1024, 1 << max(target // (4 * cols), 1).bit_length() - 1))


def uses_chunks(qtype: str, n: int, rows: int, cols: int) -> bool:
    """Whether `quantized_matmul_jnp` decodes chunk by chunk (CPU) rather than the whole matrix at once."""
    if jax.default_backend() != "cpu" or rows < 2 * cpu_chunk_rows(n, cols):
        return False
    return qtype in ALWAYS_CHUNKED or 4 * rows * cols > WHOLE_MAX_BYTES


def _decode_dot(x2: jax.Array, data: jax.Array, qtype: str, cols: int) -> jax.Array:
    """[n, cols] x [r, row_bytes] blocks -> [n, r]."""
    wd = dequantize_rows_jnp(data, qtype, cols)
    return jax.lax.dot_general(x2, wd, (((1,), (1,)), ((), ())))


def quantized_matmul_jnp(x: jax.Array, w: QuantizedTensor) -> jax.Array:
    """x [..., cols] @ dequantize(w).T -> float32 [..., rows], in jnp (any backend, traceable)."""
    _check_x(x, w)
    rows, cols = w.shape
    lead = x.shape[:-1]
    n = math.prod(lead)
    x2 = jnp.asarray(x, jnp.float32).reshape(n, cols)
    data = jnp.asarray(w.data)
    if not uses_chunks(w.qtype, n, rows, cols):
        return _decode_dot(x2, data, w.qtype, cols).reshape(*lead, rows)
    chunk = cpu_chunk_rows(n, cols)
    steps = rows // chunk
    main = data[: steps * chunk].reshape(steps, chunk, data.shape[1])
    ys = jax.lax.map(lambda d: _decode_dot(x2, d, w.qtype, cols), main)  # [steps, n, chunk]
    y = jnp.moveaxis(ys, 0, 1).reshape(n, steps * chunk)
    if steps * chunk < rows:
        y = jnp.concatenate([y, _decode_dot(x2, data[steps * chunk :], w.qtype, cols)], axis=1)
    return y.reshape(*lead, rows)


def _native() -> Optional[ModuleType]:
    """`ruvllm_jax.quant.native` if it exists and offers `available`/`matmul`, else None."""
    try:
        from ruvllm_jax.quant import native
    except ImportError:
        return None
    if not (callable(getattr(native, "available", None)) and callable(getattr(native, "matmul", None))):
        return None  # e.g. a bare folder of C++ sources, importable as a namespace package
    return native


def native_available() -> bool:
    """Whether the native CPU kernel can run here."""
    native = _native()
    return native is not None and bool(native.available())


def quantized_matmul(x: jax.Array, w: QuantizedTensor, impl: str = "auto") -> jax.Array:
    """x [..., cols] @ dequantize(w).T -> float32 [..., rows].

    impl: "jnp" (portable), "native" (the CPU kernel; ConfigError when it is not built), or "auto" (native
    on the CPU backend when available, else jnp).
    """
    if impl not in IMPLS:
        raise ConfigError(f"quantized_matmul impl must be one of {IMPLS}, got {impl!r}")
    if impl == "jnp" or (impl == "auto" and (jax.default_backend() != "cpu" or not native_available())):
        return quantized_matmul_jnp(x, w)
    if not native_available():
        raise ConfigError("quantized_matmul impl='native' asked for, but the native kernel is not available")
    _check_x(x, w)
    lead = x.shape[:-1]
    x2 = jnp.asarray(x, jnp.float32).reshape(math.prod(lead), w.shape[1])
    return _native_product(x2, jnp.asarray(w.data), w.qtype, w.shape).reshape(*lead, w.shape[0])


def layer_quantized_matmul(x: jax.Array, layer: jax.Array, ws: tuple[QuantizedTensor, ...]) -> jax.Array:
    """x [..., cols] @ dequantize(ws[layer]).T -> float32 [..., rows] for a traced int32 `layer`, natively.

    For a `lax.scan` over a model's layers: one custom call gets every layer's blocks as they are
    (their formats may differ) and reads only ws[layer]'s, so nothing is stacked or sliced out.
    Not differentiable (the scan runs only in cached prefill and decode). ConfigError without the
    native kernel.
    """
    if not native_available():
        raise ConfigError("layer_quantized_matmul needs the native kernel, which is not available")
    for w in ws:
        _check_x(x, w)
    lead = x.shape[:-1]
    x2 = jnp.asarray(x, jnp.float32).reshape(math.prod(lead), ws[0].shape[1])
    return _native().build().layer_matmul(x2, layer, ws).reshape(*lead, ws[0].shape[0])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _native_product(x2: jax.Array, data: jax.Array, qtype: str, shape: tuple[int, int]) -> jax.Array:
    """The native kernel, differentiable in x (LoRA and SONA train adapters over a quantized model):
    the backward product g @ dequantize(w) runs in jnp. The blocks get no gradient."""
    return _native().matmul(x2, QuantizedTensor(data, qtype, shape))


def _native_product_fwd(x2, data, qtype, shape):
    return _native_product(x2, data, qtype, shape), data


def _native_product_bwd(qtype, shape, data, g):
    dx = jax.lax.dot_general(g, dequantize_rows_jnp(data, qtype, shape[1]), (((1,), (0,)), ((), ())))
    return dx, np.zeros(data.shape, jax.dtypes.float0)


_native_product.defvjp(_native_product_fwd, _native_product_bwd)


def embed_rows(table: Union[QuantizedTensor, jax.Array], tokens) -> jax.Array:
    """table[tokens] as float32 [..., cols]: gathers the rows' blocks first, so only they are decoded."""
    if isinstance(table, QuantizedTensor):
        rows = jnp.asarray(table.data)[jnp.asarray(tokens)]
        return dequantize_rows_jnp(rows, table.qtype, table.shape[1])
    return jnp.asarray(table)[jnp.asarray(tokens)].astype(jnp.float32)


def quantized_matmul_sharded(x: jax.Array, w: QuantizedTensor, mesh: Mesh, impl: str) -> jax.Array:
    """x [..., in] @ w.T for a `QuantizedTensor` on `mesh`: each device multiplies its rows of w (its
    slice of the output columns) with the native kernel or jnp under `shard_map`; x's batch splits
    over `data` when it divides. XLA cannot partition the native custom call itself: outside a
    shard_map it would gather the whole weight onto every device."""
    model, data = mesh.shape["model"], mesh.shape["data"]
    rows_axis = "model" if w.shape[0] % model == 0 else None
    lead = "data" if x.ndim >= 2 and x.shape[0] % data == 0 else None
    local_rows = w.shape[0] // (model if rows_axis else 1)
    x_spec = P(lead, *([None] * (x.ndim - 1)))
    out_spec = P(lead, *([None] * (x.ndim - 2)), rows_axis) if x.ndim >= 2 else P(rows_axis)

    def local(x_l, data_l):
        return quantized_matmul(x_l, QuantizedTensor(data_l, w.qtype, (local_rows, w.shape[1])), impl=impl)

    return _shard_map(local, mesh, (x_spec, P(rows_axis, None)), out_spec)(x, w.data)


def _shard_map(f, mesh: Mesh, in_specs, out_specs):
    if hasattr(jax, "shard_map"):
        return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
    from jax.experimental.shard_map import shard_map  # jax before 0.7

    return shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=False)
