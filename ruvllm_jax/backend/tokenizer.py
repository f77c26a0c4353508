"""A thin wrapper over a `tokenizers` tokenizer.json, plus incremental detokenization for streaming.

The incremental decoder holds back text while the last tokens decode to an incomplete UTF-8
sequence (shown as U+FFFD), so a streamed piece never contains half a character.
"""

from __future__ import annotations

import numbers
import os
import reprlib
from collections.abc import Sequence
from typing import Optional

import numpy as np

from ruvllm_jax.errors import ConfigError, NotFoundError, TokenizationError

_short = reprlib.Repr()
_short.maxstring = _short.maxother = 60
_short.maxlist = _short.maxtuple = 8


def _is_token_int(t) -> bool:
    return isinstance(t, numbers.Integral) and not isinstance(t, bool)


def check_token_ids(ids, vocab_size: Optional[int], what: str = "token ids") -> list[int]:
    """`ids` as a list of Python ints, or a `TokenizationError` naming the first bad value.

    Accepted: a 1-D sequence (list, tuple, range) of ints, numpy integer scalars included, or a 1-D
    integer numpy/JAX array. Rejected: str/bytes, floats (3.0 as well as 3.7: nothing is truncated),
    bools, nested sequences, unordered or one-shot iterables (set, dict, generator), and ids outside
    [0, vocab_size) (just >= 0 when `vocab_size` is None).
    """
    expected = "a 1-D sequence of int token ids (a list, tuple or integer array)"
    if isinstance(ids, (str, bytes, bytearray, memoryview)):
        raise TokenizationError(f"{what} must be {expected}, got {type(ids).__name__} {_short.repr(ids)}")
    if not isinstance(ids, Sequence) and hasattr(ids, "__array__"):
        try:
            arr = np.asarray(ids)
        except Exception as e:  # an array-like that numpy cannot read
            raise TokenizationError(f"{what} must be {expected}, got {type(ids).__name__}: {e}") from None
        if arr.ndim != 1:
            raise TokenizationError(f"{what} must be {expected}, got an array of shape {arr.shape}")
        if arr.dtype.kind not in "iu":
            raise TokenizationError(f"{what} must be {expected}, got an array of dtype {arr.dtype}")
        values = arr.tolist()
    elif isinstance(ids, Sequence):
        values = list(ids)
        for i, t in enumerate(values):
            if not _is_token_int(t):
                raise TokenizationError(
                    f"{what} must be {expected}; item {i} is {_short.repr(t)} ({type(t).__name__}), not an int"
                )
        values = [int(t) for t in values]
    else:
        raise TokenizationError(f"{what} must be {expected}, got {type(ids).__name__} {_short.repr(ids)}")
    for i, t in enumerate(values):
        if t < 0 or (vocab_size is not None and t >= vocab_size):
            bound = f"[0, {vocab_size})" if vocab_size is not None else ">= 0"
            raise TokenizationError(f"{what} must be in {bound}; item {i} is {t}")
    return values


def _check_flag(name: str, value) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be a bool, got {value!r}")


class Tokenizer:
    """Encode/decode with the special-token handling stored in `tokenizer.json`."""

    def __init__(self, tok, *, bos_token_id: Optional[int] = None, eos_token_ids: Sequence[int] = ()):
        self._tok = tok
        self.bos_token_id = bos_token_id
        self.eos_token_ids = tuple(eos_token_ids)

    @classmethod
    def from_file(cls, path: str, **kwargs) -> "Tokenizer":
        from tokenizers import Tokenizer as _HFTokenizer

        if not isinstance(path, (str, os.PathLike)):
            raise ConfigError(f"tokenizer path must be a str or os.PathLike, got {type(path).__name__} {path!r}")
        path = os.fspath(path)
        if not isinstance(path, str):
            raise ConfigError(f"tokenizer path must be a str path, got {type(path).__name__} {path!r}")
        if not os.path.isfile(path):
            raise NotFoundError(f"tokenizer file {path!r} does not exist")
        try:
            tok = _HFTokenizer.from_file(path)
        except Exception as e:  # the Rust side raises plain Exceptions
            raise TokenizationError(f"cannot read tokenizer {path!r}: {e}") from None
        return cls(tok, **kwargs)

    @property
    def backend(self):
        """The wrapped `tokenizers.Tokenizer` (what a GGUF export serializes)."""
        return self._tok

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; `TokenizationError` for a non-str or text UTF-8 cannot encode."""
        if not isinstance(text, str):
            raise TokenizationError(f"expected text as str, got {type(text).__name__}")
        _check_flag("add_special_tokens", add_special_tokens)
        try:
            return self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        except Exception as e:  # the Rust side raises plain TypeErrors/Exceptions
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as u:
                ch = text[u.start]
                raise TokenizationError(
                    f"text cannot be encoded as UTF-8: {ch!r} (U+{ord(ch):04X}) at index {u.start} is a lone "
                    f"surrogate; expected valid Unicode text"
                ) from None
            raise TokenizationError(f"cannot encode text {_short.repr(text)}: {type(e).__name__}: {e}") from None

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; ids must be ints in [0, vocab_size) (an unknown id is an error, not dropped)."""
        values = check_token_ids(ids, self.vocab_size, "token ids to decode")
        _check_flag("skip_special_tokens", skip_special_tokens)
        return self._tok.decode(values, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> Optional[int]:
        """The id of `token`, None when the vocabulary has no such token."""
        if not isinstance(token, str):
            raise TokenizationError(f"token must be a str, got {type(token).__name__} {_short.repr(token)}")
        return self._tok.token_to_id(token)

    def id_to_token(self, i: int) -> Optional[str]:
        """The token of id `i`, None when `i` is not in [0, vocab_size)."""
        if not _is_token_int(i):
            raise TokenizationError(f"token id must be an int, got {type(i).__name__} {_short.repr(i)}")
        if not 0 <= i < self.vocab_size:
            return None
        return self._tok.id_to_token(int(i))


class IncrementalDecoder:
    """Turns a growing list of token ids into new text pieces, whole characters only.

    Decodes a short window of recent tokens (prefix + new) and emits the difference, as TGI and
    transformers' TextStreamer do; the window keeps the cost per token constant.
    """

    def __init__(self, tokenizer: Tokenizer, model_vocab_size: Optional[int] = None):
        """`model_vocab_size`: the model's vocabulary when it is padded past the tokenizer's (Qwen's
        embedding has rows no token maps to). Those ids are valid model outputs with no text:
        `push` returns "" for them, as transformers' decode does."""
        if not isinstance(tokenizer, Tokenizer):
            raise ConfigError(f"IncrementalDecoder needs a Tokenizer, got {type(tokenizer).__name__}")
        if model_vocab_size is not None and (isinstance(model_vocab_size, bool)
                                             or not isinstance(model_vocab_size, int) or model_vocab_size <= 0):
            raise ConfigError(f"model_vocab_size must be a positive int or None, got {model_vocab_size!r}")
        self._tok = tokenizer
        self._bound = max(tokenizer.vocab_size, model_vocab_size or 0)
        self._ids: list[int] = []
        self._prefix = 0  # start of the window whose text has been emitted already
        self._read = 0  # end of that window

    def push(self, token_id: int) -> str:
        (token_id,) = check_token_ids([token_id], self._bound, "token id to push")
        if token_id >= self._tok.vocab_size:
            return ""  # a padding row of the model's vocabulary: no text
        self._ids.append(token_id)
        prefix_text = self._tok.decode(self._ids[self._prefix : self._read])
        text = self._tok.decode(self._ids[self._prefix :])
        if len(text) > len(prefix_text) and not text.endswith("\ufffd"):
            piece = text[len(prefix_text) :]
            self._prefix, self._read = self._read, len(self._ids)
            return piece
        return ""

    def flush(self) -> str:
        """Whatever is still held back (e.g. a truly invalid byte sequence at the very end)."""
        prefix_text = self._tok.decode(self._ids[self._prefix : self._read])
        text = self._tok.decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        return text[len(prefix_text) :]
