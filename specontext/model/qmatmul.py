"""Products with int4 and int8 weights on float32 activations, by the native library
(``csrc/qmatmul.c``): the torch operators ``specontext::q4_mm_``, ``q8_mm_`` and ``q4_dequantize_``,
which eager steps and ahead-of-time graphs both call.

Shape letters: N output features, K input features, M rows of input, V vocabulary, E hidden size.

Why: torch's CPU weight-only kernels are fast only on bfloat16 activations (on float32 ones they
took 8-10x longer on the 2-core AVX2 machine, ``model/quant.py``), and bf16 moved the default
model's int4 logits away from float32's: over 300 held-out essay tokens, mean KL from llama.cpp
0.00335 against float32's 0.00296 (bf16 activations, scales and outputs added 0.00006, 0.00011
and 0.00010 each, the bf16 head 0.0001). These kernels keep float32 throughout: an int4 layer on
them computes what the float32 layer of its dequantized weight computes, in another order.

* :class:`~specontext.model.quant.Int4Linear` runs a step of up to :data:`DIRECT_ROWS` rows
  (decode, batched decode) here; a longer one (prefill) dequantizes the layer a tile of rows at a
  time (:func:`tiled_product`, at most :data:`TILE_BYTES` of float32) for torch's float32 matmul.
  On the 2-core AVX2 machine the direct products were the faster at 48 rows, the tiled ones at 64
  for two of the three layer shapes (``bench_edge/results/cpu_kernels_avx2_native.json``).
* :class:`Q8Table`: an LM head and embedding table whose values are int8 in groups of 32 with one
  scale each, held so where that is exact (a GGUF's Q8_0 table, the default model's, is), in
  place of the bf16 copy (``model/bf16.py``): 32 MiB instead of 57 for the default model.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

GROUP = 32
DIRECT_ROWS = 48  # rows a product takes directly; more dequantize the layer for torch's matmul
TILE_BYTES = 16 * 2**20  # float32 weight rows dequantized at a time for a longer product

_READY: list[bool] = []  # [whether the operators are registered], once asked


def available() -> bool:
    """Whether the operators are registered (the native library loads and this torch has the
    stable C ABI). Loading a model asks, so that a traced step only reads the answer."""
    if not _READY:
        _READY.append(_register())
    return _READY[0]


def _register() -> bool:
    from .. import native

    return native.init_operators("spc_qmm_init", ("q4_mm_", "q8_mm_", "q4_dequantize_"))


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K] values in 0..15 -> [N, K / 2] bytes: in each group of 32, byte 4 a + b (a, b in
    0..3) holds value 8 b + a (low nibble) and value 8 b + a + 4 (high nibble), the order the
    AVX2 product unpacks by shifts alone (``csrc/qmatmul.c``)."""
    n, k = q.shape
    g = q.to(torch.uint8).reshape(n, k // GROUP, 4, 2, 4)  # value 8 b + 4 h + a at [b, h, a]
    return (g[:, :, :, 0] | (g[:, :, :, 1] << 4)).transpose(2, 3).reshape(n, k // 2).contiguous()


def q4_mm(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """x [M, K] float32 contiguous @ W^T -> [M, N], W int4 as :func:`pack_int4` and [N, K / 32]
    float32 scales and zeros (value (q - 8) scale + zero)."""
    out = x.new_empty(x.shape[0], packed.shape[0], dtype=torch.float32)  # else the operator leaves it (NaN: wrong args)
    torch.ops.specontext.q4_mm_(out, x, packed, scale, zero)
    return out


def q4_dequantize(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """The float32 [N, K] weight of :func:`q4_mm`'s arguments."""
    out = scale.new_empty(packed.shape[0], packed.shape[1] * 2, dtype=torch.float32)
    torch.ops.specontext.q4_dequantize_(out, packed, scale, zero)
    return out


def q8_mm(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [M, K] float32 contiguous @ W^T -> [M, N], W = int8 q [N, K] times [N, K / 32] scales."""
    out = x.new_empty(x.shape[0], q.shape[0], dtype=torch.float32)
    torch.ops.specontext.q8_mm_(out, x, q, scale)
    return out


def tiled_product(x: torch.Tensor, n: int, rows: Callable[[int, int], torch.Tensor]) -> torch.Tensor:
    """x [M, K] float32 @ W^T -> [M, N], W's float32 rows [r0, r1) made by ``rows(r0, r1)`` at most
    :data:`TILE_BYTES` at a time (a prefill's products without a float32 copy of a whole layer)."""
    step = max(1, TILE_BYTES // (4 * x.shape[1]))
    if step >= n:
        return nn.functional.linear(x, rows(0, n))
    out = x.new_empty(x.shape[0], n)
    for r0 in range(0, n, step):
        out[:, r0:r0 + step] = nn.functional.linear(x, rows(r0, min(n, r0 + step)))
    return out


def exact_int8_groups(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(int8 [N, K], float32 scales [N, K / 32]) whose products equal ``weight`` (float32 [N, K])
    exactly, or None where they do not (or K is not a multiple of 32). Each group's scale is its
    largest magnitude / 127, as GGUF's Q8_0 makes them, so a Q8_0 tensor read as float32 comes back
    exactly; weights of any other origin almost never do."""
    n, k = weight.shape
    if k % GROUP or weight.dtype != torch.float32:
        return None
    q, scale = torch.empty(n, k, dtype=torch.int8), torch.empty(n, k // GROUP)
    step = max(1, 2**20 // k)  # 4 MiB of float32 temporaries at a time: loading peaks near one table, not five
    for i in range(0, n, step):
        g = weight[i:i + step].reshape(-1, k // GROUP, GROUP)
        s = g.abs().amax(dim=2) / 127
        qi = torch.round(g / s.clamp_min(torch.finfo(torch.float32).tiny)[:, :, None]).clamp_(-127, 127)
        if not torch.equal(qi * s[:, :, None], g):
            return None
        q[i:i + step], scale[i:i + step] = qi.view(-1, k), s
    return q, scale


class Q8Table(nn.Module):
    """An LM head (``forward``: x [.., E] -> logits [.., V] float32) and, for a tied model, its
    embedding table (:meth:`rows`), as int8 groups of 32 with float32 scales (see
    :func:`exact_int8_groups`); products on :func:`q8_mm`."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.register_buffer("q", q.contiguous())
        self.register_buffer("scale", scale.float().contiguous())
        self.bias = None if bias is None else nn.Parameter(bias.detach().float(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features).float().contiguous()
        y = (q8_mm(x2, self.q, self.scale) if x2.shape[0] <= DIRECT_ROWS else
             tiled_product(x2, self.out_features, lambda r0, r1: _int8_values(self.q[r0:r1], self.scale[r0:r1])))
        y = y.view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows ``ids`` of the table, float32 [*ids.shape, E] (an id outside the table raises)."""
        return _table_rows(self.q, self.scale, ids)


class Q8Embedding(nn.Module):
    """Token embeddings read from a :class:`Q8Table` (the head's, when tied)."""

    def __init__(self, table: Q8Table):
        super().__init__()
        self.num_embeddings, self.embedding_dim = table.q.shape
        self.register_buffer("q", table.q)
        self.register_buffer("scale", table.scale)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return _table_rows(self.q, self.scale, ids)


def _int8_values(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float32 [R, K] of int8 rows q [R, K] and their group scales [R, K / 32]."""
    return (q.float().unflatten(-1, (-1, GROUP)) * scale[..., None]).flatten(-2)


def _table_rows(q: torch.Tensor, scale: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    flat = ids.reshape(-1)  # index_select: an id outside the table raises
    return _int8_values(q.index_select(0, flat), scale.index_select(0, flat)).view(*ids.shape, -1)


def take_int8_tables(model: nn.Module, tensors: dict, tied: bool) -> bool:
    """Make ``model``'s LM head (and its embeddings, tied or not) :class:`Q8Table` modules where
    their float32 values in ``tensors`` are exact int8 groups, taking them out of ``tensors``;
    others are left there, read. Returns whether a tied table was taken."""
    def take(key: str) -> Q8Table | None:
        value = tensors[key] if key in tensors else None  # a lazy mapping reads it here, once
        groups = exact_int8_groups(value) if isinstance(value, torch.Tensor) and value.dim() == 2 else None
        if groups is None:
            if value is not None:
                tensors[key] = value
            return None
        del tensors[key]
        return Q8Table(*groups)

    head = take("model.embed_tokens.weight" if tied else "lm_head.weight")
    if head is not None:
        model.lm_head = head
    table = head if tied else take("model.embed_tokens.weight")
    if table is not None:
        model.model.embed_tokens = Q8Embedding(table)
    return tied and head is not None
