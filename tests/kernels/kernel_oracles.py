"""Shared helpers for the kernel tests: random inputs, float64 references, per-dtype tolerances.

The oracle for every kernel is its `*_reference` function evaluated in float64 (under
`jax.enable_x64`) on the very values the kernel saw (bf16 inputs are widened exactly).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# (atol, rtol) for outputs, and atol for log-sum-exp / softmax maxima, against the float64 reference.
# f32: the kernels accumulate in f32 (~1e-6 observed). bf16: the output is rounded to bf16 (2^-8
# relative) and the kernels feed P to the PV dot in bf16, so ~1% of the output scale.
TOL = {
    jnp.float32: dict(out=(2e-5, 2e-5), stat=2e-5),
    jnp.bfloat16: dict(out=(3e-2, 3e-2), stat=2e-3),
}

# (num_heads, num_kv_heads): GQA ratios 1, 2, 7 and MQA (one KV head).
HEAD_LAYOUTS = [(2, 2), (4, 2), (14, 2), (7, 1), (3, 1)]


def randn(rng: np.random.Generator, shape, dtype) -> jax.Array:
    return jnp.asarray(rng.standard_normal(shape, dtype=np.float32), dtype)


def in_f64(fn, *args, **kwargs):
    """Run `fn` under x64 with every array argument widened to float64 (ints left alone)."""
    with jax.enable_x64(True):
        def widen(x):
            if isinstance(x, (jax.Array, np.ndarray)) and jnp.issubdtype(x.dtype, jnp.floating):
                return jnp.asarray(np.asarray(x, np.float64))
            return x
        out = fn(*jax.tree.map(widen, args), **jax.tree.map(widen, kwargs))
        return jax.tree.map(lambda x: np.asarray(x, np.float64), out)


def assert_close(actual, expected, dtype, kind="out", name=""):
    actual = np.asarray(jnp.asarray(actual, jnp.float32), np.float64)
    expected = np.asarray(expected, np.float64)
    if kind == "out":
        atol, rtol = TOL[dtype]["out"]
    else:
        atol, rtol = TOL[dtype]["stat"], TOL[dtype]["stat"]
    np.testing.assert_allclose(actual, expected, atol=atol, rtol=rtol, err_msg=name)


def assert_stats_close(actual, expected, dtype, name=""):
    """Softmax max/lse: -inf where the reference is -inf, close elsewhere."""
    actual = np.asarray(jnp.asarray(actual, jnp.float32), np.float64)
    expected = np.asarray(expected, np.float64)
    np.testing.assert_array_equal(np.isneginf(actual), np.isneginf(expected), err_msg=name + " (-inf pattern)")
    finite = np.isfinite(expected)
    tol = TOL[dtype]["stat"]
    np.testing.assert_allclose(actual[finite], expected[finite], atol=tol, rtol=tol, err_msg=name)
