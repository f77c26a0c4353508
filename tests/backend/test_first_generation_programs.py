"""A first generation compiles the engine's own programs and nothing else.

Every eager jnp op on the host path (a cast of a Python number, a `jnp.zeros`, a key, a stack) is an XLA
program of its own, compiled on first use and kept: ~1.5 MB and tens of ms each on XLA:CPU. A first
generation used to compile 23 programs, 18 of them such one-op programs; it now compiles the fresh state,
the request's keys, the prefill, the decode and the slot's release.
"""

from __future__ import annotations

import logging
import re

import jax
import pytest

from ruvllm_jax.backend import engine
from ruvllm_jax.backend.jax_backend import JaxBackend
from ruvllm_jax.types import GenerateParams, ModelConfig

ENGINE_PROGRAMS = {"_fresh_state_program", "_keys_from_halves", "prefill_slots", "generate_slots", "free_slot"}


def _compiled_names(caplog, fn) -> list[str]:
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="jax"), jax.log_compiles(True):
        fn()
    return [m.group(1) for r in caplog.records if (m := re.match(r"Compiling (?:jit\()?([^()\s]+)", r.getMessage()))]


@pytest.mark.parametrize("params", [
    GenerateParams(max_tokens=30, temperature=0.0, repetition_penalty=1.3),
    GenerateParams(max_tokens=30, temperature=0.8, top_k=5, top_p=0.9, seed=11),
], ids=["greedy", "sampled"])
def test_first_generation_compiles_only_the_engine_programs(llama_dir, caplog, params):
    _, folder = llama_dir
    b = JaxBackend.new()
    # A cache length no other test uses (4 + 30 tokens bucket to 64, capped at max_context; other
    # tests use 53, 57, 59, 60, 64, ...): the engine's programs (and any eager op shaped by the
    # cache) are new to this process whatever ran before in it, so each is lowered, and logged, here.
    max_context = 43 if params.temperature == 0 else 47
    b.load_model(folder, ModelConfig(max_context=max_context))
    assert engine.buckets(4, params.max_tokens, max_context)[1] == max_context
    names = _compiled_names(caplog, lambda: b.generate_tokens([1, 4, 9, 2], params))
    assert set(names) <= ENGINE_PROGRAMS, names
    assert {"_fresh_state_program", "prefill_slots", "generate_slots"} <= set(names), names
    # The same request again compiles nothing.
    assert _compiled_names(caplog, lambda: b.generate_tokens([1, 4, 9, 2], params)) == []
