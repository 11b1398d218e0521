"""An 8-bit resident KV layer: K and V stored in 8 bits with one float32 scale per token and KV head.

Shape letters: B batch, G KV heads, S positions per row, T new tokens, D head dim, R gathered rows.

A row of D values is stored as ``x / s`` in the 8-bit format with ``s = max|x| / top``: ``int8``
rounds to -127..127 (top 127); ``fp8`` casts to float8 e4m3 (top 448, 3 mantissa bits: a
relative step of 1/16 at every magnitude, where int8's is 1/127 of the row's largest). It is
upcast (``q * s``) when read. A dense step upcasts the positions it attends over; a sparse step
upcasts only the rows it gathers. The scales take 4 bytes per D values (1/16 of the 8-bit bytes
at D = 64). ``bench_edge/bench_kv8.py`` measures both against float KV.
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

    def keys(self, n: int) -> torch.Tensor:
        """The first ``n`` positions' keys, upcast."""
        return (self.k[:, :, :n].to(torch.float32) * self.k_scale[:, :, :n]).to(self.dtype)

    def read(self, plan: StepPlan):
        n = plan.kv_len
        values = (self.v[:, :, :n].to(torch.float32) * self.v_scale[:, :, :n]).to(self.dtype)
        return self.keys(n), values, plan.attn_mask

    def gather(self, flat_rows: torch.Tensor, out_k: torch.Tensor, out_v: torch.Tensor) -> None:
        """Rows ``flat_rows`` into ``out_k`` / ``out_v`` [B, G, K + 1, D], upcasting only those rows."""
        D = self.k.shape[-1]
        for q, s, out in ((self.k, self.k_scale, out_k), (self.v, self.v_scale, out_v)):
            rows = torch.index_select(q.view(-1, D), 0, flat_rows).to(torch.float32)
            out.view(-1, D).copy_(rows * torch.index_select(s.view(-1, 1), 0, flat_rows))
