"""A thin wrapper over a `tokenizers` tokenizer.json, plus incremental detokenization for streaming.

The incremental decoder holds back text while the last tokens decode to an incomplete UTF-8
sequence (shown as U+FFFD), so a streamed piece never contains half a character.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

from ruvllm_jax.errors import NotFoundError, TokenizationError


class Tokenizer:
    """Encode/decode with the special-token handling stored in `tokenizer.json`."""

    def __init__(self, tok, *, bos_token_id: Optional[int] = None, eos_token_ids: Sequence[int] = ()):
        self._tok = tok
        self.bos_token_id = bos_token_id
        self.eos_token_ids = tuple(eos_token_ids)

    @classmethod
    def from_file(cls, path: str, **kwargs) -> "Tokenizer":
        from tokenizers import Tokenizer as _HFTokenizer

        if not os.path.isfile(path):
            raise NotFoundError(f"tokenizer file {path!r} does not exist")
        try:
            tok = _HFTokenizer.from_file(path)
        except Exception as e:  # the Rust side raises plain Exceptions
            raise TokenizationError(f"cannot read tokenizer {path!r}: {e}") from None
        return cls(tok, **kwargs)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise TokenizationError(f"expected text as str, got {type(text).__name__}")
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> Optional[int]:
        return self._tok.token_to_id(token)

    def id_to_token(self, i: int) -> Optional[str]:
        return self._tok.id_to_token(i)


class IncrementalDecoder:
    """Turns a growing list of token ids into new text pieces, whole characters only.

    Decodes a short window of recent tokens (prefix + new) and emits the difference, as TGI and
    transformers' TextStreamer do; the window keeps the cost per token constant.
    """

    def __init__(self, tokenizer: Tokenizer):
        self._tok = tokenizer
        self._ids: list[int] = []
        self._prefix = 0  # start of the window whose text has been emitted already
        self._read = 0  # end of that window

    def push(self, token_id: int) -> str:
        self._ids.append(int(token_id))
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
