"""The native CPU kernel for `QuantizedTensor` products: a typed XLA FFI custom call, built on first use.

Why: XLA:CPU runs grouped int8 dequant-dots at ~1 G weights/s (PERF-NOTES), far under what the
weights' bytes allow. `native/quant_matmul.cc` does what ggml-cpu does instead: it quantizes each
activation row once per call to int8 blocks and dots them with the weight blocks in integers
(AVX2 maddubs/madd when the compiler targets AVX2+FMA+F16C, fused into VNNI's vpdpbusd/vpdpwssd
where the CPU has AVX-VNNI or AVX512-VNNI, portable scalar code otherwise),
splitting the output rows over XLA's intra-op thread pool: the calling thread and pool size - 1
helpers claim guided chunks of rows from an atomic counter (`max_threads` caps them; products under
~128K multiply-adds stay on one thread). Weights stream with software prefetch 3 KB ahead.

Accuracy: against an exact product with the dequantized weights, each output is off by at most
sum_b d_b / 2 * sum_{i in b} |w_i| (+ f32 rounding), where the activations are cut into blocks b of
32 values (Q8_0, Q4_1, Q5_0) or 256 (Q4_K, Q6_K) and d_b = max|x_b| / 127 is the block's scale
(`activation_error_bound` computes it). Typical errors are ~10x inside it (rounding errors cancel);
relative to |y| they are ~0.5%, as llama.cpp's. NaN or infinite activations give NaN outputs. An
output row's bits depend only on its x row and the weight: not on n, its neighbours or the threads.

Build: `g++ -O3 -march=native -shared -fPIC -std=c++17 -fvisibility=hidden -I<jax.ffi.include_dir()>`
(`$CXX` if set, else g++, c++ or clang++; `-mcpu=native` on ARM), a few seconds, into
`$RUVLLM_JAX_CACHE_DIR/native`, else `$XDG_CACHE_HOME/ruvllm_jax/native`, else
`~/.cache/ruvllm_jax/native`, as a file named by a hash of the source, the compiler and its flags,
`jax.__version__` and the CPU's feature flags. It is written to a temporary name and renamed, so
concurrent processes (pytest-xdist) never load a half-written library. The cache is trusted code.

Packaging: the source ships as package data, `quant/native/*.cc` under `ruvllm_jax`.

API: `available()` (False, never raising, when `RUVLLM_JAX_NATIVE=0`, off x86-64/aarch64 Linux or
macOS, without a compiler, or when the build fails: then a warning once with the compiler's message;
the outcome is remembered), `build_error()`, `matmul(x, w)`, and `build(extra_flags)` for variants
(the tests build the scalar path with `SCALAR_FLAGS`).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from ruvllm_jax.errors import ConfigError
from ruvllm_jax.quant.tensor import FORMATS, QuantizedTensor

try:
    import fcntl
except ImportError:  # not POSIX: available() reports the platform; no lock is needed
    fcntl = None

SOURCE = Path(__file__).with_name("native") / "quant_matmul.cc"
ENV_SWITCH = "RUVLLM_JAX_NATIVE"
SUPPORTED = ("Q8_0", "Q4_1", "Q5_0", "Q4_K", "Q6_K")
BASE_FLAGS = ("-O3", "-shared", "-fPIC", "-std=c++17", "-fvisibility=hidden")
SCALAR_FLAGS = ("-DRUVLLM_QMM_SCALAR",)  # forces the portable path, whatever the CPU has
NO_VNNI_FLAGS = ("-DRUVLLM_QMM_NO_VNNI",)  # the AVX2 path without VNNI's fused dots (same bits)
# Activation block per format: the unit of the error bound.
ACTIVATION_BLOCK = {"Q8_0": 32, "Q4_1": 32, "Q5_0": 32, "Q4_K": 256, "Q6_K": 256}

_OFF = frozenset({"0", "off", "false", "no"})
_lock = threading.Lock()
_kernels: dict[tuple[str, ...], NativeKernel] = {}
_build_locks: dict[tuple[str, ...], threading.Lock] = {}
_default_error: str | None = None  # why the default build is unusable; None before trying or on success
_default_tried = False


class NativeKernel:
    """One built, loaded and registered variant of the library."""

    def __init__(self, path: str, target: str, simd: int, flags: tuple[str, ...], compile_flags: tuple[str, ...]):
        self.path = path
        self.target = target
        self.simd = simd  # 3: AVX2 with VNNI compiled in, 2: AVX2 without, 0: scalar
        self.flags = flags  # the extra flags asked for
        self.compile_flags = compile_flags  # everything the compiler was given

    def matmul(self, x: jax.Array, w: QuantizedTensor, *, max_threads: int = 0) -> jax.Array:
        """x [..., cols] float32 @ dequant(w).T -> [..., rows] float32; see the module docstring."""
        _check(x, w, max_threads)
        rows, cols = w.shape
        return _call(self.target, w.qtype, rows, cols, int(max_threads))(x, w.data)

    def layer_matmul(self, x: jax.Array, layer: jax.Array, ws: tuple[QuantizedTensor, ...], *,
                     max_threads: int = 0) -> jax.Array:
        """x [..., cols] @ dequant(ws[layer]).T for a traced int32 `layer` (a scan over layers): every
        layer's weight stays its own buffer, handed to one call; only ws[layer] is read."""
        for w in ws:
            _check(x, w, max_threads)
        rows, cols = ws[0].shape
        if any(w.shape != ws[0].shape for w in ws):
            raise ConfigError(f"layer weights must share one shape, got {sorted({w.shape for w in ws})}")
        types = np.asarray([FORMATS[w.qtype].ggml_type for w in ws], np.int32)
        out = jax.ShapeDtypeStruct(x.shape[:-1] + (rows,), jnp.float32)
        return jax.ffi.ffi_call(self.target + "_layer", out)(
            jnp.asarray(layer, jnp.int32), x, *[w.data for w in ws], ggml_types=types, cols=np.int64(cols),
            max_threads=np.int64(max_threads))

    def __repr__(self) -> str:
        return f"NativeKernel({self.target}, simd={self.simd}, path={self.path!r})"


def cache_dir() -> str:
    explicit = os.environ.get("RUVLLM_JAX_CACHE_DIR", "")
    if explicit:
        return os.path.join(os.path.abspath(os.path.expanduser(explicit)), "native")
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = xdg if xdg and os.path.isabs(xdg) else os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "ruvllm_jax", "native")


def _platform_problem() -> str | None:
    machine = platform.machine().lower()
    if not (sys.platform.startswith("linux") or sys.platform == "darwin"):
        return f"platform {sys.platform!r} is not Linux or macOS"
    if machine not in ("x86_64", "amd64", "aarch64", "arm64"):
        return f"CPU architecture {machine!r} is not x86-64 or aarch64"
    return None


def _compiler() -> list[str] | None:
    cxx = os.environ.get("CXX", "")
    if cxx:
        cmd = shlex.split(cxx)
        return cmd if cmd and shutil.which(cmd[0]) else None
    for name in ("g++", "c++", "clang++"):
        found = shutil.which(name)
        if found:
            return [found]
    return None


def _arch_flags() -> tuple[str, ...]:
    return ("-mcpu=native",) if platform.machine().lower() in ("aarch64", "arm64") else ("-march=native",)


def _cpu_flags() -> str:
    """The CPU feature line: a library built with -march=native is only reused on the same features."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line.strip()
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()}"


def build(extra_flags: tuple[str, ...] | list[str] = ()) -> NativeKernel:
    """Compile (or reuse from the cache), load and register the library with `extra_flags` added.

    Raises `ConfigError` with the reason (no compiler, compile failure with its output). Each
    distinct flag set is built and registered once per process, under its own FFI target name;
    different flag sets may build at the same time (threads).
    """
    extra = tuple(str(f) for f in extra_flags)
    with _lock:
        if extra in _kernels:
            return _kernels[extra]
        variant_lock = _build_locks.setdefault(extra, threading.Lock())
    with variant_lock:
        with _lock:
            if extra in _kernels:
                return _kernels[extra]
        kernel = _build(extra)
        with _lock:
            _kernels[extra] = kernel
        return kernel


def _build(extra: tuple[str, ...]) -> NativeKernel:
    problem = _platform_problem()
    if problem:
        raise ConfigError(f"native quantized matmul unsupported: {problem}")
    cxx = _compiler()
    if cxx is None:
        raise ConfigError(
            f"native quantized matmul needs a C++ compiler: none found (CXX={os.environ.get('CXX')!r})")
    flags = BASE_FLAGS + _arch_flags() + extra + ("-I" + jax.ffi.include_dir(),)
    source = SOURCE.read_bytes()  # compiled from these very bytes, so the hash names what is built
    key = hashlib.sha256()
    for part in (source, " ".join(cxx).encode(), " ".join(flags).encode(), jax.__version__.encode(),
                 _cpu_flags().encode()):
        key.update(part)
        key.update(b"\0")
    digest = key.hexdigest()[:20]
    folder = cache_dir()
    path = os.path.join(folder, f"quant_matmul-{digest}.so")
    fresh = not os.path.exists(path)
    if fresh:
        with _file_lock(folder, path + ".lock"):  # one compile per library across processes (xdist)
            if not os.path.exists(path):
                _compile(cxx, flags, source, folder, path)
    try:
        lib = ctypes.CDLL(path)
    except OSError as e:
        if fresh:
            raise ConfigError(f"native quantized matmul: cannot load {path}: {e}") from e
        _compile(cxx, flags, source, folder, path)  # a damaged cache entry: build it again, once
        try:
            lib = ctypes.CDLL(path)
        except OSError as e2:
            raise ConfigError(f"native quantized matmul: cannot load {path}: {e2}") from e2
    target = f"ruvllm_quant_matmul_{digest}"
    with _lock:
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(lib.RuvllmQuantMatmul), platform="cpu")
        jax.ffi.register_ffi_target(target + "_layer", jax.ffi.pycapsule(lib.RuvllmQuantMatmulLayer), platform="cpu")
    lib.RuvllmQuantMatmulSimd.restype = ctypes.c_int
    kernel = NativeKernel(path, target, int(lib.RuvllmQuantMatmulSimd()), extra, (*cxx, *flags))
    kernel._lib = lib  # keep the library loaded as long as the kernel lives
    return kernel


@contextlib.contextmanager
def _file_lock(folder: str, lock_path: str):
    """An exclusive advisory lock on `lock_path`; without one (odd filesystems) just proceed."""
    try:
        if fcntl is None:
            raise OSError("no fcntl")
        os.makedirs(folder, exist_ok=True)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError:
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            pass
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _compile(cxx: list[str], flags: tuple[str, ...], source: bytes, folder: str, path: str) -> None:
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".quant_matmul-", suffix=".so.tmp")
        os.close(fd)
    except OSError as e:
        raise ConfigError(f"native quantized matmul: cannot write the cache folder {folder!r}: {e}") from e
    cmd = [*cxx, *flags, "-x", "c++", "-", "-o", tmp]  # the source on stdin
    shown = shlex.join(cmd) + f" < {SOURCE}"
    try:
        proc = subprocess.run(cmd, input=source, capture_output=True, timeout=300)
        if proc.returncode != 0:
            out = (proc.stderr or proc.stdout).decode(errors="replace").strip()
            out = out or f"no output, exit status {proc.returncode}"
            raise ConfigError(f"native quantized matmul failed to compile ({shown}):\n{out[-4000:]}")
        os.replace(tmp, path)  # atomic: other processes see the old state or the whole library
    except (OSError, subprocess.SubprocessError) as e:
        raise ConfigError(f"native quantized matmul: running the compiler failed ({shown}): {e}") from e
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def available() -> bool:
    """Whether `matmul` can run here; builds the library on the first call. Never raises."""
    global _default_error, _default_tried
    if os.environ.get(ENV_SWITCH, "").strip().lower() in _OFF:
        return False
    if _default_tried:
        return _default_error is None
    try:
        build()
        err = None
    except ConfigError as e:
        err = e.message
        if "failed to compile" in err or "cannot load" in err:
            warnings.warn(f"ruvllm_jax: {err}; quantized products use the jnp path", RuntimeWarning, stacklevel=2)
    except Exception as e:  # noqa: BLE001 - available() must never raise
        err = f"native quantized matmul: {type(e).__name__}: {e}"
    _default_error, _default_tried = err, True
    return err is None


def build_error() -> str | None:
    """Why `available()` is False (None when it is True)."""
    if os.environ.get(ENV_SWITCH, "").strip().lower() in _OFF:
        return f"native quantized matmul switched off by {ENV_SWITCH}={os.environ[ENV_SWITCH]!r}"
    available()
    return _default_error


def matmul(x: jax.Array, w: QuantizedTensor, *, max_threads: int = 0) -> jax.Array:
    """x [n, cols] (or [..., cols]) float32 @ dequant(w).T -> [n, rows] float32, natively.

    `max_threads` caps the threads used (0: all of XLA's intra-op pool). Works under jit, vmap
    (a batch of x folds into n; a batch of weights runs one call per weight) and in loops.
    """
    _check(x, w, max_threads)
    if not available():
        raise ConfigError(f"native quantized matmul unavailable: {build_error()}")
    return build().matmul(x, w, max_threads=max_threads)


def activation_error_bound(x: np.ndarray, w_dequant: np.ndarray, qtype: str) -> np.ndarray:
    """The bound on |native - x @ w_dequant.T| from activation rounding, [n, rows] (no f32 slack)."""
    bs = ACTIVATION_BLOCK[qtype]
    x = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
    w = np.abs(np.asarray(w_dequant, np.float64))
    n, cols = x.shape
    half_d = np.abs(x).reshape(n, cols // bs, bs).max(-1) / 127.0 / 2  # [n, blocks]
    w_l1 = w.reshape(w.shape[0], cols // bs, bs).sum(-1)  # [rows, blocks]
    return half_d @ w_l1.T


def _check(x, w, max_threads) -> None:
    if not isinstance(w, QuantizedTensor):
        raise ConfigError(f"native matmul takes a QuantizedTensor weight, got {type(w).__name__}")
    if w.qtype not in SUPPORTED:
        raise ConfigError(f"native matmul supports {list(SUPPORTED)}, got qtype {w.qtype!r}")
    rows, cols = w.shape
    fmt = FORMATS[w.qtype]
    if cols % fmt.block_size:
        raise ConfigError(f"{w.qtype} needs cols a multiple of {fmt.block_size}, got shape {w.shape}")
    data_shape = tuple(getattr(w.data, "shape", ()))
    data_dtype = getattr(w.data, "dtype", None)
    if data_shape != (rows, fmt.row_bytes(cols)) or data_dtype != np.uint8:
        raise ConfigError(f"{w.qtype} weight of shape {w.shape} needs data uint8 {(rows, fmt.row_bytes(cols))}, "
                          f"got {data_dtype} {data_shape}")
    shape = tuple(getattr(x, "shape", ()))
    dtype = getattr(x, "dtype", None)
    if dtype != np.float32:
        raise ConfigError(f"native matmul takes float32 activations, got dtype {dtype}")
    if len(shape) < 1 or shape[-1] != cols:
        raise ConfigError(f"activations of shape {shape} do not end in the weight's cols {cols} (weight {w.shape})")
    if not isinstance(max_threads, (int, np.integer)) or max_threads < 0:
        raise ConfigError(f"max_threads must be an int >= 0, got {max_threads!r}")


@functools.lru_cache(maxsize=None)
def _call(target: str, qtype: str, rows: int, cols: int, max_threads: int):
    """The jitted call for one weight shape; cached so eager calls do not retrace."""
    attrs = dict(ggml_type=np.int32(FORMATS[qtype].ggml_type), cols=np.int64(cols), max_threads=np.int64(max_threads))

    @jax.custom_batching.custom_vmap
    def f(x, data):
        out = jax.ShapeDtypeStruct(x.shape[:-1] + (rows,), jnp.float32)
        return jax.ffi.ffi_call(target, out)(x, data, **attrs)

    @f.def_vmap
    def _batched(axis_size, in_batched, x, data):
        x_batched, data_batched = in_batched
        if not data_batched:
            return f(x, data), True  # the kernel takes any leading dims: the batch joins n
        if not x_batched:
            x = jnp.broadcast_to(x, (axis_size, *x.shape))
        return jax.lax.map(lambda args: f(*args), (x, data)), True

    return jax.jit(f)
