"""Steps in which no row samples compile only the greedy argmax (`engine._resolve_greedy`).

The reference for the greedy tokens is transformers' own greedy search with a repetition penalty;
the program is checked to hold no sort (the sampler's filters) while the full one does; a false
promise of greedy rows is refused before any work, and the sampled rows of a mixed batch still
draw what they draw alone.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import GenerationConfig

from ruvllm_jax.backend import engine
from ruvllm_jax.backend.jax_backend import JaxBackend
from ruvllm_jax.backend.sampling import SamplingParams
from ruvllm_jax.cache.paged import table_array
from ruvllm_jax.errors import ConfigError
from ruvllm_jax.types import GenerateParams, ModelConfig

PENALIZED_GREEDY = GenerateParams(max_tokens=12, temperature=0.0, repetition_penalty=1.3)
SAMPLED = GenerateParams(max_tokens=12, temperature=1.0, top_k=20, top_p=0.9, repetition_penalty=1.2, seed=5)


def test_greedy_generation_equals_transformers_with_a_repetition_penalty(llama_dir, backend):
    model, _ = llama_dir
    prompt = [0, 5, 9, 33, 77, 120, 7]
    gen_cfg = GenerationConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, do_sample=False,
                               max_new_tokens=PENALIZED_GREEDY.max_tokens, repetition_penalty=1.3)
    with torch.no_grad():
        ref = model.generate(torch.tensor([prompt]), generation_config=gen_cfg)[0, len(prompt):].tolist()
    if 1 in ref:
        ref = ref[: ref.index(1)]  # we stop before EOS
    assert backend.generate_tokens(prompt, PENALIZED_GREEDY) == ref


def _two_slots(backend, sampling_rows, prompt=(0, 5, 9, 33)):
    """A paged engine with one slot per row of `sampling_rows`, each owning its own 4 blocks."""
    eng = engine.Engine(backend.config, engine.EngineConfig(max_slots=2, layout="paged", max_len=64, block_size=16,
                                                            chunk=16))
    k = len(sampling_rows)
    tokens = np.zeros((k, 16), np.int32)
    tokens[:, : len(prompt)] = prompt
    presence = np.zeros((k, backend.config.vocab_size), np.bool_)
    presence[:, list(prompt)] = True
    tables = table_array([list(range(4 * i, 4 * i + 4)) for i in range(2)], 4, eng.config.pool_blocks)
    kwargs = dict(sampling=SamplingParams.stack(sampling_rows), rngs=jnp.stack([engine.make_rng(i) for i in range(k)]),
                  max_tokens=[12] * k, eos_ids=jnp.asarray([-1], jnp.int32), presence=presence, tables=tables[:k])
    return eng, (list(range(k)), tokens, [len(prompt)] * k), kwargs, tables


def _run(backend, sampling_rows, greedy):
    eng, args, kwargs, tables = _two_slots(backend, sampling_rows)
    state = eng.prefill(backend.params, eng.init_decode_state(), *args, greedy=greedy, **kwargs)
    first = np.asarray(state.token)[: len(sampling_rows)]
    state, out, count = eng.generate(backend.params, state, eos_ids=kwargs["eos_ids"], limit=11, tables=tables,
                                     greedy=greedy)
    return np.concatenate([first[:, None], np.asarray(out)[: len(sampling_rows), : int(count)]], axis=1)


def test_greedy_program_gives_the_full_samplers_tokens(backend):
    rows = [SamplingParams.from_generate_params(PENALIZED_GREEDY),
            SamplingParams.from_generate_params(PENALIZED_GREEDY.replace(repetition_penalty=1.0))]
    greedy, full, decided = _run(backend, rows, True), _run(backend, rows, False), _run(backend, rows, None)
    assert greedy.shape == (2, 12)
    np.testing.assert_array_equal(greedy, full)
    np.testing.assert_array_equal(decided, full)


def test_sampled_rows_take_the_full_sampler_when_greedy_is_decided(backend):
    rows = [SamplingParams.from_generate_params(PENALIZED_GREEDY), SamplingParams.from_generate_params(SAMPLED)]
    np.testing.assert_array_equal(_run(backend, rows, None), _run(backend, rows, False))


def test_a_false_greedy_promise_is_refused_before_any_work(backend):
    rows = [SamplingParams.from_generate_params(PENALIZED_GREEDY), SamplingParams.from_generate_params(SAMPLED)]
    eng, args, kwargs, tables = _two_slots(backend, rows)
    fresh = eng.init_decode_state()
    with pytest.raises(ConfigError, match=r"greedy=True but 1 row\(s\) sample \(temperature 1.0"):
        eng.prefill(backend.params, fresh, *args, greedy=True, **kwargs)
    state = eng.prefill(backend.params, fresh, *args, **kwargs)  # not donated by the refused call
    with pytest.raises(ConfigError, match="greedy=True but 1 row"):
        eng.generate(backend.params, state, eos_ids=kwargs["eos_ids"], limit=4, tables=tables, greedy=True)
    eng.generate(backend.params, state, eos_ids=kwargs["eos_ids"], limit=4, tables=tables)  # the state is whole
    with pytest.raises(ConfigError, match="greedy must be None, True or False, got 'yes'"):
        eng.generate(backend.params, state, eos_ids=kwargs["eos_ids"], limit=4, tables=tables, greedy="yes")


def test_resolve_greedy_reads_only_rows_still_running():
    temps = np.asarray([0.0, 0.7, 0.0], np.float32)
    assert engine._resolve_greedy(None, temps) is False
    assert engine._resolve_greedy(None, temps, done=np.asarray([False, True, False])) is True  # its row is done
    assert engine._resolve_greedy(True, temps, done=np.asarray([False, True, False])) is True
    assert engine._resolve_greedy(False, np.zeros(3, np.float32)) is False  # the full sampler is always allowed
    assert engine._resolve_greedy(None, np.float32(0.0)) is True  # one setting for the whole batch


def _stablehlo_of_decode(backend, greedy: bool) -> str:
    eng, args, kwargs, tables = _two_slots(backend, [SamplingParams.from_generate_params(PENALIZED_GREEDY)])
    state = eng.prefill(backend.params, eng.init_decode_state(), *args, **kwargs)
    return engine.generate_slots.lower(
        backend.params, state, jnp.asarray(tables), kwargs["eos_ids"], jnp.int32(4), None,
        cfg=eng.cfg, config=eng.config, greedy=greedy).as_text()


def test_greedy_decode_program_holds_no_sampler(backend):
    """The full sampler sorts (top-k / top-p); the greedy program has no sort and is smaller."""
    full, greedy = _stablehlo_of_decode(backend, False), _stablehlo_of_decode(backend, True)
    assert "stablehlo.sort" in full
    assert "stablehlo.sort" not in greedy
    assert len(greedy) < 0.8 * len(full)


def test_a_sampled_request_adds_one_program_and_no_more(llama_dir):
    """Greedy and sampled steps are two executables per shape, whatever the sampling values."""
    _, folder = llama_dir
    b = JaxBackend.new()
    b.load_model(folder, ModelConfig(max_context=57))  # a cache size no other test compiles

    def sizes():
        return engine.prefill_slots._cache_size(), engine.generate_slots._cache_size()

    ids = [0, 5, 9, 33, 2]
    start = sizes()
    b.generate_tokens(ids, PENALIZED_GREEDY.replace(max_tokens=3))
    assert sizes() == (start[0] + 1, start[1] + 1)
    b.generate_tokens(ids, SAMPLED.replace(max_tokens=3))
    assert sizes() == (start[0] + 2, start[1] + 2)
    b.generate_tokens(ids, SAMPLED.replace(max_tokens=3, temperature=0.3, top_k=0, top_p=0.5, seed=9))
    b.generate_tokens(ids, PENALIZED_GREEDY.replace(max_tokens=3, repetition_penalty=1.0))
    assert sizes() == (start[0] + 2, start[1] + 2)
