"""JAX's persistent compilation cache, on by default: compiled executables are kept on disk.

What: XLA compiles every new prefill bucket and decode chunk the first time it is called (a
512-token prompt on the Qwen2.5-0.5B shape waits about 5 s). JAX can write those executables to a
folder and read them back in later processes, so only the first process on a machine pays; every
other one loads the executable in milliseconds. This module points JAX's cache at a folder of ours.

Default on: creating a `JaxBackend` calls `ensure_default_compilation_cache()`, which enables the
cache in `default_cache_dir()` unless

* you configured JAX's cache yourself (`jax.config.update("jax_compilation_cache_dir", ...)` or the
  `JAX_COMPILATION_CACHE_DIR` environment variable) before the first backend: your folder is kept;
* JAX's cache is switched off (`jax_enable_compilation_cache=False`, `JAX_ENABLE_COMPILATION_CACHE`);
* `RUVLLM_JAX_COMPILATION_CACHE` is `0`, `off`, `false` or `no`;
* `disable_compilation_cache()` was called in this process.

Where files go: `$RUVLLM_JAX_CACHE_DIR` if set, else `$XDG_CACHE_HOME/ruvllm_jax/xla`, else
`~/.cache/ruvllm_jax/xla`. Entries are keyed by the program, the device, the JAX/XLA versions and
flags, so stale ones are never used; delete the folder at any time to reclaim the space (JAX does not
bound it unless `jax_compilation_cache_max_size` is set).

Explicit control: `enable_compilation_cache(path, min_compile_time_secs=...)` points the cache at
any folder (also after compiles have happened), `disable_compilation_cache()` turns it off. A folder
that cannot be created or written is a warning and the cache stays off: a cache never breaks
generation. Only executables that took at least `min_compile_time_secs` (default
`DEFAULT_MIN_COMPILE_TIME_SECS`, 0.2 s) to compile are written: our prefill and decode programs
(0.3 s and up) are, the many tiny helper programs are not.

The cache is trusted code: do not point it at a folder that others can write.
"""

from __future__ import annotations

import math
import numbers
import os
import tempfile
import threading
import warnings

import jax

from ruvllm_jax.errors import ConfigError

ENV_CACHE_DIR = "RUVLLM_JAX_CACHE_DIR"
ENV_SWITCH = "RUVLLM_JAX_COMPILATION_CACHE"
# Compiles shorter than this are not written. JAX's own default (1 s) would skip the decode and
# prefill programs of small models, which compile in 0.3 s and up; the tiny jitted helpers
# (casts, slices, PRNG) compile in well under 0.1 s and are not worth a file each.
DEFAULT_MIN_COMPILE_TIME_SECS = 0.2

_OFF = frozenset({"0", "off", "false", "no"})
_ON = frozenset({"", "1", "on", "true", "yes"})

_lock = threading.Lock()
_default_decided = False  # ensure_default_compilation_cache() has made its once-per-process decision
_disabled = False  # disable_compilation_cache() was called (and no enable since)


def default_cache_dir() -> str:
    """The folder the default cache uses: `$RUVLLM_JAX_CACHE_DIR`, else the XDG cache home's `ruvllm_jax/xla`."""
    explicit = os.environ.get(ENV_CACHE_DIR, "")
    if explicit:
        return os.path.abspath(os.path.expanduser(explicit))
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    # The XDG spec says a relative XDG_CACHE_HOME is invalid and must be ignored.
    base = xdg if xdg and os.path.isabs(xdg) else os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "ruvllm_jax", "xla")


def enable_compilation_cache(
    path: str | os.PathLike | None = None,
    *,
    min_compile_time_secs: float = DEFAULT_MIN_COMPILE_TIME_SECS,
) -> str | None:
    """Point JAX's persistent compilation cache at `path` (default `default_cache_dir()`).

    Creates the folder, and writes there every executable that took at least
    `min_compile_time_secs` to compile (0 caches everything). Works before or after compiles have
    happened, and replaces any folder JAX was using. Returns the absolute folder in use, or None
    (with a warning, JAX's configuration left as it was) when the folder cannot be created or
    written. A `path` that is not a non-empty str/PathLike, or a `min_compile_time_secs` that is not
    a finite number >= 0, is a `ConfigError`.
    """
    global _disabled
    folder = _check_path(path)
    min_time = _check_min_compile_time(min_compile_time_secs)
    if folder is None:
        folder = default_cache_dir()
    problem = _writable_problem(folder)
    if problem is not None:
        warnings.warn(
            f"ruvllm_jax: the compilation cache folder {folder!r} cannot be used ({problem}); "
            f"the persistent compilation cache stays off (set {ENV_CACHE_DIR} to another folder, "
            f"or {ENV_SWITCH}=0 to silence this)",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    with _lock:
        previous = _configured_dir()
        was_enabled = bool(jax.config.jax_enable_compilation_cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", min_time)
        jax.config.update("jax_enable_compilation_cache", True)
        jax.config.update("jax_compilation_cache_dir", folder)
        if previous != folder or not was_enabled:
            # JAX opens its cache once, at the first compile that sees a folder, and keeps it:
            # without a reset a new folder would be ignored until the process ends.
            _reset_jax_cache()
        _disabled = False
    return folder


def ensure_default_compilation_cache() -> str | None:
    """The default-on hook, called when a `JaxBackend` is created. Returns the folder JAX caches in, or None.

    Decides once per process, then repeat calls only read JAX's config: leaves a folder the user
    configured alone (and returns it), does nothing when `RUVLLM_JAX_COMPILATION_CACHE` is
    0/off/false/no, JAX's cache is switched off, or `disable_compilation_cache()` was called;
    otherwise enables the cache in `default_cache_dir()`.
    """
    global _default_decided
    if not _default_decided:
        with _lock:
            decide = not _default_decided
            _default_decided = True
        if decide and not _disabled and _configured_dir() is None and jax.config.jax_enable_compilation_cache:
            if not _env_disabled(os.environ.get(ENV_SWITCH)):
                enable_compilation_cache(default_cache_dir())
    return _active_dir()


def disable_compilation_cache() -> None:
    """Turn JAX's persistent compilation cache off for this process (executables already on disk stay).

    `ensure_default_compilation_cache()` will not turn it back on; `enable_compilation_cache()` does.
    """
    global _disabled
    with _lock:
        jax.config.update("jax_compilation_cache_dir", None)
        _reset_jax_cache()
        _disabled = True


def _configured_dir() -> str | None:
    return jax.config.jax_compilation_cache_dir or None


def _active_dir() -> str | None:
    return _configured_dir() if jax.config.jax_enable_compilation_cache else None


def _env_disabled(value: str | None) -> bool:
    """Whether the `RUVLLM_JAX_COMPILATION_CACHE` value switches the default cache off (unset: on)."""
    if value is None:
        return False
    v = value.strip().lower()
    if v in _OFF:
        return True
    if v not in _ON:
        warnings.warn(
            f"ruvllm_jax: {ENV_SWITCH}={value!r} is not one of 1/on/true/yes or 0/off/false/no; "
            "keeping the compilation cache on",
            RuntimeWarning,
            stacklevel=3,
        )
    return False


def _check_path(path) -> str | None:
    if path is None:
        return None
    if not isinstance(path, (str, os.PathLike)):
        raise ConfigError(f"compilation cache path must be a str, an os.PathLike or None, got {path!r}")
    raw = os.fspath(path)
    if not isinstance(raw, str):
        raise ConfigError(f"compilation cache path must be a text path, got {path!r}")
    if not raw.strip():
        raise ConfigError(f"compilation cache path must not be empty, got {path!r}")
    return os.path.abspath(os.path.expanduser(raw))


def _check_min_compile_time(value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
        raise ConfigError(f"min_compile_time_secs must be a finite number >= 0 (seconds), got {value!r}")
    return float(value)


def _writable_problem(folder: str) -> str | None:
    """None when `folder` exists (created if needed) and a file can be written in it, else why not."""
    try:
        os.makedirs(folder, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".ruvllm_jax_write_probe_", dir=folder)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        return f"{type(e).__name__}: {e}"
    return None


def _reset_jax_cache() -> None:
    """Make JAX reopen its cache at the next compile; a no-op where this JAX has no reset."""
    try:
        from jax.experimental.compilation_cache import compilation_cache as jax_cc

        jax_cc.reset_cache()
    except Exception:  # an API moved in a newer JAX must not break generation
        try:
            from jax._src import compilation_cache as jax_cc_private

            jax_cc_private.reset_cache()
        except Exception:
            pass
