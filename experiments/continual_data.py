"""Data of the continual-learning study: new-domain passages to learn from, held-out text to measure.

The embedded model learned tiny-shakespeare (its first 90 %); the study teaches it a new domain
(`DOMAINS`: Alice in Wonderland, Paradise Lost) and measures how much it gains there and how much it
forgets of Shakespeare (`shakespeare`: the 10 % validation split it never trained on).

New-domain texts are cleaned (Shakespeare already is), so the model is not taught file formatting:

* CRLF -> LF, trailing spaces and DOS end-of-file marks (Ctrl-Z) removed: the Gutenberg files end every
  line in "\\r\\n" (Milton's in " \\r\\n"); the model's training text has bare "\\n", and a LoRA would
  "gain" by learning those bytes (raw Alice: base held-out ppl 1244 and lr 1e-4 "gains" 14 %; cleaned:
  387 and 8 %);
* boilerplate cut: after the first line containing "*** START" and before "*** END" when present
  (neither file has them), and from the first line that is exactly `BODY_START[domain]` (Milton's
  file opens with a page on the etext's history; Alice's with its title block).

Each new domain splits into a train part (first 80 %) and a held-out part (last 20 %), cut at a
newline (`data.split_train_val`). Token ids come from `bpe.encode`: the model's byte-level BPE with no
special tokens (no BOS, no EOS), i.e. the stream the model was trained on. Import it as a sibling
module: `from continual_data import ...` in a script run as `python experiments/<script>.py`.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Optional

import numpy as np

from ruvllm_jax.training import bpe, data, scoring

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOMAINS = {"alice": os.path.join(REPO, "data/alice29.txt"), "milton": os.path.join(REPO, "data/plrabn12.txt")}
SHAKESPEARE = "shakespeare"  # the validation split of SHAKESPEARE_PATH: what forgetting is measured on
SHAKESPEARE_PATH = os.path.join(REPO, "data/tinyshakespeare.txt")
SHAKESPEARE_TRAIN_FRACTION = 0.9  # what the embedded model was trained on (experiments/train_tiny.py)
TRAIN_FRACTION = 0.8  # of a new domain: the part passages come from; the rest is held out
BODY_START = {"alice": "CHAPTER I", "milton": "Book I"}


@dataclasses.dataclass
class Passage:
    """A request (prompt) and the response that follows it in the text, as ids and as decoded text.

    `request_ids + response_ids` is a window of the domain's token stream (no special tokens);
    `request` / `response` are their decodings, so `request + response` is the exact text of the window.
    Re-encoding the two strings separately gives back the ids up to BPE merges across the cut.
    """

    request_ids: list[int]
    response_ids: list[int]
    request: str
    response: str


def clean(text: str, body_start: Optional[str] = None) -> str:
    """LF line ends, no trailing spaces, Gutenberg boilerplate and front matter cut (see module doc)."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\x1a", "")
    lines = [line.rstrip() for line in text.split("\n")]
    start = next((i + 1 for i, line in enumerate(lines) if "*** START" in line), 0)
    end = next((i for i, line in enumerate(lines) if "*** END" in line and i >= start), len(lines))
    lines = lines[start:end]
    if body_start is not None:
        lines = lines[next((i for i, line in enumerate(lines) if line.strip() == body_start), 0):]
    return "\n".join(lines).strip("\n") + "\n"


def parts(domain: str) -> tuple[str, str]:
    """(train text, held-out text) of a domain; for `shakespeare`, the model's (train, validation) split."""
    if domain == SHAKESPEARE:
        return data.split_train_val(data.read_text(SHAKESPEARE_PATH), SHAKESPEARE_TRAIN_FRACTION)
    if domain not in DOMAINS:
        raise ValueError(f"unknown domain {domain!r}; domains: {sorted(DOMAINS)} and {SHAKESPEARE!r}")
    return data.split_train_val(clean(data.read_text(DOMAINS[domain]), BODY_START.get(domain)), TRAIN_FRACTION)


def passages(domain: str, tokenizer, n: int, request_tokens: int = 32, response_tokens: int = 96,
             split: str = "train", seed: Optional[int] = 0) -> list[Passage]:
    """`n` passages: non-overlapping consecutive windows of `request_tokens + response_tokens` tokens
    of the domain's `split` part ("train" or "heldout"), the request the first `request_tokens`.

    With an int `seed`, `n` of all the windows are drawn without replacement (in draw order), so the
    passages spread over the whole part rather than its first chapters; `seed=None` gives the first
    `n` windows in text order (a stream). The same arguments always give the same passages.
    """
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    ids = bpe.encode(tokenizer, parts(domain)[0 if split == "train" else 1])
    width = request_tokens + response_tokens
    count = len(ids) // width
    if not 0 < n <= count:
        raise ValueError(f"{domain} {split}: {len(ids)} tokens hold {count} windows of {width}, asked for {n}")
    order = np.arange(n) if seed is None else np.random.default_rng(seed).choice(count, n, replace=False)
    out = []
    for w in order:
        win = ids[w * width:(w + 1) * width].tolist()
        req, resp = win[:request_tokens], win[request_tokens:]
        out.append(Passage(req, resp, tokenizer.decode(req, skip_special_tokens=False),
                           tokenizer.decode(resp, skip_special_tokens=False)))
    return out


def heldout_ids(domain: str, tokenizer, max_tokens: int = 8192) -> np.ndarray:
    """int32 [<= max_tokens]: the first `max_tokens` tokens of the held-out part (Shakespeare: of the
    validation split), a fixed prefix so every measurement scores the same tokens."""
    return bpe.encode(tokenizer, parts(domain)[1])[:max_tokens]


def perplexity(params, cfg, ids, adapters=None, context: int = 256, stride: int = 128, batch_size: int = 8) -> float:
    """exp(mean nats per token) of `ids` under the model with `adapters` (None: the base model).
    Sliding windows (`scoring.score_text`): each token is scored once with >= context - stride tokens
    of left context; the scorer compiles once per shape and adapter structure."""
    nats, n = scoring.score_text(params, cfg, ids, context, stride, batch_size=batch_size, adapters=adapters)
    return math.exp(nats / n)


__all__ = ["BODY_START", "DOMAINS", "Passage", "REPO", "SHAKESPEARE", "clean", "heldout_ids", "parts", "passages",
           "perplexity"]
