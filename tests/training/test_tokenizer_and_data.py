"""The byte-level BPE round-trips any UTF-8 text; the split and the window sampler are as promised."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ruvllm_jax.training import bpe, data

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHAKESPEARE = os.path.join(REPO, "data", "tinyshakespeare.txt")


@pytest.fixture(scope="module")
def small_tok():
    text = data.read_text(SHAKESPEARE)[:100_000]
    return bpe.train_bpe_tokenizer([text], 512)


@settings(max_examples=200, deadline=None)
@given(st.text(min_size=0, max_size=200))
def test_tokenizer_round_trips_arbitrary_unicode(small_tok, text):
    ids = bpe.encode(small_tok, text)
    assert small_tok.decode(ids.tolist(), skip_special_tokens=False) == text


@settings(max_examples=100, deadline=None)
@given(st.text(min_size=1, max_size=100))
def test_token_byte_lengths_sum_to_utf8_length(small_tok, text):
    ids = bpe.encode(small_tok, text)
    assert bpe.token_byte_lengths(small_tok)[ids].sum() == len(text.encode("utf-8"))


def test_special_tokens_have_fixed_ids_and_are_not_added(small_tok):
    assert small_tok.token_to_id(bpe.BOS_TOKEN) == 0
    assert small_tok.token_to_id(bpe.EOS_TOKEN) == 1
    ids = bpe.encode(small_tok, "ROMEO:\n")
    assert 0 not in ids and 1 not in ids
    assert small_tok.get_vocab_size() == 512


def test_saved_folder_loads_in_transformers_with_same_ids(small_tok, tmp_path):
    from transformers import AutoTokenizer

    bpe.save_tokenizer_folder(small_tok, str(tmp_path), model_max_length=512)
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    text = "First Citizen:\nBefore we proceed any further, hear me speak. Grüße 🙂"
    assert hf.encode(text) == bpe.encode(small_tok, text).tolist()
    assert hf.bos_token == bpe.BOS_TOKEN and hf.eos_token == bpe.EOS_TOKEN
    assert json.load(open(tmp_path / "tokenizer_config.json"))["tokenizer_class"] == "PreTrainedTokenizerFast"


def test_split_is_on_a_line_boundary_and_covers_the_text():
    text = data.read_text(SHAKESPEARE)
    train, val = data.split_train_val(text, 0.9)
    assert train + val == text
    assert train.endswith("\n")
    assert abs(len(train) / len(text) - 0.9) < 0.001


def test_windows_depend_only_on_seed_and_step():
    tokens = np.arange(1000, dtype=np.int32)
    a = data.sample_windows(tokens, seed=3, step=7, batch_size=4, window=17)
    b = data.sample_windows(tokens, seed=3, step=7, batch_size=4, window=17)
    c = data.sample_windows(tokens, seed=3, step=8, batch_size=4, window=17)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.shape == (4, 17)
    np.testing.assert_array_equal(np.diff(a, axis=1), 1)  # consecutive tokens
