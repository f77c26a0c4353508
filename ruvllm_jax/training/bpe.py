"""Byte-level BPE tokenizer for the embedded model: train, save as an HF folder, measure bytes.

Byte-level means every UTF-8 string round-trips: the pre-tokenizer maps each byte to one printable
character (GPT-2's alphabet), BPE merges those, and the ByteLevel decoder maps them back. There is no
normalizer and no post-processor, so `tokenizer.encode(text)` yields exactly the token stream the
model was trained on (random windows of the raw text, no BOS).
"""

from __future__ import annotations

import json
import os
from typing import Iterable

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|eos|>"
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN)


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE with `vocab_size` entries (ids 0, 1 are `<|bos|>`, `<|eos|>`)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def save_tokenizer_folder(tok: Tokenizer, folder: str, *, model_max_length: int) -> None:
    """Write `tokenizer.json` + `tokenizer_config.json` that `AutoTokenizer` loads."""
    os.makedirs(folder, exist_ok=True)
    tok.save(os.path.join(folder, "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
    }
    with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)


def load_tokenizer(folder_or_file: str) -> Tokenizer:
    path = folder_or_file
    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.json")
    return Tokenizer.from_file(path)


def encode(tok: Tokenizer, text: str) -> np.ndarray:
    """Token ids int32 [N] of `text` (no special tokens added)."""
    return np.asarray(tok.encode(text, add_special_tokens=False).ids, dtype=np.int32)


def token_byte_lengths(tok: Tokenizer) -> np.ndarray:
    """UTF-8 bytes each token id stands for [V] (0 for special tokens).

    In the byte-level alphabet every byte is one character, so a token's length is its byte count;
    this holds even for tokens that are a fragment of a multi-byte character.
    """
    vocab = tok.get_vocab()
    lengths = np.zeros(tok.get_vocab_size(), dtype=np.int64)
    special = set(SPECIAL_TOKENS)
    for piece, i in vocab.items():
        lengths[i] = 0 if piece in special else len(piece)
    return lengths
