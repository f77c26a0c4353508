"""The persistent compilation cache: default folder, default-on hook, opt-outs, hits across processes.

Everything that changes JAX's config runs in a child process (`_child`), so this process's JAX is
untouched. A cache hit is read from JAX's monitoring event `/jax/compilation_cache/cache_hits`
(public `jax.monitoring`), with the debug log line "Persistent compilation cache hit" as a second
signal in case a newer JAX renames the event; never from timing.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import jax
import pytest

from ruvllm_jax import compilation_cache as cc
from ruvllm_jax.errors import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Child prelude: count cache hits/misses, compile tiny distinct programs, report JSON on stdout.
_PRELUDE = """
import json, logging, os
import jax, jax.numpy as jnp
from ruvllm_jax import compilation_cache as cc

events = []
try:
    jax.monitoring.register_event_listener(lambda event, **kw: events.append(event))
except Exception:
    pass
log_hits = []

class _HitLog(logging.Handler):
    def emit(self, record):
        if record.getMessage().startswith("Persistent compilation cache hit"):
            log_hits.append(record.getMessage())

_logger = logging.getLogger("jax._src.compiler")
_logger.setLevel(logging.DEBUG)
_logger.addHandler(_HitLog())

def hits():
    return max(events.count("/jax/compilation_cache/cache_hits"), len(log_hits))

def run_tiny(scale):
    # `scale` is baked into the program as a constant: each value is a distinct executable.
    f = jax.jit(lambda x: jnp.sin(x) * scale + jnp.cos(x))
    return float(f(jnp.ones(8)).sum())

def entries(folder):
    return sorted(n for n in os.listdir(folder) if not n.startswith(".")) if os.path.isdir(folder) else None

def report(**kw):
    print("RESULT " + json.dumps(kw))
"""

_JAX_CACHE_ENV = (
    "JAX_COMPILATION_CACHE_DIR",
    "JAX_ENABLE_COMPILATION_CACHE",
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS",
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES",
    cc.ENV_CACHE_DIR,
    cc.ENV_SWITCH,
)


def _child(code: str, **env_overrides: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in _JAX_CACHE_ENV}
    env["JAX_PLATFORMS"] = "cpu"  # no accelerator start-up (or memory grab) in a few-ms child
    env.update(env_overrides)
    proc = subprocess.run(
        [sys.executable, "-c", _PRELUDE + textwrap.dedent(code)],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, proc.stdout[-2000:] + proc.stderr[-2000:]
    return json.loads(lines[-1][len("RESULT "):])


def _jax_cache_config():
    return (jax.config.jax_compilation_cache_dir, jax.config.jax_enable_compilation_cache,
            jax.config.jax_persistent_cache_min_compile_time_secs)


# -- in this process: pure functions and errors raised before JAX's config is touched ------------

def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv(cc.ENV_CACHE_DIR, str(tmp_path / "mine"))
    assert cc.default_cache_dir() == str(tmp_path / "mine")
    monkeypatch.setenv(cc.ENV_CACHE_DIR, "~/somewhere")
    assert cc.default_cache_dir() == os.path.join(os.path.expanduser("~"), "somewhere")
    monkeypatch.delenv(cc.ENV_CACHE_DIR)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cc.default_cache_dir() == str(tmp_path / "xdg" / "ruvllm_jax" / "xla")
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")  # the XDG spec: relative means unset
    home = os.path.join(os.path.expanduser("~"), ".cache", "ruvllm_jax", "xla")
    assert cc.default_cache_dir() == home
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cc.default_cache_dir() == home


@pytest.mark.parametrize("value, off", [
    (None, False), ("", False), ("1", False), ("on", False), ("TRUE", False), ("yes", False),
    ("0", True), ("off", True), ("false", True), (" False ", True), ("no", True),
])
def test_switch_values(value, off):
    assert cc._env_disabled(value) is off


def test_unknown_switch_value_warns_and_stays_on():
    with pytest.warns(RuntimeWarning, match="maybe"):
        assert cc._env_disabled("maybe") is False


@pytest.mark.parametrize("kwargs, named", [
    (dict(path=123), "123"),
    (dict(path=b"/tmp/x"), "b'/tmp/x'"),
    (dict(path=""), "''"),
    (dict(path=["/tmp"]), "['/tmp']"),
    (dict(min_compile_time_secs=-1), "-1"),
    (dict(min_compile_time_secs="fast"), "'fast'"),
    (dict(min_compile_time_secs=True), "True"),
    (dict(min_compile_time_secs=math.nan), "nan"),
    (dict(min_compile_time_secs=math.inf), "inf"),
])
def test_bad_arguments_raise_config_error_naming_the_value(kwargs, named, tmp_path):
    kwargs = {"path": str(tmp_path / "c"), **kwargs}
    before = _jax_cache_config()
    with pytest.raises(ConfigError) as info:
        cc.enable_compilation_cache(kwargs.pop("path"), **kwargs)
    assert named in str(info.value)
    assert _jax_cache_config() == before
    assert not (tmp_path / "c").exists()


def test_unusable_folder_warns_and_returns_none(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    before = _jax_cache_config()
    with pytest.warns(RuntimeWarning, match="stays off"):
        assert cc.enable_compilation_cache(blocker / "xla") is None
    with pytest.warns(RuntimeWarning, match="cannot be used"):
        assert cc.enable_compilation_cache(blocker) is None
    assert _jax_cache_config() == before


# -- in child processes ---------------------------------------------------------------------------

_DEFAULT_ON = """
d = cc.ensure_default_compilation_cache()
again = cc.ensure_default_compilation_cache()
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)  # tiny programs compile in ms
run_tiny(2.0)
report(dir=d, again=again, hits=hits(), entries=entries(d) if d else None,
       jax_dir=jax.config.jax_compilation_cache_dir)
"""


def test_default_cache_writes_entries_and_a_second_process_hits(tmp_path):
    folder = str(tmp_path / "xla")
    first = _child(_DEFAULT_ON, **{cc.ENV_CACHE_DIR: folder})
    assert first["dir"] == folder and first["again"] == folder
    assert first["entries"], "nothing was written to the cache folder"
    assert first["hits"] == 0
    second = _child(_DEFAULT_ON, **{cc.ENV_CACHE_DIR: folder})
    assert second["dir"] == folder
    assert second["hits"] >= 1, "the second process compiled again instead of reading the cache"
    assert second["entries"] == first["entries"]  # all read back, nothing new


def test_switch_off_writes_nothing(tmp_path):
    folder = tmp_path / "xla"
    got = _child(_DEFAULT_ON, **{cc.ENV_CACHE_DIR: str(folder), cc.ENV_SWITCH: "0"})
    assert got["dir"] is None and got["jax_dir"] is None
    assert not folder.exists()


def test_user_folder_is_kept_explicit_enable_switches_and_disable_sticks(tmp_path):
    user, other, default = (str(tmp_path / n) for n in ("user", "other", "default"))
    got = _child(f"""
        jax.config.update("jax_compilation_cache_dir", {user!r})
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        run_tiny(1.0)  # JAX opens the user's cache before our hook runs
        kept = cc.ensure_default_compilation_cache()
        run_tiny(2.0)
        n_user = len(entries({user!r}))
        switched = cc.enable_compilation_cache({other!r}, min_compile_time_secs=0)
        run_tiny(3.0)  # after compiles: JAX must reopen its cache in the new folder
        n_user_after, n_other = len(entries({user!r})), len(entries({other!r}))
        cc.disable_compilation_cache()
        run_tiny(4.0)
        after_disable = cc.ensure_default_compilation_cache()
        run_tiny(5.0)
        report(kept=kept, switched=switched, n_user=n_user, n_user_after=n_user_after, n_other=n_other,
               n_user_end=len(entries({user!r})), n_other_end=len(entries({other!r})),
               after_disable=after_disable, default=entries({default!r}))
    """, **{cc.ENV_CACHE_DIR: default})
    assert got["kept"] == user
    assert got["n_user"] >= 2  # both programs went to the user's folder
    assert got["switched"] == other
    assert got["n_user_after"] == got["n_user"] and got["n_other"] >= 1
    assert got["after_disable"] is None
    assert (got["n_user_end"], got["n_other_end"]) == (got["n_user"], got["n_other"])  # off stays off
    assert got["default"] is None  # our default folder was never created
