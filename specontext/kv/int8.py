"""An 8-bit resident KV layer: K and V stored in 8 bits with one float32 scale per token and KV head.

Shape letters: B batch, G KV heads, S positions per row, T new tokens, D head dim, R gathered rows.

A row of D values is stored as ``x / s`` in the 8-bit format with ``s = max|x| / top``: ``int8``
rounds to -127..127 (top 127); ``fp8`` casts to float8 e4m3 (top 448, 3 mantissa bits: a
relative step of 1/16 at every magnitude, where int8's is 1/127 of the row's largest). It is
upcast (``q * s``) when read. A dense step upcasts the positions it attends over; a sparse step
upcasts only the rows it gathers. The scales take 4 bytes per D values (1/16 of the 8-bit bytes
at D = 64). ``bench_edge/bench_kv8.py`` measures both against float KV.

In host memory and in an offloaded layer's device slots, a row and its scale travel together as
one packed row of bytes (:class:`PackedRows`), so the native byte copies, the slot pool and the
staging buffers move 8-bit KV as they move float KV, at ``D + 4`` bytes a row instead of ``2 D``
(fp16) or ``4 D`` (float32).
"""

from __future__ import annotations

import torch

from .rows import store_rows
from .plan import StepPlan


FORMATS = {"int8": (torch.int8, 127.0), "fp8": (torch.float8_e4m3fn, 448.0)}  # storage dtype, top


def quantize_rows(x: torch.Tensor, fmt: str = "int8") -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> (8-bit [..., D] in ``fmt``, float32 scales [..., 1])."""
    dtype, top = FORMATS[fmt]
    scale = (x.float().abs().amax(dim=-1, keepdim=True) / top).clamp_min(1e-12)
    scaled = x.float() / scale
    if fmt == "int8":  # fp8's cast rounds by itself
        scaled = torch.round(scaled)
    return scaled.clamp(-top, top).to(dtype), scale


def upcast(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """``q * scale`` as ``dtype``, in ``out`` (a new tensor when None): the 8-bit values are cast
    into it (int8 and e4m3 are exact in float32, bfloat16 and float16), then scaled in place, so
    the read holds ``n w`` bytes and no float32 temporary (``torch.mul`` of int8 by float32 makes
    one on a CPU). The multiply runs in float32 and rounds once, as ``(q.float() * s).to(dtype)``."""
    out = q.to(dtype) if out is None else out.copy_(q)
    return out.mul_(scale)


class Int8ResidentLayer:
    """One layer's K and V on the device, 8-bit in ``fmt`` (see the module docstring); ``dtype`` is
    what reads return."""

    def __init__(self, shape: tuple[int, int, int, int], dtype: torch.dtype, device: torch.device,
                 fmt: str = "int8"):
        B, G, S, D = shape
        self.dtype, self.fmt = dtype, fmt
        self.k = torch.zeros(shape, dtype=FORMATS[fmt][0], device=device)
        self.v = torch.zeros(shape, dtype=FORMATS[fmt][0], device=device)
        self.k_scale = torch.zeros(B, G, S, 1, dtype=torch.float32, device=device)
        self.v_scale = torch.zeros(B, G, S, 1, dtype=torch.float32, device=device)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.buffers())

    def buffers(self) -> tuple[torch.Tensor, ...]:
        """The tensors a step writes in place."""
        return self.k, self.v, self.k_scale, self.v_scale

    def grow(self, size: int) -> None:
        for name in ("k", "v", "k_scale", "v_scale"):
            old = getattr(self, name)
            new = torch.zeros(*old.shape[:2], size, old.shape[3], dtype=old.dtype, device=old.device)
            new[:, :, :old.shape[2]] = old
            setattr(self, name, new)

    def store(self, k: torch.Tensor, v: torch.Tensor, plan: StepPlan) -> None:
        (kq, ks), (vq, vs) = quantize_rows(k, self.fmt), quantize_rows(v, self.fmt)
        store_rows(self.k, self.v, kq, vq, plan)
        store_rows(self.k_scale, self.v_scale, ks, vs, plan)

    def host_rows(self, kv: int, length: int) -> torch.Tensor:
        """K (``kv`` 0) or V (1) of the first ``length`` positions, [B, G, length, width], as an
        offloaded layer stores them (:class:`PackedRows`: a new tensor)."""
        q, scale = ((self.k, self.k_scale), (self.v, self.v_scale))[kv]
        return PackedRows(q.shape[-1], self.dtype, self.fmt).pack(q[:, :, :length], scale[:, :, :length])

    def keys(self, n: int) -> torch.Tensor:
        """The first ``n`` positions' keys, upcast."""
        return upcast(self.k[:, :, :n], self.k_scale[:, :, :n], self.dtype)

    def read(self, plan: StepPlan):
        n = plan.kv_len
        keys = self.keys(n)
        return keys, upcast(self.v[:, :, :n], self.v_scale[:, :, :n], self.dtype), plan.attn_mask

    def gather(self, flat_rows: torch.Tensor, out_k: torch.Tensor, out_v: torch.Tensor) -> None:
        """Rows ``flat_rows`` into ``out_k`` / ``out_v`` [B, G, K + 1, D], upcasting only those rows."""
        D = self.k.shape[-1]
        for q, s, out in ((self.k, self.k_scale, out_k), (self.v, self.v_scale, out_v)):
            upcast(torch.index_select(q.view(-1, D), 0, flat_rows), torch.index_select(s.view(-1, 1), 0, flat_rows),
                   self.dtype, out=out.view(-1, D))


class FloatRows:
    """How an offloaded layer stores float KV rows: as they are, ``D`` values of ``dtype``."""

    def __init__(self, head_dim: int, dtype: torch.dtype):
        self.head_dim, self.dtype, self.storage_dtype, self.width = head_dim, dtype, dtype, head_dim

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., D] -> stored rows [..., width] of ``storage_dtype``."""
        return x

    def decode(self, rows: torch.Tensor) -> torch.Tensor:
        """Stored rows [..., width] -> [..., D] of ``dtype``."""
        return rows

    def gather(self, src: torch.Tensor, flat_rows: torch.Tensor, out: torch.Tensor) -> None:
        """Stored rows ``flat_rows`` of ``src`` [N, width] into ``out`` [M, D] (``dtype``)."""
        torch.index_select(src, 0, flat_rows, out=out)


class PackedRows(FloatRows):
    """8-bit KV rows packed for host memory and slots: one uint8 row per token and KV head, its D
    8-bit values (``fmt``), padded to a multiple of 4 bytes, then its float32 scale's 4 bytes.

    Decoding computes exactly what :class:`Int8ResidentLayer` reads (:func:`upcast`), so an
    offloaded layer gives the resident layer's values bit for bit.
    """

    def __init__(self, head_dim: int, dtype: torch.dtype, fmt: str = "int8"):
        super().__init__(head_dim, dtype)
        self.fmt, self.storage_dtype = fmt, torch.uint8
        self.scale_at = -(-head_dim // 4) * 4  # a float32 view needs a 4-byte aligned offset and pitch
        self.width = self.scale_at + 4

    def pack(self, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """8-bit values [..., D] and their float32 scales [..., 1] -> packed rows [..., width]."""
        out = torch.zeros(*q.shape[:-1], self.width, dtype=torch.uint8, device=q.device)
        out[..., :self.head_dim] = q.view(torch.uint8)
        out[..., self.scale_at:] = scale.contiguous().view(torch.uint8)
        return out

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.pack(*quantize_rows(x, self.fmt))

    def unpack(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Packed rows [..., width] -> views of their 8-bit values [..., D] and scales [..., 1]."""
        return rows[..., :self.head_dim].view(FORMATS[self.fmt][0]), rows[..., self.scale_at:].view(torch.float32)

    def decode(self, rows: torch.Tensor) -> torch.Tensor:
        return upcast(*self.unpack(rows), self.dtype)

    def gather(self, src: torch.Tensor, flat_rows: torch.Tensor, out: torch.Tensor) -> None:
        upcast(*self.unpack(torch.index_select(src, 0, flat_rows)), self.dtype, out=out)


def row_codec(kv_format: str, head_dim: int, dtype: torch.dtype) -> FloatRows:
    """The stored row of an offloaded layer for ``kv_format`` (``float``, ``int8`` or ``fp8``)."""
    return FloatRows(head_dim, dtype) if kv_format == "float" else PackedRows(head_dim, dtype, kv_format)
