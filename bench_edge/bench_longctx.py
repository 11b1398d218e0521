"""Long-context question answering for every sparsity method: needles in two haystacks and
lm-evaluation-harness's RULER tasks, at several contexts and budgets, in one command.

    python bench_edge/bench_longctx.py                                   # the default grid (hours on 2 cores)
    python bench_edge/bench_longctx.py --contexts 2048 --budgets 512,1024 --tasks needle,niah_single_1 \\
        --samples 4 --out /tmp/longctx.json                              # a quick trial
    python bench_edge/bench_longctx.py --from-json bench_edge/results/longctx_cpu.json   # report and plot only

What runs, per context C:

* ``needle``: each evaluation needle (needles.EVAL_NEEDLES: six facts, none used for tuning or
  training) at each --depths in each haystack (the Paul Graham essays and the Python language
  reference, both read from their first token), framed exactly as ``specontext-run`` frames a
  document and a question; a pass is an answer holding every keyword of the needle.
* RULER tasks (``ruler.py``): built offline by lm-eval from this model's tokenizer, scored by the
  task's own metric (the share of expected answers found). Prompts go through the chat template,
  as ``lm_eval --apply_chat_template`` renders them (the instruct model then stops at the end of
  its turn; ``--ruler-raw`` gives raw text, whose answers run on to the task's 128 tokens).

Every prompt is prefilled once (dense: prefill is always exact, so the first answer token comes
from the full context whatever the method) and decoded greedily by dense and by every
--methods at every --budgets from that state. A budget at or above prompt + answer tokens runs
dense by construction: it is not decoded again, and the tables mark it '='.

Reported per task, context, method and budget: the mean score, n, and a 95% Wilson interval
(the scores of needle and single-needle RULER tasks are 0 or 1; for tasks scoring fractions the
interval treats the mean as a proportion of n); and the mean paired difference to dense with a
95% normal interval. Writes the JSON (machine, settings, retrieval head, every sample) to --out,
rewriting ``OUT.partial`` after each sample so an interrupted run resumes where it stopped, and
a PNG of score against budget, one panel per task and context.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import haystack  # noqa: E402
import machine  # noqa: E402
import needles  # noqa: E402

METHODS = ("specontext", "snapkv", "quest", "streaming", "oracle")
DEFAULT_TASKS = ("needle", "niah_single_1", "niah_single_2", "niah_multikey_1", "ruler_vt")


@dataclass
class Item:
    """One prompt to answer: its ids, how long an answer may be, and how to score it."""

    task: str
    key: str
    ids: list[int]
    max_new_tokens: int
    stop: tuple[str, ...]
    score: Callable[[str], float]
    meta: dict


def int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contexts", type=int_list, default=[2048, 4096, 8192])
    p.add_argument("--budgets", type=int_list, default=[256, 512, 1024, 2048])
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated among {', '.join(METHODS)} "
                   "(dense always runs as the reference)")
    p.add_argument("--tasks", default=",".join(DEFAULT_TASKS),
                   help="comma-separated: needle and any offline RULER task (ruler.OFFLINE_TASKS)")
    p.add_argument("--samples", type=int_list, default=None,
                   help="RULER samples per task at each context (one value, or one per context); default 30")
    p.add_argument("--depths", type=int_list, default=[10, 30, 50, 70, 90], help="needle depths in percent")
    p.add_argument("--haystacks", default=",".join(needles.HAYSTACKS))
    p.add_argument("--needle-new-tokens", type=int, default=32)
    p.add_argument("--ruler-raw", dest="ruler_chat", action="store_false",
                   help="give RULER prompts as raw text (lm_eval's default) instead of through the chat template "
                        "(lm_eval --apply_chat_template); raw answers run on to the task's 128 tokens, about ten "
                        "times the decode work")
    p.add_argument("--retrieval-head", default="auto")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--out", default=os.path.join(HERE, "results", "longctx_cpu.json"))
    p.add_argument("--plot", default=None, help="PNG path (default: the JSON's with .png; 'none' to skip)")
    p.add_argument("--from-json", metavar="JSON", nargs="+",
                   help="measure nothing: report and plot earlier results; several files are merged into --out "
                        "(a later file's answers replace an earlier one's for the same task, context, key and method)")
    args = p.parse_args(argv)
    if args.from_json and len(args.from_json) == 1:
        args.out = args.from_json[0]
    args.plot = args.plot or os.path.splitext(args.out.removesuffix(".partial"))[0] + ".png"
    args.methods = [m for m in args.methods.split(",") if m]
    bad = [m for m in args.methods if m not in METHODS]
    if bad:
        p.error(f"--methods must be among {', '.join(METHODS)}; got {bad[0]!r}")
    args.tasks = [t for t in args.tasks.split(",") if t]
    samples = args.samples or [30]
    if len(samples) not in (1, len(args.contexts)):
        p.error("--samples takes one value or one per context")
    args.samples_at = dict(zip(args.contexts, samples * len(args.contexts) if len(samples) == 1 else samples))
    return args


# ---- items -----------------------------------------------------------------------------------

def needle_items(llm, context: int, args) -> list[Item]:
    items = []
    for hay in args.haystacks.split(","):
        text, _ = needles.haystack_text(hay)
        source = haystack.TokenSource(llm.tokenizer, text)
        for ni, needle in enumerate(needles.EVAL_NEEDLES):
            for depth in args.depths:
                ids = haystack.needle_prompt_ids(llm, source, needle.sentence, needle.question,
                                                 context - args.needle_new_tokens, depth / 100)
                keywords = list(needle.keywords)
                items.append(Item("needle", f"{hay}/{ni}/{depth}", ids, args.needle_new_tokens, (),
                                  lambda answer, k=keywords: float(haystack.answer_passes(answer, k)),
                                  {"haystack": hay, "needle": ni, "depth": depth}))
    return items


def ruler_items(llm, task: str, context: int, num_samples: int, chat: bool) -> list[Item]:
    import ruler
    from specontext.evaluation import generation_config, hf_tokenizer_dir

    items = []
    samples = ruler.ruler_samples(task, context, num_samples, hf_tokenizer_dir(llm.tokenizer),
                                  chat_tokenizer=llm.tokenizer if chat else None)
    for i, s in enumerate(samples):
        gen = generation_config(s.gen_kwargs)
        ids = llm.tokenizer.encode(s.prompt_text)
        items.append(Item(task, str(i), ids, gen.max_new_tokens, gen.stop,
                          lambda answer, s=s: ruler.score(s, answer), {"answers": s.answers}))
    return items


# ---- measuring -------------------------------------------------------------------------------

def run_item(llm, item: Item, args) -> dict:
    from specontext.retrieval.selection import SparsityOptions
    from specontext.settings import GenerationConfig

    engine = llm.engine
    gen = GenerationConfig(max_new_tokens=item.max_new_tokens, stop=item.stop)
    capacity = min(len(item.ids) + item.max_new_tokens, engine.context_tokens)
    t0 = time.perf_counter()
    state = engine.prefill_state(item.ids, capacity)
    row = {"task": item.task, "key": item.key, "prompt_tokens": len(item.ids), **item.meta,
           "prefill_s": round(time.perf_counter() - t0, 2), "results": {}}

    def decode(name: str, opts: SparsityOptions) -> None:
        t = time.perf_counter()
        g = engine.generate(item.ids, gen, state=state, sparsity=opts)
        for _ in g:
            pass
        text = g.result().text
        row["results"][name] = {"score": item.score(text), "answer": text[:200], "s": round(time.perf_counter() - t, 2)}

    decode("dense", SparsityOptions())
    base = engine.sparsity  # the runtime's defaults (pinning, focus window, sinks, window)
    for budget in args.budgets:
        for method in args.methods:
            name = f"{method}@{budget}"
            if budget >= capacity:  # dense by construction
                row["results"][name] = {**row["results"]["dense"], "same_as_dense": True}
                continue
            opts = SparsityOptions(method=method, budget_tokens=budget, sink_tokens=base.sink_tokens,
                                   window_tokens=base.window_tokens, page_tokens=base.page_tokens,
                                   pin_fraction=base.pin_fraction, focus_window_tokens=base.focus_window_tokens,
                                   focus_pool_tokens=base.focus_pool_tokens, focus_layers=base.focus_layers)
            decode(name, opts)
    return row


# ---- reporting -------------------------------------------------------------------------------

def wilson(mean: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion ``mean`` over ``n`` samples."""
    if n == 0:
        return (0.0, 1.0)
    centre = (mean + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(mean * (1 - mean) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def summarize(out: dict) -> dict:
    """{task: {context: {name: {mean, n, ci95, diff_to_dense, diff_ci95, same_as_dense}}}}."""
    groups: dict = {}
    for row in out["samples"]:
        per = groups.setdefault(row["task"], {}).setdefault(str(row["context"]), {})
        dense = row["results"]["dense"]["score"]
        for name, res in row["results"].items():
            entry = per.setdefault(name, {"scores": [], "diffs": [], "same": True})
            entry["scores"].append(res["score"])
            entry["diffs"].append(res["score"] - dense)
            entry["same"] &= bool(res.get("same_as_dense")) or name == "dense"
    summary: dict = {}
    for task, per_ctx in groups.items():
        for ctx, per in per_ctx.items():
            for name, e in per.items():
                n = len(e["scores"])
                mean = sum(e["scores"]) / n
                d = sum(e["diffs"]) / n
                var = sum((x - d) ** 2 for x in e["diffs"]) / (n - 1) if n > 1 else 0.0
                half = 1.96 * math.sqrt(var / n) if n > 1 else 1.0
                lo, hi = wilson(mean, n)
                summary.setdefault(task, {}).setdefault(ctx, {})[name] = {
                    "mean": round(mean, 4), "n": n, "ci95": [round(lo, 3), round(hi, 3)],
                    "diff_to_dense": round(d, 4), "diff_ci95": [round(d - half, 3), round(d + half, 3)],
                    "same_as_dense": e["same"] and name != "dense"}
    return summary


def tables(summary: dict, methods: list[str], budgets: list[int]) -> str:
    lines = []
    for task, per_ctx in summary.items():
        lines.append(f"\n== {task}: mean score (n) [95% interval]; '=' runs dense by construction")
        header = f"{'context':>8} {'method':>11} " + " ".join(f"{'B=' + str(b):>20}" for b in budgets)
        lines.append(header)
        for ctx, per in sorted(per_ctx.items(), key=lambda kv: int(kv[0])):
            d = per["dense"]
            lines.append(f"{ctx:>8} {'dense':>11} {d['mean']:.3f} ({d['n']}) [{d['ci95'][0]:.2f}, {d['ci95'][1]:.2f}]")
            for m in methods:
                cells = []
                for b in budgets:
                    e = per.get(f"{m}@{b}")
                    if e is None:
                        cells.append(f"{'-':>20}")
                    else:
                        mark = "=" if e["same_as_dense"] else " "
                        cells.append(f"{e['mean']:.3f}{mark}[{e['ci95'][0]:.2f},{e['ci95'][1]:.2f}]".rjust(20))
                lines.append(f"{'':>8} {m:>11} " + " ".join(cells))
    return "\n".join(lines)


def plot(out: dict, summary: dict, path: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    tasks = list(summary)
    contexts = sorted({int(c) for per in summary.values() for c in per})
    budgets, methods = out["settings"]["budgets"], out["settings"]["methods"]
    fig, axes = plt.subplots(len(contexts), len(tasks), figsize=(3.2 * len(tasks), 2.6 * len(contexts)),
                             squeeze=False, sharey=True)
    for j, task in enumerate(tasks):
        for i, ctx in enumerate(contexts):
            ax = axes[i][j]
            per = summary[task].get(str(ctx))
            if per is None:
                ax.set_visible(False)
                continue
            ax.axhline(per["dense"]["mean"], color="black", linestyle="--", linewidth=1, label="dense")
            for m in methods:
                xs = [b for b in budgets if f"{m}@{b}" in per]
                ys = [per[f"{m}@{b}"]["mean"] for b in xs]
                ax.plot(xs, ys, marker="o", markersize=3, label=m)
            ax.set_xscale("log", base=2)
            ax.set_xticks(budgets, [str(b) for b in budgets])
            ax.set_ylim(-0.05, 1.05)
            ax.set_title(f"{task}, {ctx} tokens (n={per['dense']['n']})", fontsize=8)
            if i == len(contexts) - 1:
                ax.set_xlabel("budget B")
            if j == 0:
                ax.set_ylabel("score")
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def report(out: dict, args) -> None:
    out["summary"] = summarize(out)
    print(tables(out["summary"], out["settings"]["methods"], out["settings"]["budgets"]))
    if args.plot != "none":
        where = plot(out, out["summary"], args.plot)
        if where:
            print(f"plot: {where}")


def merge_results(paths: list[str]) -> dict:
    """One result from several runs of this script (e.g. contexts run side by side, or a run resumed
    with more samples, or some methods re-run): samples keyed by (task, context, key), and within a
    sample each method's answer from the latest file that has it;
    contexts, budgets, methods and tasks are the union, the sparsity defaults the latest file's (a
    method re-run with new defaults replaces its earlier answers); each source's settings are kept."""
    merged, samples = None, {}
    for path in paths:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if merged is None:
            merged = {k: v for k, v in data.items() if k not in ("samples", "summary")}
            merged["settings"] = dict(data["settings"])
            merged["sources"] = []
        else:
            s = merged["settings"]
            s["contexts"] = sorted(set(s["contexts"]) | set(data["settings"]["contexts"]))
            s["budgets"] = sorted(set(s["budgets"]) | set(data["settings"]["budgets"]))
            s["methods"] = list(dict.fromkeys(s["methods"] + data["settings"]["methods"]))
            s["tasks"] = list(dict.fromkeys(s["tasks"] + data["settings"]["tasks"]))
            s["samples"] = {**s["samples"], **data["settings"]["samples"]}
            s["sparsity_defaults"] = data["settings"].get("sparsity_defaults", s.get("sparsity_defaults"))
        merged["sources"].append({"file": os.path.basename(path), "settings": data["settings"],
                                  "runs": data.get("runs") or data.get("sources")})
        for row in data["samples"]:  # per method: a later run of some methods keeps the others' answers
            key = (row["task"], row["context"], row["key"])
            if key in samples:
                row = {**row, "results": {**samples[key]["results"], **row["results"]}}
            samples[key] = row
    merged["samples"] = list(samples.values())
    return merged


def save(out: dict, path: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(out, f, indent=1)
    os.replace(tmp, path)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.from_json:
        out = merge_results(args.from_json)
        report(out, args)
        if len(args.from_json) > 1:
            save(out, args.out)
            print(f"merged: {args.out}")
        return 0
    import torch

    import specontext

    torch.set_num_threads(args.threads)
    llm = specontext.load(sparsity="specontext", retrieval_head=args.retrieval_head)
    llm.set_sparsity(sparsity="dense")  # the head stays loaded; each decode names its method
    head = llm.retrieval_head
    opts = llm.engine.sparsity
    settings = {"ruler_chat_template": args.ruler_chat, "contexts": args.contexts, "budgets": args.budgets, "methods": args.methods, "tasks": args.tasks,
                "samples": args.samples_at, "depths": args.depths, "haystacks": args.haystacks.split(","),
                "needle_new_tokens": args.needle_new_tokens,
                "sparsity_defaults": {"sink_tokens": opts.sink_tokens, "window_tokens": opts.window_tokens,
                                      "pin_fraction": opts.pin_fraction, "focus_window_tokens": opts.focus_window_tokens,
                                      "focus_pool_tokens": opts.focus_pool_tokens, "focus_layers": opts.focus_layers,
                                      "page_tokens": opts.page_tokens}}
    out = {"machine": machine.describe(), "settings": settings,
           "retrieval_head": {"path": getattr(head, "path", None), "source": head.config.source},
           "split": {"needles": "needles.EVAL_NEEDLES (never used to tune or train); haystacks from their first "
                                "token (the head's distillation holds out the essays' first 16,384 tokens)",
                     "haystacks": {h: needles.haystack_text(h)[1] for h in args.haystacks.split(",")},
                     "ruler": "lm-eval's generators, seeds 0 (random) and 1234 (numpy)"},
           "note": "prefill is dense, so the first answer token always comes from the full context",
           "samples": []}
    partial = args.out + ".partial"
    if os.path.exists(partial):
        with open(partial) as f:
            previous = json.load(f)
        if previous.get("settings") == json.loads(json.dumps(settings)):
            out["samples"] = previous["samples"]
            print(f"resuming: {len(out['samples'])} samples already measured", file=sys.stderr)
    done = {(r["task"], r["context"], r["key"]) for r in out["samples"]}
    t_start = time.perf_counter()
    for context in args.contexts:
        for task in args.tasks:
            if task == "needle":
                items = needle_items(llm, context, args)
            else:
                items = ruler_items(llm, task, context, args.samples_at[context], args.ruler_chat)
            for item in items:
                if (task, context, item.key) in done:
                    continue
                row = run_item(llm, item, args)
                row["context"] = context
                out["samples"].append(row)
                save(out, partial)
                scores = " ".join(f"{k}={v['score']:.2f}" for k, v in row["results"].items()
                                  if not v.get("same_as_dense"))
                print(f"[{time.perf_counter() - t_start:7.0f}s] {task} {context} {item.key} "
                      f"({row['prompt_tokens']} tok, prefill {row['prefill_s']}s): {scores}", flush=True)
    report(out, args)
    save(out, args.out)
    os.remove(partial)
    return 0


if __name__ == "__main__":
    sys.exit(main())
