"""Speed of SpeContext selection itself: retrieval-head scoring plus top-B, per decode step, as a
fraction of the decode step, at one context and budget (target: at most 10% at 8k on CPU).

    python bench_edge/bench_selection.py                                  # 8k context, B = 1024, CPU
    python bench_edge/bench_selection.py --device cuda --out bench_edge/results/selection_cuda.json

The prompt (essay text, or --text) is prefilled once. Dense and specontext decode then alternate
from that state, --repeats times each, every run --steps greedy decode steps (EOS ignored) after
its own --warmup-steps run; the medians are reported:

* step_s: wall time of one whole decode step (selection, target forward, sampling), from the
  engine's own decode clock;
* selection_s: the selector's clock around scoring and choosing (``SelectionStats.selection_s``
  over its sparse steps): the head's input fusion and Q/K projection for the new token, its
  scores over every cached position, and the top-B per KV head. The head's observe() after the
  target runs (keeping the fused layers' outputs) is not in it.

A micro-loop then times the selector's select() alone at the prompt's length, and its three parts
(head projection, scoring, top-B) on the same tensors. On CUDA the clocks are read after a
synchronize: selection_s comes from separate specontext runs with ``measure_selection_time``
(the selector synchronises the device around each selection), and step_s from runs without it,
so the synchronisations do not inflate the step they are compared against. The JSON (--out)
records the machine and the head used.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import replace
from types import SimpleNamespace

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

TARGET_FRACTION = 0.10


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--context", type=int, default=8192, help="prompt tokens (capped so the decode steps fit the model)")
    p.add_argument("--budget", type=int, default=1024, help="past tokens attended per KV head")
    p.add_argument("--steps", type=int, default=32, help="timed decode steps per run")
    p.add_argument("--warmup-steps", type=int, default=8, help="decode steps run before each timed run")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per method (medians are reported)")
    p.add_argument("--micro-iters", type=int, default=50, help="iterations of the selection micro-loop")
    p.add_argument("--retrieval-head", default="auto", help="NAME.json artefact, or auto (a head matching the model)")
    p.add_argument("--sink-tokens", type=int, default=4)
    p.add_argument("--window-tokens", type=int, default=60)
    p.add_argument("--text", help="prompt text: any UTF-8 file (default: the Paul Graham essays)")
    p.add_argument("--model", default=None, help="a .gguf file or Hugging Face folder (default: SmolLM2-135M-Instruct)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON path (default bench_edge/results/selection_DEVICE.json)")
    args = p.parse_args(argv)
    for name in ("context", "budget", "steps", "repeats", "micro_iters"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.context <= args.budget:
        p.error(f"--context ({args.context}) must exceed --budget ({args.budget}), or no decode step runs sparse")
    if args.warmup_steps < 0:
        p.error("--warmup-steps must be >= 0")
    if args.out is None:
        kind = "cpu" if args.device == "cpu" else "cuda"
        args.out = os.path.join(HERE, "results", f"selection_{kind}.json")
    return args


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def decode_run(engine, ids, state, sparsity, steps: int) -> tuple[float, float, dict]:
    """(seconds per decode step, selection seconds per sparse step, sparsity stats) of one run."""
    import specontext

    # max_new_tokens counts the token sampled from the prefill logits, which takes no decode step
    g = engine.generate(ids, specontext.GenerationConfig(max_new_tokens=steps + 1, ignore_eos=True),
                        state=state, sparsity=sparsity)
    for _ in g:
        pass
    stats = g.result().stats
    sp = stats.sparsity
    sparse = sp.get("sparse_steps", 0)
    return stats.decode_s / stats.decode_steps, (sp.get("selection_s", 0.0) / sparse if sparse else 0.0), sp


def time_loop(fn, iters: int, device) -> float:
    """Median seconds per call of ``fn`` over ``iters`` calls (after 3 warm-up calls)."""
    for _ in range(3):
        fn()
    synchronize(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def micro(engine, state, opts, iters: int) -> dict:
    """The selector's select() alone at the prompt's length, and its parts on the same tensors."""
    import torch

    device = engine.model.device
    capacity = state.cache.capacity_tokens
    selector = engine.new_selector(capacity, sparsity=opts)
    # share the prefilled head K cache and hidden carry, as a decode from this state would
    selector.k_device, selector.carry_hidden = state.head_selector.k_device, state.head_selector.carry_hidden
    past = len(state.prompt_ids)
    x = torch.tensor([[state.prompt_ids[-1]]], dtype=torch.int64, device=device)
    # select() reads only the positions of the step plan; it writes the new key at ``past``,
    # a slot past the prompt that every later decode overwrites
    plan = SimpleNamespace(positions=torch.tensor([[past]], dtype=torch.int64, device=device), input_lens=[1])
    head, embed = selector.head, selector.embed
    dtype = selector.input_dtype
    hidden = selector.carry_hidden[:, None] if selector.capture_layers else None

    def project():
        return head.project(head.inputs(embed(x).to(dtype), hidden), plan.positions)

    with torch.inference_mode():
        q, _ = project()
        keys = selector.k_device[:, :, :past]
        scores = head.group_probs(q, keys)[:, :, 0]  # [1, G, P]
        out = {
            "select_s": time_loop(lambda: selector.select(x, plan), iters, device),
            "project_s": time_loop(project, iters, device),
            "score_s": time_loop(lambda: head.group_probs(q, keys), iters, device),
            "topk_s": time_loop(lambda: scores.topk(opts.budget_tokens, dim=-1), iters, device),
        }
    out["past_tokens"] = past
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import json

    import torch

    import specontext
    from bench_accuracy import load_retrieval_head
    from haystack import TokenSource, read_text
    from machine import describe
    from specontext.retrieval.selection import SparsityOptions

    torch.manual_seed(args.seed)
    text, text_label = read_text(args.text)
    llm = specontext.load(args.model, device=args.device, dtype=args.dtype, threads=args.threads)
    head_info, problem = load_retrieval_head(llm, args.retrieval_head)
    if head_info is None:
        print(f"error: {problem}", file=sys.stderr)
        return 1
    engine = llm.engine
    device = engine.model.device
    new_tokens = args.warmup_steps + args.steps + 1
    prompt_len = min(args.context, engine.context_tokens - new_tokens)
    ids = TokenSource(llm.tokenizer, text).ids(prompt_len)
    dense = SparsityOptions(method="dense")
    sparse = SparsityOptions(method="specontext", budget_tokens=args.budget, sink_tokens=args.sink_tokens,
                             window_tokens=args.window_tokens)
    # on the CPU every op has finished when it returns, so the selection clock is right without it
    timed = replace(sparse, measure_selection_time=True) if device.type == "cuda" else None
    print(f"prefill {prompt_len} tokens on {device} ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    state = engine.prefill_state(ids, prompt_len + new_tokens)
    synchronize(device)
    prefill_s = time.perf_counter() - t0

    methods = [("dense", dense), ("specontext", sparse)] + ([("specontext_timed", timed)] if timed else [])
    runs: dict[str, list] = {method: [] for method, _ in methods}
    for method, opts in methods:
        if args.warmup_steps:
            decode_run(engine, ids, state, opts, args.warmup_steps)
    for r in range(args.repeats):  # alternate, so slow spells of a shared machine hit both
        for method, opts in methods:
            step_s, sel_s, sp = decode_run(engine, ids, state, opts, args.steps)
            runs[method].append({"step_s": step_s, "selection_per_step_s": sel_s, "sparsity": sp})
            print(f"  run {r + 1}/{args.repeats} {method:16s}: step {step_s * 1e3:7.2f} ms"
                  + (f", selection {sel_s * 1e3:6.2f} ms" if method != "dense" else ""), file=sys.stderr, flush=True)
    print("micro-loop ...", file=sys.stderr, flush=True)
    micro_s = micro(engine, state, sparse, args.micro_iters)

    dense_step = statistics.median(r["step_s"] for r in runs["dense"])
    sparse_step = statistics.median(r["step_s"] for r in runs["specontext"])
    timed_runs = runs["specontext_timed" if timed else "specontext"]
    selection = statistics.median(r["selection_per_step_s"] for r in timed_runs)
    fraction = selection / sparse_step
    result = {
        "benchmark": "SpeContext selection time per decode step",
        "machine": describe(),
        "settings": {**vars(args), "text": text_label, "model": llm.path, "dtype": str(engine.model.dtype),
                     "prompt_tokens": prompt_len},
        "retrieval_head": head_info,
        "prefill_s": round(prefill_s, 3),
        "dense_step_s": dense_step,
        "specontext_step_s": sparse_step,
        "selection_per_step_s": selection,
        "selection_fraction_of_step": round(fraction, 4),
        "selection_fraction_of_dense_step": round(selection / dense_step, 4),
        "specontext_step_speedup_over_dense": round(dense_step / sparse_step, 3),
        "micro": micro_s,
        "micro_select_fraction_of_step": round(micro_s["select_s"] / sparse_step, 4),
        "target": {"selection_fraction_of_step_max": TARGET_FRACTION, "ok": fraction <= TARGET_FRACTION},
        "runs": runs,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = args.out + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    os.replace(tmp, args.out)

    ms = 1e3
    print(f"context {prompt_len} tokens, budget {args.budget}, device {device}, {torch.get_num_threads()} threads, "
          f"head {head_info['config_path']} ({head_info['source']})")
    print("| measure | ms per step | fraction of specontext step |")
    print("|---|---|---|")
    print(f"| dense decode step | {dense_step * ms:.2f} | {dense_step / sparse_step:.3f} |")
    print(f"| specontext decode step | {sparse_step * ms:.2f} | 1.000 |")
    print(f"| selection (in decode) | {selection * ms:.3f} | {fraction:.4f} |")
    for key, label in (("select_s", "selection (micro-loop)"), ("project_s", "  head projection"),
                       ("score_s", "  scoring over all cached positions"), ("topk_s", "  top-B per KV head")):
        print(f"| {label} | {micro_s[key] * ms:.3f} | {micro_s[key] / sparse_step:.4f} |")
    verdict = "ok" if fraction <= TARGET_FRACTION else "MISSED"
    print(f"[{verdict}] selection is {fraction:.1%} of the decode step (target <= {TARGET_FRACTION:.0%}); "
          f"{selection / dense_step:.1%} of a dense step")
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
