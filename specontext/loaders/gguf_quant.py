"""GGUF quantized blocks read as :class:`~specontext.model.quant.QuantizedWeight`, one tensor at a time.

Shape letters: N rows (output features), K values per row, nb = K / 32 blocks per row.

Block layouts (ggml), 32 values each, the nibble of value j < 16 in the low half of byte j and of
value j + 16 in its high half:

* Q4_0, 18 bytes: ``d`` (float16), 16 bytes of nibbles; value = d (q - 8).
* Q4_1, 20 bytes: ``d``, ``m`` (float16), 16 bytes of nibbles; value = d q + m.
* Q8_0, 34 bytes: ``d`` (float16), 32 int8; value = d q.

Q4_0 and Q4_1 become int4 exactly (scale d; zero 0 or m + 8 d); a Q8_0 tensor becomes int8 per
row, requantized from its float32 values (one tensor at a time).
"""

from __future__ import annotations

import numpy as np
import torch

from ..model.quant import QuantizedWeight, quantize

BLOCK = 32
INT4_TYPES = ("Q4_0", "Q4_1")
INT8_TYPES = ("Q8_0",)


def _blocks(raw: np.ndarray, rows: int, k: int, block_bytes: int) -> np.ndarray:
    return np.ascontiguousarray(raw).reshape(rows, k // BLOCK, block_bytes)


def _f16(blocks: np.ndarray, at: int) -> torch.Tensor:
    """The float16 at byte ``at`` of every block, as float32 [N, nb]."""
    return torch.from_numpy(np.ascontiguousarray(blocks[..., at:at + 2]).view(np.float16)[..., 0].astype(np.float32))


def _nibbles(qs: np.ndarray) -> torch.Tensor:
    """[N, nb, 16] bytes -> [N, nb * 32] values 0..15 in block order (low halves, then high halves)."""
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)  # [N, nb, 32]
    return torch.from_numpy(q.reshape(q.shape[0], -1).astype(np.uint8))


def int4_from_gguf(raw: np.ndarray, type_name: str, rows: int, k: int) -> QuantizedWeight:
    """A Q4_0 or Q4_1 tensor's bytes [N, bytes per row] as int4 groups of 32, losslessly."""
    if type_name == "Q4_1":
        b = _blocks(raw, rows, k, 20)
        d, m = _f16(b, 0), _f16(b, 2)
        return QuantizedWeight("int4", _nibbles(b[..., 4:]), d, m + 8 * d)
    if type_name == "Q4_0":
        b = _blocks(raw, rows, k, 18)
        d = _f16(b, 0)
        return QuantizedWeight("int4", _nibbles(b[..., 2:]), d, torch.zeros_like(d))
    raise ValueError(f"{type_name} is not an int4 layout; those are {', '.join(INT4_TYPES)}")


def int8_from_gguf(raw: np.ndarray, rows: int, k: int) -> QuantizedWeight:
    """A Q8_0 tensor's bytes as int8 per row (requantized: Q8_0 has one scale per 32 values)."""
    b = _blocks(raw, rows, k, 34)
    d = _f16(b, 0)  # [N, nb]
    q = torch.from_numpy(np.ascontiguousarray(b[..., 2:]).view(np.int8).astype(np.float32))  # [N, nb, 32]
    return quantize((q * d[:, :, None]).view(rows, k), "int8")
