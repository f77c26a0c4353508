"""Files shipped inside the package: the embedded default model.

`DEFAULT_MODEL_PATH` is the HF-style folder of the tiny Llama trained on tinyshakespeare by
`experiments/train_tiny.py` (see its README.md model card); `WEIGHTS_SHA256` is the sha256 of its
`model.safetensors`, which the tests check against the file and the card.
"""

import os

DEFAULT_MODEL_NAME = "tiny-shakespeare"
DEFAULT_MODEL_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), DEFAULT_MODEL_NAME)
WEIGHTS_SHA256 = "18f5f0bb57cc1952c1baeff55dc0c778090dad13ec3f0c1316e0b2c2d50db05c"

__all__ = ["DEFAULT_MODEL_NAME", "DEFAULT_MODEL_PATH", "WEIGHTS_SHA256"]
