"""Read the JSON files of a model folder so every failure is a RuvLLMError naming the file."""

from __future__ import annotations

import json
import os
from typing import Any

from ruvllm_jax.errors import ModelError, RuvIoError


def read_json(path: str | os.PathLike, what: str = "") -> Any:
    """The parsed JSON of `path`: `ModelError` if it is not valid JSON (bad UTF-8, over-long ints and
    too-deep nesting included), `RuvIoError` if it cannot be read. `what` leads the message
    ("config file", "shard index")."""
    lead = f"{what} " if what else ""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, over-long ints
        raise ModelError(f"{lead}{os.fspath(path)!r} is not valid JSON: {type(e).__name__}: {e}") from None
    except OSError as e:
        raise RuvIoError(f"cannot read {lead}{os.fspath(path)!r}: {e}") from None
