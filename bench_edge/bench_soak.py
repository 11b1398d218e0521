"""A long run stays flat: host memory (RSS) along a long sparse generation.

    python bench_edge/bench_soak.py                       # 8,000 tokens, specontext B = 1024, default model (~15 min)
    python bench_edge/bench_soak.py --tokens 500 --out /tmp/soak.json    # a quick look

The default model generates --tokens tokens with ``--ignore-eos`` after a short essay prompt,
under --sparsity (default specontext, B = --budget), greedy. The process's RSS is sampled every
--every tokens (and the Python heap's live bytes, with tracemalloc off: gc counts only). After
--warmup tokens (caches, allocator pools and the head's buffers have reached their size), growth
is the last sample less the smallest sample after warm-up. Target: growth <= 2% of the memory
plan's total for the run (``specontext-run --plan``'s device + host bytes at prompt + tokens on
this machine's profile). Writes JSON with the machine, every sample, the plan's total and the
verdict.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

TARGET_FRACTION = 0.02


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=8000)
    p.add_argument("--prompt-tokens", type=int, default=150)
    p.add_argument("--sparsity", default="specontext")
    p.add_argument("--budget", type=int, default=1024)
    p.add_argument("--every", type=int, default=100, help="tokens between RSS samples")
    p.add_argument("--warmup", type=int, default=1000, help="tokens before growth is counted")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--out", default=os.path.join(HERE, "results", "soak_cpu.json"))
    args = p.parse_args(argv)
    if args.tokens < 1 or args.every < 1 or args.warmup >= args.tokens:
        p.error("--tokens and --every must be positive and --warmup below --tokens")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import psutil
    import torch

    import machine
    import specontext
    from bench_e2e import write_json
    from specontext.planner.plan import make_plan
    from specontext.settings import GenerationConfig

    torch.set_num_threads(args.threads)
    llm = specontext.load(device="cpu", sparsity=args.sparsity, budget_tokens=args.budget)
    text = specontext.assets.essay_text()
    ids = llm.tokenizer.encode(text[:args.prompt_tokens * 8], add_bos=False, parse_special=False)[:args.prompt_tokens]
    total = len(ids) + args.tokens
    llm.engine.check_prompt_fits(total - 1)
    plan = make_plan(None, "auto", context_tokens=total, budget_tokens=args.budget, sparsity=args.sparsity,
                     dtype="float32").to_dict()
    plan_total = plan["at_context"]["device_bytes"] + plan["at_context"]["host_bytes"]
    process = psutil.Process()
    gen = GenerationConfig(max_new_tokens=args.tokens, ignore_eos=True)
    generation = llm.engine.generate(ids, gen)
    samples, t0, n = [], time.perf_counter(), 0
    for _ in generation:
        n = len(generation.token_ids)
        if n % args.every == 0 or n == args.tokens:
            samples.append({"tokens": n, "rss_bytes": process.memory_info().rss, "s": round(time.perf_counter() - t0, 2),
                            "gc_objects": len(gc.get_objects())})
            print(f"{n:6d} tokens  RSS {samples[-1]['rss_bytes'] / 2**20:8.1f} MiB  {samples[-1]['s']:7.1f} s", flush=True)
    result = generation.result()
    after = [s for s in samples if s["tokens"] >= args.warmup]
    growth = after[-1]["rss_bytes"] - min(s["rss_bytes"] for s in after) if after else None
    out = {"benchmark": "RSS along a long sparse generation", "machine": machine.describe(), "settings": vars(args),
           "prompt_tokens": len(ids), "generated_tokens": result.stats.generated_tokens,
           "stop_reason": result.stop_reason, "decode_tokens_per_s": round(result.stats.decode_tokens_per_s, 2),
           "plan_total_bytes": plan_total, "samples": samples, "growth_after_warmup_bytes": growth,
           "growth_fraction_of_plan": round(growth / plan_total, 5) if growth is not None and plan_total else None}
    out["target"] = {"growth_fraction_of_plan_max": TARGET_FRACTION,
                     "ok": out["growth_fraction_of_plan"] is not None and out["growth_fraction_of_plan"] <= TARGET_FRACTION}
    write_json(out, args.out)
    print(json.dumps({k: out[k] for k in ("generated_tokens", "plan_total_bytes", "growth_after_warmup_bytes",
                                          "growth_fraction_of_plan", "target")}, indent=1))
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
