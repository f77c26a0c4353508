"""Bad arguments at the API boundary: each raises its `RuvLLMError` subclass naming the value, and a
rejected call leaves the backend exactly as it was (params, adapters, stats, greedy output).

The regression tests pin down inputs that used to be accepted silently or escape as plain Python
exceptions (top_k=2**40, seeds >= 2**63, float token ids, stop_sequences=None, a lone surrogate, a
params dict); the property tests throw values of many types at `GenerateParams` and at
`generate_tokens` and accept only success or a `RuvLLMError`.
"""

from __future__ import annotations

import hashlib
import math

import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from ruvllm_jax.backend import engine
from ruvllm_jax.backend.jax_backend import JaxBackend
from ruvllm_jax.backend.sampling import SamplingParams
from ruvllm_jax.backend.tokenizer import IncrementalDecoder
from ruvllm_jax.errors import ConfigError, GenerationError, RuvLLMError, TokenizationError
from ruvllm_jax.types import GenerateParams

PROMPT = "To be, or not to be"
GREEDY = GenerateParams(max_tokens=6, temperature=0.0, repetition_penalty=1.0)
SAMPLED = GenerateParams(max_tokens=16, temperature=1.0, top_p=1.0, repetition_penalty=1.0, seed=5)
VOCAB = 384

# Derandomized with no example database, so every run tests the same examples and cannot flake.
HYP = dict(derandomize=True, database=None, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
PARAMS_EXAMPLES = 300
TOKEN_EXAMPLES = 100


def tree_hash(tree) -> str:
    """sha256 over every leaf's path, dtype, shape and bytes."""
    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        a = np.asarray(leaf)
        h.update(f"{jax.tree_util.keystr(path)}|{a.dtype}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def snapshot(b: JaxBackend):
    """All the state a call could change."""
    return (tree_hash(b.params), None if b.adapters is None else tree_hash(b.adapters), b.eos_token_ids, b.device(),
            b.model_info(), b.memory_stats(), b.decode_chunk_size)


def assert_rejected(b: JaxBackend, error, match, call):
    before = snapshot(b)
    with pytest.raises(error, match=match):
        call()
    assert snapshot(b) == before


# --- regressions for silent acceptances ---------------------------------------------------------


def test_top_k_beyond_the_vocabulary_is_a_config_error_naming_both(backend):
    ids = backend.tokenizer().encode(PROMPT)
    greedy = backend.generate_tokens(ids, GREEDY)
    huge = GenerateParams(top_k=2**40, temperature=1.0, max_tokens=4, seed=1)  # the model is unknown here
    assert_rejected(backend, ConfigError, r"top_k=1099511627776 exceeds the vocabulary size 384",
                    lambda: backend.generate_tokens(ids, huge))
    assert_rejected(backend, ConfigError, "top_k=385 exceeds the vocabulary size 384",
                    lambda: backend.generate(PROMPT, huge.replace(top_k=385)))
    assert_rejected(backend, ConfigError, "top_k=385", lambda: backend.generate_tokens(ids, huge.replace(
        top_k=385, max_tokens=0)))  # checked even when nothing would be generated
    # top_k == vocab keeps every token, exactly like 0 (off).
    assert backend.generate_tokens(ids, SAMPLED.replace(top_k=VOCAB)) == backend.generate_tokens(ids, SAMPLED)
    with pytest.raises(ConfigError, match="does not fit int32"):
        SamplingParams.from_generate_params(huge)
    assert backend.generate_tokens(ids, GREEDY) == greedy


def test_seeds_cover_64_bits_and_outside_is_a_config_error(backend):
    def key(seed):
        return tuple(np.asarray(jax.random.key_data(engine.make_rng(seed))).ravel())

    assert key(2**63 + 5) != key(5)  # the top bit used to be masked away
    assert len({key(s) for s in (5, 2**63 + 5, 2**32 + 5, 2**63 + 2**32 + 5, 2**64 - 1, 2**31 + 5)}) == 6
    # Seeds below 2**63 keep the streams they always had: low half seeds the key, high half folds in.
    for s in (5, 2**40 + 1, 2**63 - 1):
        old = jax.random.fold_in(jax.random.key(s & 0xFFFFFFFF), (s >> 32) & 0x7FFFFFFF)
        assert key(s) == tuple(np.asarray(jax.random.key_data(old)).ravel())
    assert key(np.uint64(2**64 - 1)) == key(2**64 - 1)
    ids = backend.tokenizer().encode(PROMPT)
    low = backend.generate_tokens(ids, SAMPLED)
    assert backend.generate_tokens(ids, SAMPLED.replace(seed=2**63 + 5)) != low
    assert backend.generate_tokens(ids, SAMPLED.replace(seed=2**64 - 1))  # the top of the range works
    for bad in (2**64, -1, 2**70, True, 5.0):
        with pytest.raises(ConfigError, match=r"seed must be None or an int in \[0, 2\*\*64\)"):
            GenerateParams(seed=bad)
        with pytest.raises(ConfigError, match=r"seed .*\[0, 2\*\*64\)"):
            engine.make_rng(bad)
    assert backend.generate_tokens(ids, SAMPLED) == low


@pytest.mark.parametrize("bad, match", [
    ([0, 3.0], r"item 1 is 3\.0 \(float\)"),
    ([0, 3.7], r"item 1 is 3\.7 \(float\)"),
    ([0, True], r"item 1 is True \(bool\)"),
    ([0, "5"], r"item 1 is '5' \(str\)"),
    ([0, None], r"item 1 is None"),
    ([[0, 3]], r"item 0 is \[0, 3\] \(list\)"),
    ("abc", r"got str 'abc'"),
    (b"\x00\x03", "got bytes"),
    ({0, 3}, "got set"),
    ({0: 1}, "got dict"),
    (7, "got int 7"),
    (None, "got NoneType"),
    (np.array([0.0, 3.0]), "dtype float64"),
    (np.array([True, False]), "dtype bool"),
    (np.array([[0, 3]]), r"shape \(1, 2\)"),
    (np.int64(3), r"shape \(\)"),
    ([0, 384], r"\[0, 384\); item 1 is 384"),
    ([0, -1], r"item 1 is -1"),
    ([0, 2**70], r"item 1 is 1180591620717411303424"),
    (np.array([0, 384]), r"item 1 is 384"),
])
def test_bad_token_ids_are_tokenization_errors_naming_the_value(backend, bad, match):
    assert_rejected(backend, TokenizationError, match, lambda: backend.generate_tokens(bad, GREEDY))
    assert_rejected(backend, TokenizationError, match, lambda: backend.generate_tokens(bad, GREEDY.replace(
        max_tokens=0)))  # checked even when nothing would be generated


def test_integer_arrays_and_numpy_ints_are_token_ids(backend):
    ids = backend.tokenizer().encode(PROMPT)
    want = backend.generate_tokens(ids, GREEDY)
    for same in (tuple(ids), np.asarray(ids, np.int64), np.asarray(ids, np.int32), np.asarray(ids, np.uint16),
                 jax.numpy.asarray(ids), [np.int64(t) for t in ids]):
        assert backend.generate_tokens(same, GREEDY) == want
    with pytest.raises(GenerationError, match="no tokens"):
        backend.generate_tokens([], GREEDY.replace(max_tokens=0))


@pytest.mark.parametrize("bad", [None, 5, "stop", ("a", None), ("a", ""), {"a"}, {"a": 1}, [["a"]], (b"a",)])
def test_bad_stop_sequences_are_config_errors(bad):
    if bad == "stop":  # a single str is one stop sequence, on purpose
        assert GenerateParams(stop_sequences=bad).stop_sequences == ("stop",)
        return
    with pytest.raises(ConfigError, match="stop_sequences"):
        GenerateParams(stop_sequences=bad)  # None used to escape as a TypeError


def test_a_lone_surrogate_is_a_tokenization_error(backend):
    tok = backend.tokenizer()
    with pytest.raises(TokenizationError, match=r"U\+D800\) at index 0 is a lone surrogate"):
        tok.encode("\ud800")
    with pytest.raises(TokenizationError, match=r"U\+DFFF\) at index 2"):
        tok.encode("ab\udfffc", add_special_tokens=False)
    pieces = []
    assert_rejected(backend, TokenizationError, "lone surrogate", lambda: backend.generate("hi \ud800", GREEDY))
    assert_rejected(backend, TokenizationError, "lone surrogate",
                    lambda: backend.generate_stream("\udc00", GREEDY, pieces.append))
    assert pieces == []


@pytest.mark.parametrize("bad", [{"max_tokens": 3}, {}, (), 3, "greedy", SamplingParams.create()])
def test_anything_but_generate_params_is_a_config_error(backend, bad):
    match = r"params must be a GenerateParams; pass GenerateParams\("
    ids = backend.tokenizer().encode(PROMPT)
    assert_rejected(backend, ConfigError, match, lambda: backend.generate("hi", bad))  # {} used to mean defaults
    assert_rejected(backend, ConfigError, match, lambda: backend.generate_tokens(ids, bad))
    assert_rejected(backend, ConfigError, match, lambda: backend.generate_stream("hi", bad, print))
    with pytest.raises(ConfigError, match=r"pass GenerateParams\("):
        SamplingParams.from_generate_params(bad)


def test_a_callback_that_is_not_callable_is_a_config_error(backend):
    for bad in (None, "print", 3, [print]):
        assert_rejected(backend, ConfigError, "callback must be callable",
                        lambda bad=bad: backend.generate_stream(PROMPT, GREEDY, bad))


def test_tokenizer_boundary(backend):
    tok = backend.tokenizer()
    with pytest.raises(TokenizationError, match=r"\[0, 384\); item 1 is 384"):
        tok.decode([5, 384])  # the tokenizer used to drop unknown ids silently
    with pytest.raises(TokenizationError, match=r"item 0 is 3\.0"):
        tok.decode([3.0])
    with pytest.raises(TokenizationError, match="item 0 is -1"):
        tok.decode([-1])
    assert tok.decode(np.asarray(tok.encode("To be"))) == "To be"
    with pytest.raises(ConfigError, match="skip_special_tokens must be a bool"):
        tok.decode([5], skip_special_tokens="no")
    with pytest.raises(ConfigError, match="add_special_tokens must be a bool"):
        tok.encode("a", add_special_tokens=None)
    with pytest.raises(TokenizationError, match="token must be a str"):
        tok.token_to_id(5)
    with pytest.raises(TokenizationError, match="token id must be an int"):
        tok.id_to_token(1.0)
    assert tok.id_to_token(-1) is None and tok.id_to_token(384) is None and tok.id_to_token(0) == "<s>"
    dec = IncrementalDecoder(tok)
    with pytest.raises(TokenizationError, match=r"item 0 is 3\.7"):
        dec.push(3.7)
    with pytest.raises(TokenizationError, match="item 0 is 384"):
        dec.push(384)
    assert dec._ids == []  # a refused push keeps the decoder as it was


def test_rejected_calls_keep_attached_adapters_and_greedy_output(llama_dir):
    from ruvllm_jax.lora import MicroLoRA

    _, folder = llama_dir
    b = JaxBackend.new()
    b.load_model(folder)
    lora = MicroLoRA.for_model(b.config, rank=2, seed=0)
    keys = iter(jax.random.split(jax.random.PRNGKey(3), 64))
    b.adapters = jax.tree.map(lambda p: p + 0.5 * jax.random.normal(next(keys), p.shape), lora.adapters)
    ids = b.tokenizer().encode(PROMPT)
    want = b.generate_tokens(ids, GREEDY)
    for call in (
        lambda: b.generate_tokens([0, 3.0], GREEDY),
        lambda: b.generate_tokens(ids, GREEDY.replace(top_k=10**6)),
        lambda: b.generate_tokens(ids, {"max_tokens": 3}),
        lambda: b.generate("\ud800", GREEDY),
        lambda: b.generate_stream(PROMPT, GREEDY, None),
        lambda: b.generate_tokens(ids, GREEDY.replace(max_tokens=10**6)),
        lambda: b.load_model(folder, {"max_context": 64}),
        lambda: b.load_model(12345),
    ):
        before = snapshot(b)
        with pytest.raises(RuvLLMError):
            call()
        assert snapshot(b) == before
    assert b.generate_tokens(ids, GREEDY) == want


# --- properties ---------------------------------------------------------------------------------

JUNK = st.one_of(
    st.none(), st.booleans(), st.text(max_size=4), st.binary(max_size=3),
    st.floats(allow_nan=True, allow_infinity=True), st.floats(min_value=-1e-40, max_value=1e-40),
    st.integers(-(2**70), 2**70), st.sampled_from([10**400, -(10**400), 2**64, 2**63 + 5, 2**31, -1, 0]),
    st.lists(st.integers(0, 5), max_size=2), st.dictionaries(st.text(max_size=2), st.integers(), max_size=2),
    st.sampled_from([np.float32(0.5), np.int64(3), np.uint64(2**64 - 1), np.bool_(True), np.float64("nan")]),
)
STOPS = st.one_of(st.lists(st.text(max_size=3), max_size=3), st.tuples(st.text(min_size=1, max_size=3)))


def mostly(valid):
    """A valid value four times in five, else junk, so whole valid GenerateParams come up often too."""
    return st.integers(0, 4).flatmap(lambda i: JUNK if i == 0 else valid)


FIELD_VALUES = {
    "max_tokens": mostly(st.integers(0, 64)),
    "temperature": mostly(st.one_of(st.floats(0, 3), st.just(0))),
    "top_p": mostly(st.floats(0, 1)),
    "top_k": mostly(st.integers(0, 500)),
    "repetition_penalty": mostly(st.floats(0.5, 2)),
    "stop_sequences": mostly(STOPS),
    "seed": mostly(st.one_of(st.none(), st.integers(0, 2**64 - 1))),
}


@settings(max_examples=PARAMS_EXAMPLES, **HYP)
@given(st.fixed_dictionaries({}, optional=FIELD_VALUES))
def test_generate_params_construct_or_raise_a_config_error(fields):
    try:
        p = GenerateParams(**fields)
    except ConfigError as e:  # any other exception type fails the test
        event("rejected")
        assert any(name in str(e) for name in fields), e  # the message names the field
        return
    event("constructed")
    assert isinstance(p.max_tokens, int) and not isinstance(p.max_tokens, bool) and p.max_tokens >= 0
    assert math.isfinite(float(p.temperature)) and float(p.temperature) >= 0
    assert 0 < float(p.top_p) <= 1 and 0 < float(p.repetition_penalty) < math.inf
    assert type(p.top_k) is int and p.top_k >= 0
    assert isinstance(p.stop_sequences, tuple) and all(isinstance(s, str) and s for s in p.stop_sequences)
    assert p.seed is None or (type(p.seed) is int and 0 <= p.seed < 2**64)
    hash(p)
    try:
        s = SamplingParams.from_generate_params(p, vocab_size=VOCAB)
    except ConfigError as e:
        assert p.top_k > VOCAB and "top_k" in str(e)
        return
    # Nothing is clipped on the way to float32: positive stays positive, finite stays finite.
    assert bool(s.temperature > 0) == (float(p.temperature) > 0) and np.isfinite(float(s.temperature))
    assert 0 < float(s.top_p) <= 1 and 0 < float(s.repetition_penalty) < np.inf and int(s.top_k) == p.top_k


TOKEN = st.one_of(
    st.integers(0, VOCAB - 1), st.integers(0, VOCAB - 1), st.integers(-(2**40), -1), st.integers(VOCAB, 2**70),
    st.floats(0, VOCAB), st.booleans(), st.text(max_size=2), st.none(), st.lists(st.integers(0, 9), max_size=2),
    st.integers(0, VOCAB - 1).map(np.int64),
)
TOKEN_IDS = st.one_of(
    st.lists(TOKEN, max_size=10), st.lists(st.integers(0, VOCAB - 1), max_size=10),
    st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=10).map(tuple),
    st.lists(st.integers(-3, VOCAB + 3), max_size=10).map(lambda x: np.asarray(x, np.int64)),
    st.lists(st.floats(0, VOCAB), max_size=4).map(np.asarray), st.text(max_size=4), JUNK,
)


def _is_valid_ids(ids) -> bool:
    if isinstance(ids, np.ndarray):
        return ids.ndim == 1 and ids.dtype.kind in "iu" and len(ids) > 0 and bool(((ids >= 0) & (ids < VOCAB)).all())
    return (isinstance(ids, (list, tuple)) and len(ids) > 0 and all(
        isinstance(t, (int, np.integer)) and not isinstance(t, bool) and 0 <= t < VOCAB for t in ids))


@settings(max_examples=TOKEN_EXAMPLES, **HYP)
@given(TOKEN_IDS)
def test_generate_tokens_works_or_raises_a_ruvllm_error_and_changes_nothing(backend, ids):
    before = snapshot(backend)
    params = GREEDY.replace(max_tokens=2)
    try:
        out = backend.generate_tokens(ids, params)
    except (TokenizationError, GenerationError) as e:  # any other exception type fails the test
        event(f"rejected: {type(e).__name__}")
        assert not _is_valid_ids(ids), e
        assert snapshot(backend) == before
        return
    event("generated")
    assert _is_valid_ids(ids)
    assert len(out) <= 2 and all(type(t) is int and 0 <= t < VOCAB for t in out)
    assert snapshot(backend)[:5] == before[:5]  # only the cache stats of the latest call may change
