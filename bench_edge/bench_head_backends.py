"""Per-step latency of the retrieval head on torch and on ONNX Runtime, at several cache lengths.

    python bench_edge/bench_head_backends.py                               # shipped head, CPU, 2k/8k/32k
    python bench_edge/bench_head_backends.py --device cuda --out bench_edge/results/head_backends_cuda.json

One decode step of the head's own work, as the selector does it: the new token's inputs (target
embedding plus the fused hidden states) through the norms, fc, Q and K projections with RoPE, then
softmax scores of its query heads over every cached key and the max over each KV group. The K
cache holds S cached positions (random keys; the time does not depend on their values); both
backends read it in place (ONNX Runtime: numpy views on CPU, I/O binding on CUDA). Warm-up runs
outside the timed region; the median of --repeats timed loops of --iters steps is reported, the
two backends alternating, so the ratio is measured in one run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--retrieval-head", default=None, help="NAME.json (default: the shipped head of the default model)")
    p.add_argument("--cached", default="2048,8192,32768", help="comma-separated cache lengths S")
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--out", default=None, help="default: bench_edge/results/head_backends_DEVICE.json")
    args = p.parse_args(argv)

    import torch

    from machine import describe
    from specontext.retrieval.head import load_head
    from specontext.retrieval.onnx_head import OnnxHeadRunner, cached_export

    torch.set_num_threads(args.threads)
    if args.device != "cpu" and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU here; use --device cpu")
    path = args.retrieval_head or os.path.join(os.path.dirname(HERE), "models", "smollm2-135m-instruct.json")
    head = load_head(path, device=args.device, dtype=torch.float32)
    cfg = head.config
    runner = OnnxHeadRunner.load(cached_export(load_head(path)), cfg.target, device=args.device)
    E, L = cfg.target.hidden_size, len(cfg.hidden_layers)
    g = torch.Generator().manual_seed(0)
    rows = []

    def sync():
        if args.device != "cpu":
            torch.cuda.synchronize(args.device)

    for S in [int(v) for v in args.cached.split(",") if v]:
        embeds = torch.randn(1, 1, E, generator=g).to(args.device)
        hidden = torch.randn(1, 1, max(L, 1) * E, generator=g).to(args.device)
        positions = torch.tensor([[S - 1]], device=args.device)
        keys = torch.randn(1, cfg.num_kv_heads, S, cfg.head_dim, generator=g).to(args.device)
        valid = torch.ones(1, S, dtype=torch.bool, device=args.device)

        @torch.inference_mode()
        def torch_step():
            x = head.inputs(embeds, hidden if L else None)
            q, k = head.project(x, positions)
            return head.group_probs(q, keys, valid[:, None])

        def ort_step():
            return runner(embeds, hidden if L else None, positions, keys, valid)

        ours = torch_step()[:, :, 0]
        theirs = ort_step()[2]
        max_diff = float((ours - theirs).abs().max())
        times = {"torch": [], "onnxruntime": []}
        for fn in (torch_step, ort_step):
            for _ in range(5):
                fn()
        for _ in range(args.repeats):
            for name, fn in (("torch", torch_step), ("onnxruntime", ort_step)):
                sync()
                t0 = time.perf_counter()
                for _ in range(args.iters):
                    fn()
                sync()
                times[name].append((time.perf_counter() - t0) / args.iters)
        row = {"cached_tokens": S, "torch_step_s": statistics.median(times["torch"]),
               "onnxruntime_step_s": statistics.median(times["onnxruntime"]), "max_abs_score_diff": max_diff}
        row["onnxruntime_over_torch"] = round(row["onnxruntime_step_s"] / row["torch_step_s"], 3)
        rows.append(row)
        print(f"S={S:6d}: torch {row['torch_step_s'] * 1e3:7.3f} ms, onnxruntime {row['onnxruntime_step_s'] * 1e3:7.3f} ms "
              f"({row['onnxruntime_over_torch']:.2f}x), max |score diff| {max_diff:.1e}", file=sys.stderr)
    out = {"benchmark": "retrieval head step latency: torch vs ONNX Runtime", "machine": describe(),
           "settings": vars(args), "head": os.path.abspath(path), "onnxruntime_provider": runner.provider,
           "rows": rows}
    out_path = args.out or os.path.join(HERE, "results", f"head_backends_{args.device.split(':')[0]}.json")
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    with open(out_path, "w", encoding="utf-8") as f:
        json.dump(out, f, indent=1)
        f.write("\n")
    print("| cached positions | torch ms/step | ONNX Runtime ms/step | ORT / torch |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['cached_tokens']} | {r['torch_step_s'] * 1e3:.3f} | {r['onnxruntime_step_s'] * 1e3:.3f} | "
              f"{r['onnxruntime_over_torch']:.2f} |")
    print(f"results: {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
