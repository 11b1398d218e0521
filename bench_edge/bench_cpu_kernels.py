"""CPU matrix-vector kernels on the default model's shapes, per weight format and activation dtype.

Which activation dtype the weight-only int8 / int4 kernels should take depends on the CPU
(``specontext/model/quant.py``, ``kernel_dtype``): this measures one decode token's product
([1, K] x [K, N]) for the default model's shapes, each way the runtime could run it:
- float32 and bfloat16 ``F.linear``;
- ``_weight_int8pack_mm`` (int8 per row) on float32 and on bfloat16 activations;
- ``_weight_int4pack_mm_for_cpu`` (int4, groups of 32) on float32 and on bfloat16 activations;
- the native library's float32 products (``specontext/model/qmatmul.py``): int4 directly
  (``int4_native``), int4 dequantized a tile at a time for torch's float32 matmul
  (``int4_native_tiled``, what a step of more than ``DIRECT_ROWS`` rows runs), and int8 groups of
  32 (``q8_groups_native``, the Q8_0 LM head's).

``--rows`` gives the activation rows M of each product (1: a decode token; more: batched decode
or prefill, where the direct product and the tiled one cross).

Each figure is the median over ``--repeats`` rounds of the mean of ``--iters`` calls, with the
machine's vector extensions recorded (``cpu_isa``), since they decide the answer.

    python bench_edge/bench_cpu_kernels.py --out bench_edge/results/cpu_kernels_<isa>.json
    python bench_edge/bench_cpu_kernels.py --rows 1 16 48 64 --out bench_edge/results/cpu_kernels_avx2_native.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
# (name, K, N): one decode token's products on SmolLM2-135M (E 576, I 1536, V 49152)
SHAPES = (("qkv", 576, 960), ("gate_up", 576, 3072), ("down", 1536, 576), ("lm_head", 576, 49152))


def time_us(fn, iters: int, repeats: int) -> float:
    for _ in range(max(3, iters // 10)):
        fn()
    rounds = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        rounds.append((time.perf_counter() - t0) / iters * 1e6)
    return round(statistics.median(rounds), 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--rows", type=int, nargs="+", default=[1], help="activation rows M of each product")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    import torch

    from specontext.model import qmatmul
    from specontext.model.quant import quantize

    sys.path.insert(0, HERE)
    from machine import describe

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    native = qmatmul.available()
    rows = []
    for (name, K, N), M in ((shape, m) for m in args.rows for shape in SHAPES):
        x = torch.randn(M, K)
        w = torch.randn(N, K)
        q8 = torch.randint(-127, 128, (N, K), dtype=torch.int8)
        s8 = torch.rand(N) / 64
        q4 = torch.ops.aten._convert_weight_to_int4pack_for_cpu(torch.randint(0, 16, (N, K), dtype=torch.int32), 1)
        sz = torch.rand(K // 32, N, 2) / 16
        xb, wb = x.bfloat16(), w.bfloat16()
        s8b, szb = s8.bfloat16(), sz.bfloat16()
        ways = {
            "fp32_linear": lambda: torch.nn.functional.linear(x, w),
            "bf16_linear": lambda: torch.nn.functional.linear(xb, wb),
            "int8_fp32_act": lambda: torch.ops.aten._weight_int8pack_mm(x, q8, s8),
            "int8_bf16_act": lambda: torch.ops.aten._weight_int8pack_mm(xb, q8, s8b),
            "int4_fp32_act": lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x, q4, 32, sz),
            "int4_bf16_act": lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(xb, q4, 32, szb),
        }
        if native:
            qw = quantize(w, "int4")
            packed, g8 = qmatmul.pack_int4(qw.q), torch.rand(N, K // 32) / 64
            ways["int4_native"] = lambda: qmatmul.q4_mm(x, packed, qw.scale, qw.zero)
            ways["int4_native_tiled"] = lambda: qmatmul.tiled_product(
                x, N, lambda r0, r1: qmatmul.q4_dequantize(packed[r0:r1], qw.scale[r0:r1], qw.zero[r0:r1]))
            ways["q8_groups_native"] = lambda: qmatmul.q8_mm(x, q8, g8)
        row = {"product": name, "M": M, "K": K, "N": N}
        for way, fn in ways.items():
            slow = way.endswith("fp32_act") and way != "fp32_linear"  # the generic paths take ms
            row[f"{way}_us"] = time_us(fn, max(5, args.iters // 10) if slow else args.iters, args.repeats)
        row["fastest"] = min((k for k in row if k.endswith("_us")), key=row.get)[:-3]
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {"benchmark": "CPU matrix-vector kernels, default model's shapes", "machine": describe(),
              "settings": vars(args), "rows": rows}
    if args.out:
        tmp = args.out + ".partial"
        with open(tmp, "w") as f:
            json.dump(result, f, indent=1)
        os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
