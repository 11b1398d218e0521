"""The LM head and token embeddings held in bfloat16 beside quantized linear layers (on a CPU
with native bf16 or AVX2, ``model/quant.py``), where they are not exact int8 groups (a GGUF's
Q8_0 table is held so instead, in float32 products: ``model/qmatmul.py``).

With the linear layers int4 or int8, the float32 LM head is the largest read of a decode step on
the default model (49152 x 576: 113 MB, 7.0 ms of a [1, 576] product on this project's CPU,
against 2.1 ms in bfloat16). A tied model's embedding table is the same tensor, so both read one
bf16 copy: the table is gathered in bf16 and upcast, which rounds each embedding value to 8
significant bits (the accuracy harness, ``bench_edge/bench_weights.py``, measures the cost).
The head's highest logits are recomputed in float32 (:class:`BF16Head`).
"""

from __future__ import annotations

import torch
from torch import nn


class BF16Linear(nn.Module):
    """y = x W^T (+ b) with W held in bfloat16; float32 in and out (the product accumulates in float32)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight.detach().to(torch.bfloat16).contiguous())
        self.bias = None if bias is None else nn.Parameter(bias.detach().float(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nn.functional.linear(x.to(torch.bfloat16), self.weight).float()
        return y if self.bias is None else y + self.bias


class BF16Head(BF16Linear):
    """An LM head held in bfloat16 whose REFINED highest logits are recomputed in float32.

    A bf16 product returns bf16, so logits near 25 come back in steps of 0.125: on the default
    model two first tokens 0.08 apart ("The" / "L" for "What is the capital of France?") became
    equal. The REFINED largest are recomputed from their bf16 rows and the float32 activations,
    which ranks the candidates that matter for greedy decoding and sampling at float32 resolution;
    mean KL from llama.cpp on the tuning span (essay tokens 6512-6812) went 0.0041 -> 0.00383
    (64 and 256 rows gave 0.00383 and 0.00381; float32 head 0.00375).
    """

    REFINED = 64
    CHUNK = 64  # positions refined at a time: [CHUNK, REFINED, E] float32 rows, not [T, REFINED, E]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        k = min(self.REFINED, self.out_features)
        top = y.topk(k, dim=-1).indices  # [..., k]
        x2, y2, top2 = x.reshape(-1, x.shape[-1]), y.view(-1, y.shape[-1]), top.view(-1, k)
        for i in range(0, x2.shape[0], self.CHUNK):  # one pass for a decode step
            t = top2[i:i + self.CHUNK]
            rows = nn.functional.embedding(t, self.weight).float()  # [n, k, E]
            exact = (rows @ x2[i:i + self.CHUNK].float().unsqueeze(-1)).squeeze(-1)
            if self.bias is not None:
                exact = exact + self.bias[t]
            y2[i:i + self.CHUNK].scatter_(-1, t, exact)
        return y


class BF16Embedding(nn.Module):
    """Rows of a bfloat16 [V, E] table, upcast to float32 (``weight`` may be a BF16Linear's)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.num_embeddings, self.embedding_dim = weight.shape
        self.register_buffer("weight", weight if weight.dtype == torch.bfloat16 else
                             weight.detach().to(torch.bfloat16).contiguous())

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return nn.functional.embedding(ids, self.weight).float()


def hold_head_in_bf16(model: nn.Module) -> None:
    """Replace a LlamaForCausalLM's float32 LM head and embeddings (unless held in int8) by
    bfloat16 ones, in place; a tied pair shares one table (one copy is freed)."""
    head, embed = model.lm_head, model.model.embed_tokens
    tied = isinstance(head, nn.Linear) and head.weight is getattr(embed, "weight", None)
    if isinstance(head, nn.Linear):  # not held in int8 groups (model/qmatmul.py)
        model.lm_head = BF16Head(head.weight, getattr(head, "bias", None))
    if isinstance(embed, nn.Embedding):  # not an int8 table (model/int8_embedding.py)
        model.model.embed_tokens = BF16Embedding(model.lm_head.weight if tied else embed.weight)
