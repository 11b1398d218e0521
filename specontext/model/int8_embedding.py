"""Token embeddings held as int8 rows, each with a float32 scale (``--embeddings int8``).

Beside int4 layers, an 8B model's embedding table is one of its two largest tensors (Llama-3.1-8B:
128,256 x 4,096, 1,002 MiB in bfloat16; Qwen3-8B: 151,936 rows, 1,187 MiB), and an untied
model's LM head is the other. A step reads only its tokens' rows of the table, so the table needs
no fast kernel: rows are gathered in int8 and upcast to the compute dtype (``kv/int8.py``'s
``upcast``), which halves a bfloat16 table (a quarter of a float32 one) for one rounding per value
of at most 1/254 of its row's largest. The LM head keeps its own format: a tied model (whose head
is this table) keeps the float table for the head too, so this saves memory only on untied models.
"""

from __future__ import annotations

import torch
from torch import nn

from ..kv.int8 import quantize_rows, upcast

CHUNK_ROWS = 4096  # rows quantized at a time: no float32 copy of the whole table at load


class Int8Embedding(nn.Module):
    """Rows of a [V, E] table held as int8 with a float32 scale per row, read as ``dtype``."""

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype):
        super().__init__()
        self.num_embeddings, self.embedding_dim = weight.shape
        self.dtype = dtype
        q = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
        scale = torch.empty(weight.shape[0], 1, dtype=torch.float32, device=weight.device)
        for i in range(0, weight.shape[0], CHUNK_ROWS):
            q[i:i + CHUNK_ROWS], scale[i:i + CHUNK_ROWS] = quantize_rows(weight[i:i + CHUNK_ROWS].detach(), "int8")
        self.register_buffer("q", q)
        self.register_buffer("scale", scale)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        rows = upcast(torch.index_select(self.q, 0, flat), torch.index_select(self.scale, 0, flat), self.dtype)
        return rows.view(*ids.shape, self.embedding_dim)


def hold_embeddings_in_int8(model: nn.Module) -> bool:
    """Replace a LlamaForCausalLM's float embedding table by an :class:`Int8Embedding`, in place.
    Returns whether the table was tied to the LM head (which then keeps the float table)."""
    embed = model.model.embed_tokens
    tied = embed.weight is model.lm_head.weight
    model.model.embed_tokens = Int8Embedding(embed.weight, model.dtype)
    return tied
