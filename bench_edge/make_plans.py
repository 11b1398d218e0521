"""Example memory plans: every shape in bench_edge/shapes/ on every shipped device profile.

    python bench_edge/make_plans.py                      # each model's full context, 1 request, specontext B = 2048
    python bench_edge/make_plans.py --context-tokens 32768 --requests 16 --out bench_edge/results/plans_32k_r16
    python bench_edge/make_plans.py --weights int4 --kv-dtype int8 --shapes llama-3.1-8b qwen3-8b \
        --profiles jetson-orin-nano-8gb rtx-4060-laptop-8gb --out bench_edge/results/plans_edge_int4

Writes one JSON plan per (shape, profile) to OUT/SHAPE__PROFILE.json (a plan that cannot work is
written as {"error": ...}, the message specontext-run --plan gives), and OUT/README.md, a table of
what fits: the maximum context, the layers in host memory at the planned context, and the
predicted decode step. No weights are read and no device is needed (seconds in all).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--context-tokens", default="max", help="tokens per request, max (each model's context limit) or "
                   "fit (the longest context that fits the device)")
    p.add_argument("--requests", type=int, default=1)
    p.add_argument("--budget", type=int, default=2048)
    p.add_argument("--sparsity", default="specontext")
    p.add_argument("--weights", default="auto", help="weight format (--weights): auto, fp32, fp16, bf16, int8, int4")
    p.add_argument("--kv-dtype", default="auto", help="KV format (--kv-dtype): auto, int8 or fp8")
    p.add_argument("--embeddings", default="float", help="token table format (--embeddings): float or int8")
    p.add_argument("--shapes", nargs="+", default=None, help="shapes in bench_edge/shapes/ (default: all)")
    p.add_argument("--profiles", nargs="+", default=None, help="device profiles (default: every shipped one)")
    p.add_argument("--out", default=os.path.join(HERE, "results", "plans"))
    args = p.parse_args(argv)

    from specontext.errors import InputError
    from specontext.planner.plan import make_plan
    from specontext.planner.profiles import shipped_profiles

    os.makedirs(args.out, exist_ok=True)
    shapes = args.shapes or sorted(f[:-5] for f in os.listdir(os.path.join(HERE, "shapes")) if f.endswith(".json"))
    rows = []
    for shape in shapes:
        for profile in args.profiles or shipped_profiles():
            config = os.path.join(HERE, "shapes", f"{shape}.json")
            try:
                opts = dict(requests=args.requests, budget_tokens=args.budget, sparsity=args.sparsity,
                            weights=args.weights, kv_dtype=args.kv_dtype, embeddings=args.embeddings)
                if args.context_tokens == "fit":  # plan a short context for the maximum, then plan that
                    context = make_plan(config, profile, context_tokens=1, **opts).to_dict()["max_context_tokens"]
                else:
                    context = None if args.context_tokens == "max" else int(args.context_tokens)
                plan = make_plan(config, profile, context_tokens=context, **opts)
                d = plan.to_dict()
                d["model"]["path"] = f"bench_edge/shapes/{shape}.json"
                a = d["at_context"]
                rows.append((shape, profile, str(d["max_context_tokens"]), str(a["num_offloaded"]),
                             f"{a['device_bytes'] / 2**30:.1f}", f"{a['host_bytes'] / 2**30:.1f}",
                             f"{a['predicted_step_ms']:.1f}", str(d["slot_pool"])))
            except InputError as exc:
                d = {"error": str(exc).replace(os.path.dirname(HERE) + os.sep, ""), "model": shape, "device_profile": profile,
                     "settings": {"context_tokens": args.context_tokens, "requests": args.requests,
                                  "budget_tokens": args.budget, "sparsity": args.sparsity, "weights": args.weights,
                                  "kv_dtype": args.kv_dtype, "embeddings": args.embeddings}}
                reason = "weights do not fit" if "weights alone" in str(exc) else "context does not fit"
                rows.append((shape, profile, "-", "-", "-", "-", "-", reason))
            with open(os.path.join(args.out, f"{shape}__{profile}.json"), "w", encoding="utf-8") as f:
                json.dump(d, f, indent=2)
                f.write("\n")
    head = ("| shape | profile | max context | offloaded layers at S | device GiB | host GiB | step ms | slot pool |\n"
            "|---|---|---|---|---|---|---|---|\n")
    table = head + "".join("| " + " | ".join(r) + " |\n" for r in rows)
    with open(os.path.join(args.out, "README.md"), "w", encoding="utf-8") as f:
        command = " ".join(["python bench_edge/make_plans.py", *(argv if argv is not None else sys.argv[1:])])
        f.write(f"# Example memory plans\n\n`{command}`: weights {args.weights}, KV {args.kv_dtype}, "
                f"embeddings {args.embeddings}, S = "
                f"{dict(max='each model' + chr(39) + 's context limit', fit='the longest context that fits').get(args.context_tokens, args.context_tokens)} "
                f"tokens per request, {args.requests} request(s), {args.sparsity} with B = {args.budget}, "
                f"bfloat16 on GPU profiles and float32 on the CPU one, the EAGLE-3-shaped retrieval head assumed. Step ms is bytes over bandwidth "
                f"(weights + KV read, or the host-link transfer if slower), not a measurement.\n\n" + table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
