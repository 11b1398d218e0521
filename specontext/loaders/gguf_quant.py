"""GGUF quantized blocks read as :class:`~specontext.model.quant.QuantizedWeight`, one tensor at a time.

Shape letters: N rows (output features), K values per row, nb = K / 32 blocks per row.

Block layouts (ggml), 32 values each, the nibble of value j < 16 in the low half of byte j and of
value j + 16 in its high half:

* Q4_0, 18 bytes: ``d`` (float16), 16 bytes of nibbles; value = d (q - 8).
* Q4_1, 20 bytes: ``d``, ``m`` (float16), 16 bytes of nibbles; value = d q + m.
* Q8_0, 34 bytes: ``d`` (float16), 32 int8; value = d q.
* Q4_K, 144 bytes for a super-block of 256 values (eight sub-blocks of 32): ``d`` and ``dmin``
  (float16), 12 bytes holding eight 6-bit scales ``sc`` and eight 6-bit minima ``mn``, 128 bytes
  of nibbles; value = d sc q - dmin mn. Sub-block j < 4 keeps ``sc`` in the low 6 bits of byte j
  and ``mn`` in those of byte j + 4; for j >= 4 the low 4 bits of each come from byte j + 4 (low
  and high nibble) and the top 2 bits from the spare top bits of bytes j - 4 and j. The nibbles
  run in four chunks of 32 bytes: low halves hold sub-block 2c, high halves sub-block 2c + 1.

Q4_0, Q4_1 and Q4_K become int4 (scale d, d or d sc; zero 0, m + 8 d or 8 d sc - dmin mn),
exactly for Q4_0 and Q4_1 and within one rounding of the zero for Q4_K (tested); a Q8_0 tensor
becomes int8 per row, requantized from its float32 values (one tensor at a time).
"""

from __future__ import annotations

import numpy as np
import torch

from ..model.quant import QuantizedWeight, quantize

BLOCK = 32
INT4_TYPES = ("Q4_0", "Q4_1", "Q4_K")
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


def _q4_k(raw: np.ndarray, rows: int, k: int) -> QuantizedWeight:
    """A Q4_K tensor (module docstring) as int4 groups of 32: scale d sc, zero 8 d sc - dmin mn."""
    b = np.ascontiguousarray(raw).reshape(rows, k // 256, 144)
    d, dmin = _f16(b, 0), _f16(b, 2)  # [N, nsb]
    packed = b[..., 4:16].astype(np.int32)  # [N, nsb, 12]
    lo, hi = packed[..., 0:4], packed[..., 4:8]
    tail = packed[..., 8:12]
    sc = np.concatenate([lo & 63, (tail & 15) | ((lo >> 6) << 4)], axis=-1)  # [N, nsb, 8]
    mn = np.concatenate([hi & 63, (tail >> 4) | ((hi >> 6) << 4)], axis=-1)
    qs = b[..., 16:].reshape(rows, k // 256, 4, 32)  # chunk c: sub-blocks 2c (low) and 2c + 1 (high)
    q = np.stack([qs & 0x0F, qs >> 4], axis=3).reshape(rows, k)  # [N, nsb, 4, 2, 32] in value order
    scale = d[:, :, None] * torch.from_numpy(sc.astype(np.float32))  # exact: 11 x 6 bits
    low = dmin[:, :, None] * torch.from_numpy(mn.astype(np.float32))
    return QuantizedWeight("int4", torch.from_numpy(q.astype(np.uint8)), scale.reshape(rows, -1),
                           (8 * scale - low).reshape(rows, -1))


def int4_from_gguf(raw: np.ndarray, type_name: str, rows: int, k: int) -> QuantizedWeight:
    """A Q4_0, Q4_1 or Q4_K tensor's bytes [N, bytes per row] as int4 groups of 32 (see the module
    docstring for what is exact)."""
    if type_name == "Q4_K":
        return _q4_k(raw, rows, k)
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
