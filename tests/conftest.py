"""Shared fixtures: tiny random transformers models saved as HF folders, with a real tokenizer.

The plain helpers behind them live in `ruvllm_jax.testing` (the experiments use them too); tests
import those from there, and get these fixtures from pytest without importing anything.

At import, before any test creates a backend, the persistent compilation cache is pointed at a
private temp folder (`RUVLLM_JAX_CACHE_DIR`, unless already set), so the suite never writes into
the user's home. The folder is shared by the xdist workers, and by later runs, which start warm.
"""

from __future__ import annotations

import getpass
import os
import stat
import tempfile

import pytest

from ruvllm_jax.testing import build_hf_model, save_hf_model


def _private_test_cache_dir() -> str:
    """`<tmp>/ruvllm_jax_test_xla_cache_<uid>`, if it is ours alone, else a fresh temp folder.

    Cache entries are executed as code, so a predictable folder in a shared /tmp is used only when
    this user owns it and nobody else can write it.
    """
    uid = os.getuid() if hasattr(os, "getuid") else None
    path = os.path.join(tempfile.gettempdir(), f"ruvllm_jax_test_xla_cache_{getpass.getuser() if uid is None else uid}")
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        st = os.lstat(path)
        if uid is None or (stat.S_ISDIR(st.st_mode) and st.st_uid == uid and not st.st_mode & 0o022):
            return path
    except OSError:
        pass
    return tempfile.mkdtemp(prefix="ruvllm_jax_test_xla_cache_")


os.environ.setdefault("RUVLLM_JAX_CACHE_DIR", _private_test_cache_dir())

# tests/multidevice needs 8 virtual devices, so it runs in a pytest process of its own, started by
# tests/test_multidevice.py with RUVLLM_JAX_MULTIDEVICE=1; this process has one device.
collect_ignore = [] if os.environ.get("RUVLLM_JAX_MULTIDEVICE") else ["multidevice"]


@pytest.fixture(scope="session", params=["llama", "qwen2", "mistral"])
def hf_model_dir(request, tmp_path_factory):
    """(kind, transformers model, saved folder) for each supported family."""
    model = build_hf_model(request.param)
    folder = save_hf_model(model, str(tmp_path_factory.mktemp(request.param)))
    return request.param, model, folder


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory):
    model = build_hf_model("llama")
    return model, save_hf_model(model, str(tmp_path_factory.mktemp("llama_one")))
