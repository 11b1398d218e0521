"""Weights that stay quantized: int4 groupwise and int8 per output row. int4 runs on a CPU on the
native library's float32 products (``model/qmatmul.py``; torch's own int4 kernel where the library
is missing) and on CUDA on torch's tensor-core kernel; int8 on torch's CPU kernel.

Shape letters: N output features, K input features, G group size (values sharing a scale and a
zero, along K), M rows of input.

* **int4**: each value q in 0..15 stands for ``(q - 8) * scale + zero``, with one scale and one
  zero per group of G = 32 values along K. This is the layout of torch's weight-only int4 matmul
  (``aten._weight_int4pack_mm_for_cpu``), and a GGUF Q4_1 block (``d * q + m`` per 32 values)
  maps onto it exactly: scale = d, zero = m + 8 d (Q4_0: ``d * (q - 8)``, zero = 0). Every
  intermediate of ``(q - 8) d + (m + 8 d)`` and of ``d q + m`` is exact in float32, so both round
  the same real number once: the conversion to these values is lossless (tested). The native
  CPU products keep them float32; torch's kernels round them to bfloat16 where they run in bf16
  (:func:`kernel_dtype`, CUDA).
* **int8**: each value q in -127..127 stands for ``q * scale`` with one scale per output row, the
  layout of ``aten._weight_int8pack_mm``. A GGUF Q8_0 tensor (one scale per 32 values) is
  requantized to it, which rounds.

:class:`QuantizedWeight` is the loader's form (values unpacked, one byte each);
:func:`quantized_linear` turns it into the module that runs it, packing for the kernel then.
"""

from __future__ import annotations

from dataclasses import dataclass

import functools

import torch
from torch import nn

INT4_GROUP = 32
FORMATS = ("int4", "int8")


@functools.cache
def cpu_bf16_kernels() -> bool:
    """Whether the CPU kernels should take bfloat16 activations: where the CPU multiplies bf16
    natively (AVX512-BF16 or AMX), and on AVX2 CPUs without it, where torch's bf16 paths still beat
    float32 for a decode step's memory-bound products (``bench_edge/bench_cpu_kernels.py``):
    - AVX512-BF16: a bf16 matrix-vector product ran 2.7x (down_proj) to 4x (LM head) faster;
    - AVX2 only (``bench_edge/results/cpu_kernels_avx2.json``): the LM head took 5.8 ms in bf16
      against 20.3 in float32, and int8 / int4 on bf16 activations ran 1.6-2.2x / 1.2-1.7x faster
      than float32 weights, while on float32 activations they took 5-7x (int8) and 8-10x (int4)
      longer; the default model's int4 decoded at 16.1 tok/s against float32's 6.7
      (``weights_cpu_avx2.json``).
    Elsewhere (no AVX2, or not x86) float32."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = set(f.read().split())
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16", "avx2"})


def kernel_dtype(bf16: bool | None = None) -> torch.dtype:
    """The activation dtype torch's CPU weight-only kernels run in (int8; int4 where the native
    products are missing, ``model/qmatmul.py``): bfloat16 where it pays
    (:func:`cpu_bf16_kernels`; ``bf16`` None: detect), else float32.

    torch's CPU int4 and int8 weight-only matmuls take float32 activations on a generic path: on
    this project's CPU (AVX512-BF16) a [1, 576] x [576, 1536] product took 718 us in int4 and 291 us
    in int8 with float32 activations, against 20 us and 17 us with bfloat16 activations and 48 us
    for the float32 weight itself. The kernels then want their scales (and zeros) in bfloat16 too,
    and return bfloat16 (tests/test_weights.py bounds the rounding).
    """
    return torch.bfloat16 if (cpu_bf16_kernels() if bf16 is None else bf16) else torch.float32


@dataclass
class QuantizedWeight:
    """A [N, K] weight kept quantized (see the module docstring for what the values mean).

    Attributes:
        format: ``int4`` or ``int8``.
        q: int4: uint8 [N, K] in 0..15; int8: int8 [N, K].
        scale: int4: float32 [N, K / G]; int8: float32 [N].
        zero: int4: float32 [N, K / G]; int8: None.
    """

    format: str
    q: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)

    def dequantize(self) -> torch.Tensor:
        """The float32 [N, K] weight these values stand for (the reference the kernels are tested against)."""
        if self.format == "int8":
            return self.q.float() * self.scale[:, None]
        n, k = self.shape
        groups = (self.q.float() - 8).view(n, k // INT4_GROUP, INT4_GROUP)
        return (groups * self.scale[:, :, None] + self.zero[:, :, None]).view(n, k)

    def rows(self, index: torch.Tensor) -> QuantizedWeight:
        """The same weight with its rows (output features) taken in ``index`` order."""
        return QuantizedWeight(self.format, self.q[index], self.scale[index],
                               None if self.zero is None else self.zero[index])


def concat_rows(parts: list[QuantizedWeight]) -> QuantizedWeight:
    """Weights of one format stacked along N (how q/k/v and gate/up are fused)."""
    if len({p.format for p in parts}) != 1:
        raise ValueError(f"cannot fuse weights of formats {sorted({p.format for p in parts})}")
    zeros = None if parts[0].zero is None else torch.cat([p.zero for p in parts])
    return QuantizedWeight(parts[0].format, torch.cat([p.q for p in parts]), torch.cat([p.scale for p in parts]),
                           zeros)


def quantize(weight: torch.Tensor, fmt: str) -> QuantizedWeight:
    """Quantize a float [N, K] weight: int8 symmetric per row, or int4 asymmetric per group of 32."""
    w = weight.detach().float()
    if fmt == "int8":
        scale = (w.abs().amax(dim=1) / 127).clamp_min(1e-12)
        return QuantizedWeight("int8", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8), scale)
    if fmt != "int4":
        raise ValueError(f"unknown quantized format {fmt!r}; use {' or '.join(FORMATS)}")
    n, k = w.shape
    if k % INT4_GROUP:
        raise ValueError(f"int4 needs input features in groups of {INT4_GROUP}; this weight has {k}")
    g = w.view(n, k // INT4_GROUP, INT4_GROUP)
    lo, hi = g.amin(dim=2), g.amax(dim=2)
    scale = ((hi - lo) / 15).clamp_min(1e-12)
    q = torch.round((g - lo[:, :, None]) / scale[:, :, None]).clamp(0, 15)
    # value = lo + q * scale = (q - 8) * scale + (lo + 8 * scale)
    return QuantizedWeight("int4", q.view(n, k).to(torch.uint8), scale, lo + 8 * scale)


class Int4Linear(nn.Module):
    """y = x W^T (+ b) with W int4 groupwise.

    On a CPU: float32 in and out. Where the native library's operators are there
    (``model/qmatmul.py``, ``native``): W packed with float32 scales and zeros, a step of up to
    ``DIRECT_ROWS`` rows on its product, a longer one on torch's float32 matmul of the layer
    dequantized a tile at a time; both compute the float32 product of the dequantized weight
    (``bf16`` is then unused). Else (or ``native=False``) torch's
    weight-only int4 matmul (``aten._weight_int4pack_mm_for_cpu``) in :func:`kernel_dtype`
    (bfloat16 activations, scales and zeros where the CPU has bf16). On CUDA (``device``): the
    tensor-core kernel (``aten._weight_int4pack_mm``, sm80 and newer), bfloat16 in and out; its
    packing takes two values a byte, the even one in the high nibble, and tiles of
    ``inner_k_tiles`` x 16 along K.
    """

    def __init__(self, weight: QuantizedWeight, bias: torch.Tensor | None, bf16: bool | None = None,
                 device: torch.device | str = "cpu", native: bool | None = None):
        super().__init__()
        from . import qmatmul

        n, k = weight.shape
        self.in_features, self.out_features = k, n
        self.on_cuda = torch.device(device).type == "cuda"
        self.native = not self.on_cuda and (qmatmul.available() if native is None else native)
        self.compute_dtype = torch.bfloat16 if self.on_cuda else torch.float32 if self.native else kernel_dtype(bf16)
        if self.native:
            self.register_buffer("packed", qmatmul.pack_int4(weight.q))
            self.register_buffer("scale", weight.scale.float().contiguous())
            self.register_buffer("zero", weight.zero.float().contiguous())
        else:
            if self.on_cuda:
                if k % INT4_GROUP or n % 8:
                    raise ValueError(f"int4 on CUDA needs input features in multiples of {INT4_GROUP} and outputs in "
                                     f"multiples of 8; this weight is [{n}, {k}]")
                q = weight.q.to(device=device, dtype=torch.uint8)
                pairs = (q[:, ::2] << 4 | q[:, 1::2]).contiguous()  # [N, K / 2]
                tiles = next(t for t in (8, 4, 2) if k % (t * 16) == 0)
                packed = torch.ops.aten._convert_weight_to_int4pack(pairs, tiles)
            else:  # the kernel's layout: two values a byte
                packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(weight.q.to(torch.int32), 1)
            self.register_buffer("packed", packed)
            # [K / G, N, 2] (scale, zero) pairs
            self.register_buffer("scale_zeros", torch.stack([weight.scale.t(), weight.zero.t()], dim=-1)
                                 .to(device=device, dtype=self.compute_dtype).contiguous())
        self.bias = None if bias is None else nn.Parameter(
            bias.to(device=device, dtype=torch.bfloat16 if self.on_cuda else torch.float32), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features).to(self.compute_dtype).contiguous()
        if self.native:
            from .qmatmul import DIRECT_ROWS, q4_dequantize, q4_mm, tiled_product

            y = (q4_mm(x2, self.packed, self.scale, self.zero) if x2.shape[0] <= DIRECT_ROWS else
                 tiled_product(x2, self.out_features, lambda r0, r1: q4_dequantize(
                     self.packed[r0:r1], self.scale[r0:r1], self.zero[r0:r1])))
        elif self.on_cuda:
            y = torch.ops.aten._weight_int4pack_mm(x2, self.packed, INT4_GROUP, self.scale_zeros)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, INT4_GROUP, self.scale_zeros)
        y = y.to(x.dtype if self.on_cuda else torch.float32).view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


class Int8Linear(nn.Module):
    """y = x W^T (+ b) with W int8 per output row, on torch's weight-only int8 matmul (activations
    in :func:`kernel_dtype`, scales too; float32 in and out).

    ``activations="int8"`` also quantizes the activations, per row, and multiplies on
    ``torch._int_mm`` (VNNI on this machine): a decode step of the default model ran 2.0x faster
    than float32, but top-1 agreement with float32 fell to 0.88 (mean KL 0.026) over 300 essay
    tokens, against 0.967 (0.0024) weight-only, so weight-only is the default.
    """

    def __init__(self, weight: QuantizedWeight, bias: torch.Tensor | None, activations: str = "float",
                 bf16: bool | None = None):
        super().__init__()
        n, k = weight.shape
        self.in_features, self.out_features = k, n
        self.activations = activations
        self.compute_dtype = kernel_dtype(bf16)  # weight-only: the activations' dtype in the kernel
        self.register_buffer("q", weight.q.contiguous())
        self.register_buffer("scale", weight.scale.float().contiguous())
        self.register_buffer("kernel_scale", self.scale.to(self.compute_dtype))  # the same tensor when float32
        self.bias = None if bias is None else nn.Parameter(bias.float(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        if self.activations == "int8":
            xs = (x2.abs().amax(dim=1, keepdim=True) / 127).clamp_min(1e-12)
            xq = torch.round(x2 / xs).to(torch.int8)
            y = torch._int_mm(xq, self.q.t()).float() * xs * self.scale
        else:
            y = torch.ops.aten._weight_int8pack_mm(x2.to(self.compute_dtype), self.q, self.kernel_scale).float()
        y = y.view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


def quantized_linear(weight: QuantizedWeight, bias: torch.Tensor | None = None,
                     device: torch.device | str = "cpu") -> nn.Module:
    """The module that runs ``weight`` (and ``bias``) on ``device``'s kernels (int8: CPU only)."""
    if weight.format == "int4":
        return Int4Linear(weight, bias, device=device)
    if torch.device(device).type != "cpu":
        raise ValueError("int8 weights run on the CPU's kernel only in this version")
    return Int8Linear(weight, bias)
