"""The tokenizer wrapper and the incremental decoder that streaming relies on.

The oracle for the decoder is the tokenizer's own full decode: pushing tokens one at a time must
emit pieces that concatenate to `decode(all ids)`, and no piece may carry half a UTF-8 character.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ruvllm_jax.backend.tokenizer import IncrementalDecoder, Tokenizer
from ruvllm_jax.errors import NotFoundError, TokenizationError
from ruvllm_jax.testing import train_tokenizer

# Characters absent from the training text, so their UTF-8 bytes become separate byte tokens.
MULTIBYTE = "Grüße 🙂🚀 日本語 — 𝄞 中文字符 ✨🎉 naïve ÀÉÎ 한국어 🇯🇵"


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    train_tokenizer(str(folder))
    return Tokenizer.from_file(str(folder / "tokenizer.json"), bos_token_id=0, eos_token_ids=(1,))


def stream(tok, ids):
    dec = IncrementalDecoder(tok)
    pieces = [dec.push(i) for i in ids]
    return pieces, dec.flush()


def test_encode_adds_bos_and_decode_skips_it(tok):
    ids = tok.encode("To be, or not to be")
    assert ids[0] == 0 and 0 not in ids[1:]
    assert tok.decode(ids) == "To be, or not to be"
    assert tok.encode("To be", add_special_tokens=False) == ids[1 : len(tok.encode("To be"))]
    assert tok.token_to_id("</s>") == 1 and tok.id_to_token(0) == "<s>"
    assert tok.vocab_size == 384 and tok.eos_token_ids == (1,) and tok.bos_token_id == 0


def test_multibyte_pieces_are_whole_characters(tok):
    ids = tok.encode(MULTIBYTE)
    pieces, rest = stream(tok, ids)
    assert "".join(pieces) + rest == tok.decode(ids) == MULTIBYTE
    assert rest == ""
    assert not any("\ufffd" in p for p in pieces)
    # The text really splits characters across tokens: some pushes had to hold back.
    assert sum(p == "" for p in pieces[1:]) >= 5
    # Holding back is all it does: pieces still come out as soon as a character completes.
    assert sum(p != "" for p in pieces) >= len(MULTIBYTE.split())


@settings(max_examples=40, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=30))
def test_incremental_decoding_equals_full_decoding(tok, text):
    ids = tok.encode(text, add_special_tokens=False)
    pieces, rest = stream(tok, ids)
    assert "".join(pieces) + rest == tok.decode(ids)
    assert not any("\ufffd" in p for p in pieces)


def test_flush_returns_a_truly_incomplete_tail(tok):
    ids = tok.encode("ab🙂", add_special_tokens=False)
    pieces, rest = stream(tok, ids[:-1])  # cut inside the emoji's bytes
    assert "".join(pieces) == "ab" and rest.startswith("\ufffd") is True


def test_padding_ids_of_a_larger_model_vocabulary_have_no_text(tok):
    """Qwen-style: the embedding has rows past the tokenizer's ids; the model may sample them."""
    ids = tok.encode("To be", add_special_tokens=False)
    padded = IncrementalDecoder(tok, model_vocab_size=512)
    pieces = [padded.push(i) for i in (ids[0], 400, *ids[1:], 511)] + [padded.flush()]
    assert "".join(pieces) == tok.decode(ids) and pieces[1] == "" and pieces[-2] == ""
    with pytest.raises(TokenizationError, match="512"):
        padded.push(512)
    with pytest.raises(TokenizationError, match="384"):
        IncrementalDecoder(tok).push(400)  # without the model's size, 400 is out of range


def test_non_str_input_is_a_tokenization_error(tok):
    for bad in (b"bytes", 42, None, ["a"]):
        with pytest.raises(TokenizationError, match=type(bad).__name__):
            tok.encode(bad)


def test_missing_or_broken_tokenizer_file(tmp_path):
    with pytest.raises(NotFoundError, match="nope.json"):
        Tokenizer.from_file(str(tmp_path / "nope.json"))
    bad = tmp_path / "tokenizer.json"
    bad.write_text('{"version": "1.0", "model": 12}')
    with pytest.raises(TokenizationError, match="tokenizer.json"):
        Tokenizer.from_file(str(bad))
