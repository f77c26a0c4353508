"""Files shipped inside the package: the embedded default model.

`DEFAULT_MODEL_PATH` is the HF-style folder of the tiny Llama trained on tinyshakespeare by
`experiments/train_tiny.py` (see its README.md model card); `WEIGHTS_SHA256` is the sha256 of its
`model.safetensors`, which the tests check against the file and the card.
"""

import os

DEFAULT_MODEL_NAME = "tiny-shakespeare"
DEFAULT_MODEL_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), DEFAULT_MODEL_NAME)
WEIGHTS_SHA256 = "970a367609e26b38d75148d6f6e5b3cf5bf4bb82ab4d828a97a3629aa244df06"

__all__ = ["DEFAULT_MODEL_NAME", "DEFAULT_MODEL_PATH", "WEIGHTS_SHA256"]
