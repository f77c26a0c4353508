"""`ruvllm_jax.testing` is importable without the test extras and refuses unknown model kinds."""

from __future__ import annotations

import subprocess
import sys

import pytest

from ruvllm_jax.errors import ConfigError
from ruvllm_jax.testing import VOCAB, build_hf_model, rng_tokens


def test_importing_the_helpers_loads_neither_torch_nor_transformers():
    code = "import sys, ruvllm_jax.testing; print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"


def test_unknown_kind_is_a_config_error():
    with pytest.raises(ConfigError, match="got 'gpt2'"):
        build_hf_model("gpt2")


def test_rng_tokens_avoid_bos_and_eos():
    ids = rng_tokens(500, seed=1)
    assert ids.shape == (1, 500) and ids.min() >= 2 and ids.max() < VOCAB
