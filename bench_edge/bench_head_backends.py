"""Per-step latency of the retrieval head on torch and on ONNX Runtime, at several cache lengths.

    python bench_edge/bench_head_backends.py                               # shipped head, CPU, 2k/8k/32k
    python bench_edge/bench_head_backends.py --device cuda --out bench_edge/results/head_backends_cuda.json

One decode step of the head's own work, as the selector does it: the new token's inputs (target
embedding plus the fused hidden states) through the norms, fc, Q and K projections with RoPE, then
softmax scores of its query heads over every cached key and the max over each KV group. The K
cache holds S cached positions (random keys; the time does not depend on their values); both
backends read it in place (ONNX Runtime: numpy views on CPU, I/O binding on CUDA). Warm-up runs
outside the timed region; the median of --repeats timed loops of --iters steps is reported, the
backends alternating, so the ratios are measured in one run.

On CUDA ONNX Runtime runs twice: with the K cache in float16 (the runner's default there: the
graph casts the keys it reads) and in float32 (the exported graph as it is), so the cost or gain
of binding float16 keys is measured, along with the runner's stream (``ort_stream``: whether
onnxruntime took our stream, so no step waits on the host).
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
    exported = cached_export(load_head(path))
    runners = {"onnxruntime": OnnxHeadRunner.load(exported, cfg.target, device=args.device)}
    if runners["onnxruntime"].keys_dtype != torch.float32:
        runners["onnxruntime_float32_keys"] = OnnxHeadRunner.load(exported, cfg.target, device=args.device,
                                                                  keys_dtype=torch.float32)
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

        def ort_step(runner, keys):  # each runner reads a K cache of its own keys dtype, in place
            return lambda: runner(embeds, hidden if L else None, positions, keys, valid)

        steps = {"torch": torch_step}
        steps.update({name: ort_step(r, keys.to(r.keys_dtype)) for name, r in runners.items()})
        ours = torch_step()[:, :, 0]
        diffs = {name: float((ours - steps[name]()[2]).abs().max()) for name in runners}
        times = {name: [] for name in steps}
        for fn in steps.values():
            for _ in range(5):
                fn()
        for _ in range(args.repeats):
            for name, fn in steps.items():
                sync()
                t0 = time.perf_counter()
                for _ in range(args.iters):
                    fn()
                sync()
                times[name].append((time.perf_counter() - t0) / args.iters)
        row = {"cached_tokens": S, **{f"{name}_step_s": statistics.median(t) for name, t in times.items()}}
        for name in runners:
            row[f"{name}_over_torch"] = round(row[f"{name}_step_s"] / row["torch_step_s"], 3)
            row[f"{name}_max_abs_score_diff"] = diffs[name]
        row["max_abs_score_diff"] = diffs["onnxruntime"]
        rows.append(row)
        print(f"S={S:6d}: " + ", ".join(f"{name} {row[f'{name}_step_s'] * 1e3:7.3f} ms" for name in steps)
              + f" ({row['onnxruntime_over_torch']:.2f}x), max |score diff| {diffs['onnxruntime']:.1e}",
              file=sys.stderr)
    runner = runners["onnxruntime"]
    out = {"benchmark": "retrieval head step latency: torch vs ONNX Runtime", "machine": describe(),
           "settings": vars(args), "head": os.path.abspath(path), "onnxruntime_provider": runner.provider,
           "onnxruntime_keys_dtype": str(runner.keys_dtype).replace("torch.", ""),
           "ort_stream": runner.stream is not None, "rows": rows}
    out_path = args.out or os.path.join(HERE, "results", f"head_backends_{args.device.split(':')[0]}.json")
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    with open(out_path, "w", encoding="utf-8") as f:
        json.dump(out, f, indent=1)
        f.write("\n")
    extra = "onnxruntime_float32_keys" in runners
    print("| cached positions | torch ms/step | ONNX Runtime ms/step | ORT / torch |"
          + (" ORT, float32 keys, ms/step |" if extra else ""))
    print("|---|---|---|---|" + ("---|" if extra else ""))
    for r in rows:
        print(f"| {r['cached_tokens']} | {r['torch_step_s'] * 1e3:.3f} | {r['onnxruntime_step_s'] * 1e3:.3f} | "
              f"{r['onnxruntime_over_torch']:.2f} |"
              + (f" {r['onnxruntime_float32_keys_step_s'] * 1e3:.3f} |" if extra else ""))
    print(f"results: {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
