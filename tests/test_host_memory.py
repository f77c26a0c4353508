"""`host_memory`: freed C-heap pages go back to the OS (the kernel's RSS is the reference), and the
serving loop trims only after steps that compiled.

The RSS checks run in a child process, so nothing else this pytest process holds moves them.
"""

from __future__ import annotations

import platform
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import pytest

from ruvllm_jax import host_memory
from ruvllm_jax.types import GenerateParams

_CHILD = textwrap.dedent("""
    import ctypes, sys
    from ruvllm_jax import host_memory

    def rss_mb():
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith("VmRSS:")) / 1024

    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: glibc itself never trims, only malloc_trim does
    blocks = []
    for _ in range(3000):  # 3000 x 64 KiB on the heap (below the mmap threshold), every page touched
        p = libc.malloc(64 << 10)
        ctypes.memset(p, 1, 64 << 10)
        blocks.append(p)
    keep = libc.malloc(64)  # a live block above them keeps the heap's top from shrinking on free
    full = rss_mb()
    for p in blocks:
        libc.free(p)
    freed = rss_mb()
    trim = sys.argv[1] == "trim" and host_memory.release_free_heap()
    print(full, freed, rss_mb(), bool(trim))
""")


def _child(mode: str) -> tuple[float, float, float, bool]:
    out = subprocess.run([sys.executable, "-c", _CHILD, mode], capture_output=True, text=True, check=True)
    full, freed, after, trimmed = out.stdout.split()
    return float(full), float(freed), float(after), trimmed == "True"


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="malloc_trim is glibc's and /proc Linux's (elsewhere release_free_heap is a no-op)")
def test_release_free_heap_returns_freed_pages_to_the_os():
    assert host_memory.trim_available()
    full, freed, after, trimmed = _child("trim")
    assert full - freed < 20  # freeing alone keeps the ~190 MB resident (the control) ...
    assert trimmed and freed - after > 150  # ... and the trim gives it back
    full, freed, after, trimmed = _child("keep")
    assert not trimmed and freed - after < 20  # no trim, no change: the drop above is the trim's


def test_without_malloc_trim_every_call_is_a_no_op_that_says_false(monkeypatch):
    """The path a non-glibc C library takes (macOS, musl: no `malloc_trim` symbol), on any machine."""
    monkeypatch.setattr(host_memory, "_looked_up", True)
    monkeypatch.setattr(host_memory, "_malloc_trim", None)
    assert host_memory.trim_available() is False
    assert host_memory.release_free_heap() is False
    jax.jit(lambda x: x * 5 - 0.5)(jnp.arange(3.0)).block_until_ready()  # a compile to trim after
    assert host_memory.release_after_compiles() is False


def test_release_after_compiles_trims_once_per_batch_of_compiles(monkeypatch):
    calls = []
    monkeypatch.setattr(host_memory, "release_free_heap", lambda: calls.append(1) or True)
    host_memory.release_after_compiles()  # forget compiles of earlier tests
    calls.clear()
    assert host_memory.release_after_compiles() is False and calls == []  # nothing compiled since
    x = jnp.arange(7.0).block_until_ready()
    before = host_memory.compile_count()
    jax.jit(lambda x: x * 3 + 0.25)(x).block_until_ready()  # a new program: one compile
    assert host_memory.compile_count() == before + 1
    assert host_memory.release_after_compiles() is True and calls == [1]
    assert host_memory.release_after_compiles() is False and calls == [1]


def test_serving_steps_trim_only_after_they_compiled(monkeypatch, llama_dir):
    from ruvllm_jax.backend.jax_backend import JaxBackend
    from ruvllm_jax.types import ModelConfig

    _, folder = llama_dir
    backend = JaxBackend.new()
    backend.load_model(folder, ModelConfig(max_context=53))  # shapes no other test compiles
    calls = []
    monkeypatch.setattr(host_memory, "release_free_heap", lambda: calls.append(host_memory.compile_count()) or True)
    greedy = GenerateParams(max_tokens=4, temperature=0.0)
    backend.generate_tokens([0, 5, 9], greedy)
    assert calls, "the first generation compiled its programs and must have trimmed"
    calls.clear()
    backend.generate_tokens([0, 7, 9], greedy)  # the same executables: no compile, no trim
    assert calls == []


def test_lean_jit_compiles_with_the_lean_options_and_falls_back_where_xla_refuses(monkeypatch):
    """On CPU the engine's programs compile without XLA's MLIR fusion emitters; an option this jaxlib
    does not know (a newer XLA may drop it) or the switch gives plain jax.jit, never an error."""
    from ruvllm_jax.backend import engine

    host_memory._lean_options_for.cache_clear()
    options = host_memory.lean_compiler_options()
    lean = jax.jit(lambda x: x, compiler_options=dict(host_memory.LEAN_CPU_OPTIONS))
    if options == {}:  # only where this XLA refuses the option (jax 0.10 on CPU, as CI, takes it)
        with pytest.raises(jax.errors.JaxRuntimeError):
            lean.lower(jnp.float32(0)).compile()
    else:
        assert options == host_memory.LEAN_CPU_OPTIONS
    f = host_memory.lean_jit(lambda x: x * 2)
    assert float(f(jnp.float32(3))) == 6.0 and f.lower(jnp.float32(0)).compile() is not None
    assert engine.prefill_slots.__name__ == "prefill_slots"  # the engine's programs are lean_jit ones
    assert isinstance(engine.prefill_slots, host_memory._LeanJit)

    monkeypatch.setenv(host_memory.LEAN_ENV_SWITCH, "0")
    assert host_memory.lean_compiler_options() == {}
    monkeypatch.delenv(host_memory.LEAN_ENV_SWITCH)
    monkeypatch.setattr(host_memory, "LEAN_CPU_OPTIONS", {"xla_cpu_no_such_option_anywhere": True})
    host_memory._lean_options_for.cache_clear()
    try:
        assert host_memory.lean_compiler_options() == {}
        g = host_memory.lean_jit(lambda x: x + 1)
        assert float(g(jnp.float32(1))) == 2.0
    finally:
        host_memory._lean_options_for.cache_clear()
