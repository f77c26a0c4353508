"""Give the C heap's freed pages back to the OS after a load or a compile (glibc's `malloc_trim`).

Why: an XLA:CPU compile of a model's prefill or decode program allocates 0.1-0.2 GB on the C heap
and frees most of it when done, but glibc keeps freed pages in its arenas, so they stay in the
process's RSS until something returns them. Measured on the Qwen2.5-0.5B shape (Q8_0, 24 layers),
compiling the prefill program left 0.22 GB resident of which 0.06 GB was still in use; the decode
program 0.21 GB of which 0.06 GB. `malloc_trim(0)` returns the rest. It lowers what a process holds
after its first generation; it cannot lower the peak *during* a compile (XLA needs that memory then).

`release_free_heap()` trims now. `release_after_compiles()` trims only when JAX compiled something
since the last call (a `jax.monitoring` listener counts compilations, cache loads included), so a
warm serving loop never pays for a trim. Without glibc (macOS, musl) both do nothing and say False.

The peak *during* a compile is XLA's own working memory, most of it the MLIR fusion emitters'
(XLA:CPU's newer code generator): compiling the 0.5B shape's scanned Q8_0 decode program took
0.10 GB with them and 0.02 GB with the classic emitters (a probe compiling the engine's programs
again; `RUVLLM_JAX_LEAN_COMPILE=0 python experiments/memory_stages.py` shows the peak it makes).
`lean_jit` is `jax.jit` with those emitters off on CPU (`LEAN_CPU_OPTIONS`, checked once to be an
option this jaxlib knows; else, or with RUVLLM_JAX_LEAN_COMPILE=0, plain `jax.jit`). The engine's
programs compile lean only for its layer scan (native-quantized models): the classic emitters' code
ran the small f32 embedded model's decode ~15% slower, and there the weights are few and the
compile memory matters little.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import threading
from typing import Any, Callable, Optional

import jax
import numpy as np

_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"  # jax's own name (jax._src.dispatch)

_lock = threading.Lock()
_compiles = 0  # compilations seen by the listener
_trimmed_at = 0  # `_compiles` at the last trim
_malloc_trim = None  # the C function, once looked up
_looked_up = False


def _trim_function() -> Optional[Callable[[int], int]]:
    global _malloc_trim, _looked_up
    if not _looked_up:
        _looked_up = True
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            fn = libc.malloc_trim  # glibc only: AttributeError elsewhere
        except (OSError, AttributeError):
            fn = None
        else:
            fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
        _malloc_trim = fn
    return _malloc_trim


def trim_available() -> bool:
    """Whether this process's C library can return freed heap pages (glibc)."""
    return _trim_function() is not None


def release_free_heap() -> bool:
    """Return every free page of the C heap to the OS now. True if the library did so (glibc's
    `malloc_trim(0)` returned 1: some memory was released), False otherwise or where unsupported."""
    fn = _trim_function()
    return bool(fn(0)) if fn is not None else False


def compile_count() -> int:
    """JAX compilations in this process since this module was imported."""
    return _compiles


def release_after_compiles() -> bool:
    """`release_free_heap()` if JAX compiled anything since the last such call, else nothing (False)."""
    global _trimmed_at
    with _lock:
        if _compiles == _trimmed_at:
            return False
        _trimmed_at = _compiles
    return release_free_heap()


def _on_duration(event: str, duration_secs: float, **kwargs) -> None:
    global _compiles
    if event == _COMPILE_EVENT:
        with _lock:
            _compiles += 1


jax.monitoring.register_event_duration_secs_listener(_on_duration)

LEAN_CPU_OPTIONS = {"xla_cpu_use_fusion_emitters": False}
LEAN_ENV_SWITCH = "RUVLLM_JAX_LEAN_COMPILE"


@functools.lru_cache(maxsize=None)
def _lean_options_for(backend: str, switch: str) -> tuple[tuple[str, Any], ...]:
    if backend != "cpu" or switch.strip().lower() in ("0", "off", "false", "no"):
        return ()
    try:  # a jaxlib without the option (a newer XLA may drop it) rejects it when compiling
        jax.jit(lambda x: x + 1, compiler_options=dict(LEAN_CPU_OPTIONS)).lower(np.float32(0)).compile()
    except Exception:  # noqa: BLE001 - any refusal means: compile as jax does by default
        return ()
    return tuple(LEAN_CPU_OPTIONS.items())


def lean_compiler_options() -> dict[str, Any]:
    """The compiler options `lean_jit` adds here: `LEAN_CPU_OPTIONS` on a CPU backend whose XLA knows
    them, else none."""
    return dict(_lean_options_for(jax.default_backend(), os.environ.get(LEAN_ENV_SWITCH, "")))


class _LeanJit:
    """`jax.jit(fun, **kwargs)`, with `lean_compiler_options()` for the calls `lean_when(kwargs)`
    picks, each jitted function built on first use (the backend is not known at import).
    `lower` / `trace` / `eval_shape` pick the same way; other attributes are the plain jit's."""

    def __init__(self, fun: Callable, kwargs: dict, lean_when: Optional[Callable[[dict], bool]]):
        self._fun, self._kwargs, self._lean_when = fun, kwargs, lean_when
        self._jitted: dict[bool, Any] = {}
        functools.update_wrapper(self, fun)

    def _get(self, lean: bool):
        if lean not in self._jitted:
            options = lean_compiler_options() if lean else {}
            self._jitted[lean] = jax.jit(self._fun, **self._kwargs,
                                         **({"compiler_options": options} if options else {}))
        return self._jitted[lean]

    def _pick(self, kwargs: dict):
        return self._get(self._lean_when is None or bool(self._lean_when(kwargs)))

    def __call__(self, *args, **kwargs):
        return self._pick(kwargs)(*args, **kwargs)

    def lower(self, *args, **kwargs):
        return self._pick(kwargs).lower(*args, **kwargs)

    def trace(self, *args, **kwargs):
        return self._pick(kwargs).trace(*args, **kwargs)

    def eval_shape(self, *args, **kwargs):
        return self._pick(kwargs).eval_shape(*args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self._get(False), name)


def lean_jit(fun: Optional[Callable] = None, *, lean_when: Optional[Callable[[dict], bool]] = None, **jit_kwargs):
    """`jax.jit` whose XLA:CPU compiles need a fifth of the memory (see the module doc), for every
    call or for those whose keyword arguments `lean_when` approves; `@lean_jit` or
    `@functools.partial(lean_jit, static_argnames=..., lean_when=...)`."""
    if fun is None:
        return functools.partial(lean_jit, lean_when=lean_when, **jit_kwargs)
    return _LeanJit(fun, jit_kwargs, lean_when)


__all__ = ["LEAN_CPU_OPTIONS", "compile_count", "lean_compiler_options", "lean_jit", "release_after_compiles",
           "release_free_heap", "trim_available"]
