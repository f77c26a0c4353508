"""Continuous batching on the paged cache: many requests at once give each the tokens it gets alone.

Oracles: transformers' own greedy `generate` of each prompt alone (tiny random Llama, Qwen2 and
Mistral, whose prompts outrun its sliding window), and our single-sequence path (the contiguous
cache, itself pinned to transformers in tests/models) for the embedded model, adapters and
sampling. Pools are made small so that requests queue for blocks and slots are reused mid-flight.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import GenerationConfig

from ruvllm_jax.backend.engine import Engine, EngineConfig
from ruvllm_jax.backend.jax_backend import JaxBackend
from ruvllm_jax.errors import ConfigError, GenerationError, InvalidOperationError, OutOfMemoryError, SessionError
from ruvllm_jax.testing import rng_tokens
from ruvllm_jax.types import GenerateParams

GREEDY = GenerateParams(max_tokens=24, temperature=0.0, repetition_penalty=1.0)
# One engine shape per model family (each shape compiles its own steps): 3 slots and a pool small
# enough that requests wait for blocks, not only for slots.
FAMILY = EngineConfig(max_slots=3, max_len=64, block_size=8, num_blocks=16, chunk=8)
EMBEDDED = EngineConfig(max_slots=3, max_len=128, block_size=16, num_blocks=6, chunk=8)


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    gen_cfg = GenerationConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, do_sample=False, max_new_tokens=n)
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), generation_config=gen_cfg)[0, len(ids):].tolist()
    return out[: out.index(1)] if 1 in out else out


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    """n prompts of different lengths (3 to 3 + 7 (n - 1) tokens), BOS first."""
    return [[0] + rng_tokens(2 + 7 * i, seed=seed + i)[0].tolist() for i in range(n)]


@pytest.fixture(scope="module")
def family(hf_model_dir):
    kind, model, folder = hf_model_dir
    b = JaxBackend.new()
    b.load_model(folder)
    return kind, model, b


@pytest.fixture(scope="module")
def embedded():
    b = JaxBackend.new()
    b.load_model(None)
    b.engine_config = EMBEDDED
    return b


def test_batched_greedy_equals_transformers_alone(family):
    """Five prompts of 3..31 tokens on 3 slots with a small pool: requests queue, slots are reused
    as others finish, and every sequence still gets transformers' tokens for that prompt alone."""
    kind, model, b = family
    server = b.serving_engine(FAMILY)
    batch = prompts(5)
    rids = [server.add_request(p, GREEDY) for p in batch]
    waited = False
    results = {r: [] for r in rids}
    while server.has_unfinished():
        for o in server.step():
            results[o.request_id].extend(o.tokens)
        waited |= server.num_waiting > 0 and server.num_running > 0
    assert waited  # the pool or the slots really made some wait
    for r, p in zip(rids, batch, strict=True):
        expected = hf_greedy(model, p, GREEDY.max_tokens)
        assert results[r] == expected, (kind, len(p))
    assert server.allocator.num_free == 16  # every block came back


def test_generate_batch_text_equals_generate_alone(embedded):
    texts = ["To be, or not to be", "ROMEO:", "The king is dead, and the crown", "O"]
    params = GenerateParams(max_tokens=20, temperature=0.0, repetition_penalty=1.0)
    alone = [embedded.generate(t, params) for t in texts]
    assert embedded.generate_batch(texts, params) == alone
    assert len(set(alone)) == len(alone)  # different continuations: rows cannot have been mixed up


def test_requests_join_mid_flight_and_keep_their_tokens(embedded):
    """Continuous batching: a request added while others decode joins them at the next step."""
    server = embedded.serving_engine()
    tok = embedded.tokenizer()
    short = GenerateParams(max_tokens=5, temperature=0.0, repetition_penalty=1.0)
    long = GenerateParams(max_tokens=20, temperature=0.0, repetition_penalty=1.0)
    a = server.add_request(tok.encode("JULIET:"), long)
    b = server.add_request(tok.encode("Now is the winter"), short)
    got = {a: [], b: []}
    for o in server.step():
        got[o.request_id].extend(o.tokens)
    c = server.add_request(tok.encode("KING HENRY"), long)
    got[c] = []
    assert server.num_waiting == 1 and 0 < len(got[a]) < long.max_tokens
    for o in server.step():
        got[o.request_id].extend(o.tokens)
    assert server.num_running == 2 and 0 < len(got[c])  # c runs beside a, which is not done
    while server.has_unfinished():
        for o in server.step():
            got[o.request_id].extend(o.tokens)
    for rid, text, p in ((a, "JULIET:", long), (b, "Now is the winter", short), (c, "KING HENRY", long)):
        assert got[rid] == embedded.generate_tokens(tok.encode(text), p)


def test_per_slot_sampling_parameters_and_streams(embedded):
    """A greedy request beside sampled ones keeps its greedy tokens; a seeded request draws the
    same tokens in a batch as alone, and another seed draws others."""
    tok = embedded.tokenizer()
    ids = tok.encode("The")
    greedy = GenerateParams(max_tokens=16, temperature=0.0, repetition_penalty=1.0)
    sampled = GenerateParams(max_tokens=16, temperature=1.0, top_k=50, top_p=0.95, repetition_penalty=1.2, seed=3)
    other = GenerateParams(max_tokens=16, temperature=1.0, top_k=50, top_p=0.95, repetition_penalty=1.2, seed=4)
    server = embedded.serving_engine()
    r = [server.add_request(ids, p) for p in (greedy, sampled, other)]
    out = server.run()
    assert out[r[0]] == embedded.generate_tokens(ids, greedy)
    assert out[r[1]] == embedded.generate_tokens(ids, sampled)
    assert out[r[2]] == embedded.generate_tokens(ids, other)
    assert out[r[1]] != out[r[2]]


def test_adapters_apply_to_every_slot(llama_dir):
    _, folder = llama_dir
    b = JaxBackend.new()
    b.load_model(folder)
    cfg, rng = b.config, np.random.default_rng(1)
    dims = {"q": (cfg.hidden_size, cfg.q_size), "v": (cfg.hidden_size, cfg.kv_size),
            "down": (cfg.intermediate_size, cfg.hidden_size)}
    adapters = {"layers": [{k: {"A": jnp.asarray(rng.normal(size=(i, 2)), jnp.float32),
                                "B": jnp.asarray(0.5 * rng.normal(size=(2, o)), jnp.float32),
                                "scaling": jnp.float32(2.0)} for k, (i, o) in dims.items()}
                           for _ in range(cfg.num_layers)]}
    batch = prompts(3, seed=10)
    plain = [b.generate_tokens(p, GREEDY) for p in batch]
    b.attach_adapters(adapters)
    alone = [b.generate_tokens(p, GREEDY) for p in batch]
    server = b.serving_engine(FAMILY)
    rids = [server.add_request(p, GREEDY) for p in batch]
    out = server.run()
    assert [out[r] for r in rids] == alone
    assert alone != plain  # the adapters changed the text, so the comparison means something


def test_session_second_turn_equals_the_whole_conversation_and_prefills_only_new_tokens(family):
    kind, _, b = family
    b.engine_config = FAMILY
    try:
        session = b.session()
        first, second = prompts(2, seed=20)
        second = second[1:]  # no BOS inside a conversation
        reply1 = session.generate_tokens(first, GREEDY)
        assert session.history == first + reply1
        before = session.prefilled_tokens
        reply2 = session.generate_tokens(second, GREEDY)
        pending = 0 if len(reply1) < GREEDY.max_tokens else 1  # the last reply token was never fed
        assert session.prefilled_tokens - before == len(second) + pending
        assert reply2 == b.generate_tokens(first + reply1 + second, GREEDY), kind
        assert session.history == first + reply1 + second + reply2
        session.close()
        with pytest.raises(SessionError, match="closed"):
            session.generate_tokens([5], GREEDY)
    finally:
        b.engine_config = None


def test_session_text_turns_on_the_embedded_model(embedded):
    tok = embedded.tokenizer()
    params = GenerateParams(max_tokens=12, temperature=0.0, repetition_penalty=1.0)
    with embedded.session() as s:
        s.generate("ROMEO:", params)
        history = s.history
        reply = s.generate("\nJULIET:", params)
        whole = embedded.generate_tokens(history + tok.encode("\nJULIET:", add_special_tokens=False), params)
        assert reply == tok.decode(whole)


def test_out_of_blocks_requests_wait_and_never_fitting_ones_are_refused(embedded):
    tok = embedded.tokenizer()
    params = GenerateParams(max_tokens=40, temperature=0.0, repetition_penalty=1.0)
    # 6 blocks of 16 = 96 tokens: each request needs 3 blocks (~45 tokens), so two run and, with a
    # slot still free, the others wait for blocks.
    server = embedded.serving_engine()
    texts = ["First Citizen:", "MENENIUS:", "All:", "Second Citizen:"]
    rids = [server.add_request(tok.encode(t), params) for t in texts]
    results = {r: [] for r in rids}
    for o in server.step():
        results[o.request_id].extend(o.tokens)
    assert server.num_running == 2 and server.num_waiting == 2
    while server.has_unfinished():
        for o in server.step():
            results[o.request_id].extend(o.tokens)
    for r, t in zip(rids, texts, strict=True):
        assert results[r] == embedded.generate_tokens(tok.encode(t), params)
    with pytest.raises(OutOfMemoryError, match="a request of 110 tokens needs 7 blocks of 16; the pool has 6"):
        server.add_request(list(range(10)), GenerateParams(max_tokens=100))
    assert not server.has_unfinished()


def test_bad_requests_change_nothing(embedded):
    server = embedded.serving_engine()
    from ruvllm_jax.errors import TokenizationError

    with pytest.raises(TokenizationError):
        server.add_request([5, 99999], GREEDY)
    with pytest.raises(GenerationError, match="more than the engine's max_len=128"):
        server.add_request([5] * 100, GenerateParams(max_tokens=40))
    with pytest.raises(GenerationError, match="no tokens"):
        server.add_request([], GREEDY)
    with pytest.raises(ConfigError, match="GenerateParams"):
        server.add_request([5], {"max_tokens": 3})
    with pytest.raises(SessionError, match="no open session 12345"):
        server.add_request([5], GREEDY, session=12345)
    with pytest.raises(InvalidOperationError):
        server.cancel(777)
    assert not server.has_unfinished() and server.allocator.num_free == server.engine.config.pool_blocks


def test_cancel_frees_the_slot_and_its_blocks(embedded):
    server = embedded.serving_engine()
    greedy = GenerateParams(max_tokens=20, temperature=0.0, repetition_penalty=1.0)
    a = server.add_request([0, 5, 6], GenerateParams(max_tokens=70, temperature=0.0))  # 5 of the 6 blocks
    b = server.add_request([0, 7], greedy)  # 2 blocks: waits
    server.step(limit=2)
    assert server.num_running == 1 and server.num_waiting == 1
    assert server.allocator.num_free == 6 - server.allocator.blocks_for(3 + 70)
    server.cancel(a)
    assert server.num_running == 0 and server.allocator.num_free == 6
    out = server.run()
    assert out[b] == embedded.generate_tokens([0, 7], greedy)


@pytest.mark.parametrize("bad", [dict(max_slots=0), dict(layout="ring"), dict(kv_dtype="int4"),
                                 dict(layout="contiguous", max_slots=2), dict(block_size=True)])
def test_engine_config_refuses_bad_values(bad):
    with pytest.raises(ConfigError, match=str(next(iter(bad.values())))):
        EngineConfig(**bad)


def test_generate_batch_refuses_bad_arguments(embedded):
    with pytest.raises(ConfigError, match="prompts must be a sequence of strs"):
        embedded.generate_batch("one string")
    with pytest.raises(ConfigError, match="one per prompt"):
        embedded.generate_batch(["a", "b"], [GREEDY])
    assert embedded.generate_batch([], GREEDY) == []


def test_decode_loop_updates_the_pool_in_place(embedded):
    """Inside the decode while-loop the pools are read (attention) and written (the new token):
    with the write tied after the read, XLA:CPU updates them in place (no pool-sized copies)."""
    cfg = embedded.config
    eng = Engine(cfg, EngineConfig(max_slots=2, max_len=64, block_size=16, num_blocks=32))
    state = eng.init_decode_state()
    from ruvllm_jax.backend.engine import generate_slots

    tables = jnp.zeros((2, 4), jnp.int32)
    hlo = generate_slots.lower(embedded.params, state, tables, jnp.asarray([-1]), jnp.int32(4), None, cfg=cfg,
                          config=eng.config).compile().as_text()
    pool = f"f32[{cfg.num_kv_heads},32,16,{cfg.head_dim}]"
    copies = [line for line in hlo.splitlines() if " copy(" in line and pool in line.split("=")[1][:60]]
    assert copies == []
    assert pool in hlo  # the pattern does name the pools
    np.testing.assert_array_equal(np.asarray(state.done), [True, True])


def test_later_prefills_reuse_the_first_prefills_executable(embedded):
    """The first state is committed to the device like the states steps return, so the second
    prefill of the same shape (on a state a step returned) compiles nothing new."""
    from ruvllm_jax.backend import engine

    server = embedded.serving_engine()
    tok = embedded.tokenizer()
    server.add_request(tok.encode("ROMEO:"), GREEDY)
    server.step(limit=1)  # prefill on the fresh state (compiles, unless an earlier test did)
    compiled = engine.prefill_slots._cache_size()
    server.add_request(tok.encode("All:"), GREEDY)
    server.step(limit=1)  # the same prefill shape, on a state `generate` returned
    assert engine.prefill_slots._cache_size() == compiled
    server.run()
