"""Linear layers, LM head and embeddings kept as a GGUF's own blocks and run by ggml's CPU kernels
(``--weights gguf``; needs the llamacpp extra, whose llama-cpp-python ships ggml).

Shape letters: N output features, K input features, M rows of input, V vocabulary, E hidden size.

Why: torch's int4 kernel (``model/quant.py``; int4 now runs on ``model/qmatmul.py``'s float32
products) was the slow part of a CPU decode step. On this project's 2-core AVX2 machine its
products took 8.6 ms of a 20 ms step at 1k positions, while
llama.cpp's whole step took 10.8 ms (``bench_edge/results/edge_cpu_avx2_gguf.json``). ggml
multiplies Q4_1 blocks by activations quantized to Q8_1 with integer SIMD, reading each weight's
5 bits once. Its CPU library exports those dot products (``ggml_get_type_traits_cpu``), so
``csrc/ggml.c`` loads it at run time and runs them over our layers' rows on torch's own OpenMP
threads. The numbers are llama.cpp's: each activation row is quantized to the 8-bit type ggml
pairs with the weight's (Q8_1 for Q4_1, Q8_0 for Q8_0), as llama.cpp does.

A layer holds its GGUF tensor's bytes, [N, row bytes], unchanged (rows reordered where the GGUF
permutes q/k for RoPE; q/k/v and gate/up concatenated by rows, which needs one type per fused
group). A tied table serves as LM head and embedding: rows are dequantized by ggml's own
``to_float`` when looked up.

The products are torch operators (``specontext::ggml_mm_``, ``specontext::ggml_rows_``) that the
native library registers through torch's stable C ABI, so ``--compile-decode aot`` graphs call
them like any aten kernel.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import dataclass

import torch
from gguf import GGMLQuantizationType
from torch import nn

from ..errors import InputError

def ggml_paths() -> tuple[str, str] | None:
    """(libggml-base, libggml-cpu) from the installed llama-cpp-python, found without importing it
    (its import loads llama.cpp itself), or None."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.origin:
        return None
    lib = os.path.join(os.path.dirname(spec.origin), "lib")
    base, cpu = os.path.join(lib, "libggml-base.so"), os.path.join(lib, "libggml-cpu.so")
    return (base, cpu) if os.path.exists(base) and os.path.exists(cpu) else None


@functools.cache
def ggml() -> object:
    """The native library with ggml loaded and the operators registered (once per process);
    InputError naming what to install when ggml is not there."""
    from .. import native

    paths = ggml_paths()
    if paths is None:
        raise InputError("--weights gguf runs on ggml's CPU kernels from llama-cpp-python, which is not installed: "
                         "pip install 'specontext[llamacpp]' (it compiles for about 11 minutes), or use "
                         "--weights auto or int4")
    lib = native.library()
    status = lib.lib.spc_ggml_init(paths[0].encode(), paths[1].encode(), native.torch_cpu_library().encode())
    if status != 0:
        detail = lib.ffi.string(lib.lib.spc_last_error()).decode(errors="replace")
        raise InputError(f"--weights gguf: ggml's CPU kernels did not load ({detail}); use --weights auto or int4")
    native.register_fakes(("ggml_mm_", "ggml_rows_"))
    return lib.lib


def row_bytes(ggml_type: int, k: int) -> int:
    """Bytes of a row of k values of ``ggml_type``; 0 when ggml has no CPU product for such rows."""
    return int(ggml().spc_ggml_row_bytes(ggml_type, k))


@dataclass
class BlockWeight:
    """A [N, K] weight as a GGUF stores it: ``blocks`` uint8 [N, row bytes] of ``ggml_type``."""

    ggml_type: int
    blocks: torch.Tensor
    in_features: int

    @property
    def shape(self) -> tuple[int, int]:
        return (self.blocks.shape[0], self.in_features)

    def rows(self, index: torch.Tensor) -> BlockWeight:
        return BlockWeight(self.ggml_type, self.blocks[index].contiguous(), self.in_features)

    def float_chunks(self, rows: int):
        """The values as float32, ``rows`` rows at a time (ggml's dequantization)."""
        for start in range(0, self.blocks.shape[0], rows):
            yield read_rows(self.blocks, self.ggml_type, self.in_features,
                            torch.arange(start, min(start + rows, self.blocks.shape[0])))


def read_rows(blocks: torch.Tensor, ggml_type: int, k: int, ids: torch.Tensor) -> torch.Tensor:
    """Rows ``ids`` (int64, any shape) of a table of blocks, dequantized by ggml: [*ids.shape, k] float32."""
    flat = ids.reshape(-1).contiguous()
    out = torch.empty(flat.shape[0], k, dtype=torch.float32, device=ids.device)
    torch.ops.specontext.ggml_rows_(out, blocks, flat, ggml_type)
    return out.view(*ids.shape, k)


def _type_name(ggml_type: int) -> str:
    try:
        return GGMLQuantizationType(ggml_type).name
    except ValueError:
        return str(ggml_type)


def concat_block_rows(parts: list[BlockWeight], name: str) -> BlockWeight:
    """q/k/v or gate/up as one weight: their rows stacked, which needs one block type."""
    types = {p.ggml_type for p in parts}
    if len(types) > 1:
        named = sorted(_type_name(t) for t in types)
        raise InputError(f"{name} and the tensors fused with it mix GGUF types ({', '.join(named)}), which "
                         f"--weights gguf cannot run as one layer; use --weights int4 or fp32")
    return BlockWeight(parts[0].ggml_type, torch.cat([p.blocks for p in parts]), parts[0].in_features)


class GGMLLinear(nn.Module):
    """y = x W^T (+ b), W a :class:`BlockWeight`; float32 in and out."""

    def __init__(self, weight: BlockWeight, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.ggml_type = weight.ggml_type
        if row_bytes(self.ggml_type, self.in_features) != weight.blocks.shape[1]:
            raise InputError(f"ggml has no CPU product for type {self.ggml_type} rows of {self.in_features} values "
                             f"({weight.blocks.shape[1]} bytes); use --weights int4 or fp32")
        self.register_buffer("blocks", weight.blocks.contiguous())
        self.bias = None if bias is None else nn.Parameter(bias.detach().float(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features).float().contiguous()
        out = x2.new_empty(x2.shape[0], self.out_features)
        torch.ops.specontext.ggml_mm_(out, x2, self.blocks, self.ggml_type)
        out = out.view(*x.shape[:-1], self.out_features)
        return out if self.bias is None else out + self.bias


class GGMLEmbedding(nn.Module):
    """Rows of a [V, E] table of GGUF blocks (``blocks`` may be a :class:`GGMLLinear` head's),
    dequantized to float32 by ggml."""

    def __init__(self, blocks: torch.Tensor, ggml_type: int, embedding_dim: int):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.ggml_type = blocks.shape[0], embedding_dim, ggml_type
        self.register_buffer("blocks", blocks)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return read_rows(self.blocks, self.ggml_type, self.embedding_dim, ids)
