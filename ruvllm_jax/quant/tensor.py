"""`QuantizedTensor`: a weight matrix kept as GGML blocks, the pytree the model's linears take.

A [rows, cols] weight in a block format is stored exactly as GGML (and a GGUF file) lays it out:
each row is cols / block_size consecutive blocks of type_size bytes, so `data` is uint8
[rows, cols / block_size * type_size]. Keeping GGML's bytes means a GGUF tensor loads with one copy
and no conversion, exports unchanged, and the native kernel reads the same blocks llama.cpp does.

Formats (`FORMATS`; all little-endian, f16 = IEEE half):

* Q8_0 (ggml type 8): 32 weights in 34 bytes: f16 d, int8 q[32]; w = d * q.
* Q4_1 (ggml type 3), our Q4: 32 weights in 20 bytes: f16 d, f16 m, u8 qs[16]; byte j holds
  weight j in its low nibble and weight j + 16 in its high one; w = d * nibble + m.
* Q5_0 (ggml type 6): 32 weights in 22 bytes: f16 d, u8 qh[4] (bit j of the little-endian u32 is
  the fifth bit of weight j), u8 qs[16] (nibbles as Q4_1); w = d * (nibble | bit << 4 - 16).
* Q4_K (ggml type 12): 256 weights in 144 bytes: f16 d, f16 dmin, u8 scales[12] (eight 6-bit
  scales and eight 6-bit mins, packed as GGML's get_scale_min_k4), u8 qs[128]; sub-block s of 32
  has w = d * scale_s * nibble - dmin * min_s; the 32-byte chunk c of qs holds sub-block 2c in its
  low nibbles and 2c + 1 in its high ones.
* Q6_K (ggml type 14): 256 weights in 210 bytes: u8 ql[128], u8 qh[64], int8 scales[16], f16 d;
  w = d * scale_(16-group) * (q6 - 32), bits as GGML's dequantize_row_q6_K.

Only the fields in `tree_flatten`'s children are traced: `data`. The format and the logical shape are
static (aux data), so a jitted function specializes on them and never recompiles per value.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from ruvllm_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class BlockFormat:
    """One GGML block format: `block_size` weights stored in `type_size` bytes."""

    name: str
    ggml_type: int
    block_size: int
    type_size: int

    @property
    def bytes_per_weight(self) -> float:
        return self.type_size / self.block_size

    def row_bytes(self, cols: int) -> int:
        if cols % self.block_size:
            raise ConfigError(f"{self.name} needs rows whose length is a multiple of {self.block_size}, got {cols}")
        return cols // self.block_size * self.type_size


FORMATS: dict[str, BlockFormat] = {
    f.name: f
    for f in (
        BlockFormat("Q8_0", 8, 32, 34),
        BlockFormat("Q4_1", 3, 32, 20),
        BlockFormat("Q5_0", 6, 32, 22),
        BlockFormat("Q4_K", 12, 256, 144),
        BlockFormat("Q6_K", 14, 256, 210),
    )
}


def block_format(qtype: str) -> BlockFormat:
    if qtype not in FORMATS:
        raise ConfigError(f"unknown block format {qtype!r}; expected one of {sorted(FORMATS)}")
    return FORMATS[qtype]


@jax.tree_util.register_pytree_node_class
class QuantizedTensor:
    """A [rows, cols] weight as GGML blocks: `data` uint8 [rows, row_bytes]; `qtype`, `shape` static."""

    __slots__ = ("data", "qtype", "shape")

    def __init__(self, data: Any, qtype: str, shape: tuple[int, int]):
        self.data = data
        self.qtype = qtype
        self.shape = (int(shape[0]), int(shape[1]))

    @property
    def format(self) -> BlockFormat:
        return FORMATS[self.qtype]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.data.shape))

    @property
    def ndim(self) -> int:
        return 2

    @property
    def size(self) -> int:
        """Logical number of weights (not bytes)."""
        return self.shape[0] * self.shape[1]

    def tree_flatten(self):
        return (self.data,), (self.qtype, self.shape)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(children[0], *aux)

    def __repr__(self) -> str:
        return f"QuantizedTensor({self.qtype}, shape={self.shape}, data={getattr(self.data, 'shape', None)})"


def is_weight_leaf(x: Any) -> bool:
    """For `tree_leaves(params, is_leaf=...)`: a `QuantizedTensor` counts as one weight."""
    return isinstance(x, QuantizedTensor)


def kind_name(x: Any) -> str:
    """"Q8_0", "Q4_K", ... for a `QuantizedTensor`, the dtype name ("float32") for an array."""
    return x.qtype if isinstance(x, QuantizedTensor) else str(np.dtype(x.dtype))


@dataclasses.dataclass(frozen=True)
class WeightStats:
    """What a params pytree holds: logical weights, real bytes, bytes per storage kind."""

    num_weights: int
    nbytes: int
    bytes_by_kind: dict

    @property
    def dtype_name(self) -> str:
        """The kinds by bytes held, largest first, joined by "+" ("float32", "Q5_0+Q8_0+Q4_K+float32")."""
        return "+".join(k for k, _ in sorted(self.bytes_by_kind.items(), key=lambda kv: -kv[1]))

    @property
    def precision(self):
        """The `Precision` of the kind holding most bytes, or None when that kind has none (Q5_0, Q6_K)."""
        from ruvllm_jax.types import Precision

        names = {"float32": Precision.FP32, "float16": Precision.FP16, "bfloat16": Precision.BF16,
                 "Q8_0": Precision.Q8, "Q4_1": Precision.Q4, "Q4_K": Precision.Q4K}
        top = max(self.bytes_by_kind.items(), key=lambda kv: kv[1])[0] if self.bytes_by_kind else None
        return names.get(top)


def weight_stats(params: Any) -> WeightStats:
    leaves = jax.tree_util.tree_leaves(params, is_leaf=is_weight_leaf)
    by_kind: dict[str, int] = {}
    for x in leaves:
        k = kind_name(x)
        by_kind[k] = by_kind.get(k, 0) + int(x.nbytes)
    return WeightStats(int(sum(int(x.size) for x in leaves)), int(sum(by_kind.values())), by_kind)
