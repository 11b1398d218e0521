"""One query token's attention on a CPU by the native library (``csrc/attention.c``), a torch
operator (``specontext::decode_attention_``) that eager steps and ahead-of-time graphs both call.

Shape letters: H query heads, G KV heads, S positions, D head dim.

Why: with the linear layers on ggml's kernels (``model/ggml_linear.py``), torch's CPU flash
attention was the largest remaining part of a decode step at 1k positions on the 2-core AVX2
machine. It runs each query head over its KV head separately and in small matrix products; this
kernel reads each KV head's K and V rows once for all of its query heads, eight floats at a time,
split over (KV head, 256 positions) items on torch's own threads
(``bench_edge/results/edge_cpu_avx2_gguf.json``). Float32 KV, one row (B = 1); a mask shared by
every head or one per KV head (a sparse step's).
"""

from __future__ import annotations

import torch


_READY: list[bool] = []  # [whether the operator is registered], once asked


def available() -> bool:
    """Whether the operator is registered: the native library loads and this torch has the stable
    C ABI it registers through (else attention stays torch's). Loading a model asks, so that a
    step torch.compile traces only reads the answer."""
    if not _READY:
        _READY.append(_register())
    return _READY[0]


def _register() -> bool:
    from .. import native

    return native.init_operators("spc_attention_init", ("decode_attention_",))


def usable(q: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor | None) -> bool:
    """Whether a decode step's attention can run here: one row and one token, float32, at most 16
    query heads per KV head and 256 dims, a mask of [1, 1, 1, S] or [1, G, 1, S]."""
    B, H, T, D = q.shape
    G = keys.shape[1]
    return (B == 1 and T == 1 and q.device.type == "cpu" and q.dtype == keys.dtype == torch.float32
            and H % G == 0 and H // G <= 16 and D <= 256 and keys.stride(-1) == 1 and q.stride(-1) == 1
            and (mask is None or (mask.dtype == torch.bool and mask.shape[1] in (1, G) and mask.shape[2] == 1
                                  and mask.shape[-1] == keys.shape[2]))
            and (_READY[0] if _READY else not torch.compiler.is_compiling() and available()))


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                     mask: torch.Tensor | None) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v over the positions ``mask`` allows (all when None): q [1, H, 1, D],
    keys and values [1, G, S, D] -> [1, H, 1, D] (query head h reads KV head h // (H / G)); for
    what :func:`usable` accepts (values in the keys' dtype and shape)."""
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    flat = (mask.reshape(-1).contiguous() if mask is not None
            else torch.empty(0, dtype=torch.bool, device=q.device))
    torch.ops.specontext.decode_attention_(out, q, keys, values.contiguous() if values.stride(-1) != 1 else values,
                                           flat, q.shape[-1] ** -0.5)
    return out
