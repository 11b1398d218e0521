"""Accuracy of sparse decode against dense: attention recall, teacher-forced top-1 agreement and
perplexity, and needle-in-a-haystack pass rate, for every method and budget, in one run.

    python bench_edge/bench_accuracy.py                  # the full default grid (about 1 h on 2 cores)
    python bench_edge/bench_accuracy.py --contexts 1024 --budgets 256,512 --continuation-tokens 32 \\
        --depths 0,50,100 --out /tmp/acc.json            # a quick trial
    python bench_edge/bench_accuracy.py --from-json bench_edge/results/accuracy_cpu.json.partial   # report only

What is measured, per context C, method and budget B (past tokens attended per KV head):

* Teacher-forced. A window of the text from its start: a prefix of C tokens (fewer when
  C + N + 1 would pass the model's context) then N + 1 more (N = --continuation-tokens). The
  prefix is prefilled once (dense); every method then scores the same continuation, one decode
  step per token, from that state. The N tokens predicted by decode steps are scored (the first
  continuation token comes from the dense prefill and is the same for every method):
    - recall: the fraction of the dense attention mass on past tokens that falls on the chosen
      set, mean over layers, KV heads, query heads and sparse decode steps;
    - top-1 agreement: the fraction of the N positions where argmax(sparse) == argmax(dense);
    - perplexity of the N tokens, and the mean KL(dense || sparse) of the next-token distributions.
* oracle-global (teacher-forced only): one set per KV head for every layer, the top-B of the
  target's own attention averaged over layers, recorded in a first pass (global_oracle.py): the
  upper bound of any retrieval head, where ``oracle`` (a set per layer) bounds per-layer methods.
* Needle. The needle sentence is put at a sentence boundary at each depth of the haystack and
  the question follows it in one user message (chat template), the whole prompt about C tokens.
  Each (context, depth) is prefilled once and every method decodes greedily from that state; an
  answer passes when it holds every --answer-keywords entry (case-insensitive).

A step runs sparse only when its past exceeds B; when it never does (B >= context) the method is
dense by construction, and the table marks such cells with '='. The dense reference always runs.

Writes the JSON (machine, settings, retrieval head, every measurement) to --out, rewriting
``OUT.partial`` after each configuration and renaming it to OUT at the end, so an interrupted
run keeps what it measured; prints one table per metric and checks the targets; draws the PNG.

Shape letters: N scored continuation tokens, V vocabulary.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import global_oracle  # noqa: E402  (bench_edge/, next to this file)

METHODS = ("dense", "specontext", "oracle", "quest", "streaming", "oracle-global")
TEACHER_FORCED_ONLY = ("oracle-global",)  # replays recorded attention, so it cannot generate freely
DEFAULT_KEYWORDS = "sandwich,dolores park"
METRICS = (  # (key in the row, section, title, format, larger is better)
    ("recall", "teacher_forced", "attention recall (dense attention mass on the chosen set)", "{:.3f}", True),
    ("top1_agreement", "teacher_forced", "teacher-forced top-1 agreement with dense", "{:.3f}", True),
    ("perplexity", "teacher_forced", "teacher-forced perplexity of the continuation", "{:.2f}", False),
    ("pass_rate", "needle", "needle-in-a-haystack pass rate", "{:.2f}", True),
)


def int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"expected non-negative integers, got {text!r}")
    return values


FALLBACK_PREFIX = "specontext+fb"  # e.g. specontext+fb0.9: the head with confidence fallback at 0.9


def split_method(method: str) -> tuple[str, float | None]:
    """('specontext', 0.9) for 'specontext+fb0.9'; (method, None) otherwise."""
    if method.startswith(FALLBACK_PREFIX):
        return "specontext", float(method[len(FALLBACK_PREFIX):])
    return method, None


def method_list(text: str) -> list[str]:
    methods = [m for m in text.replace(" ", "").split(",") if m]

    def known(m: str) -> bool:
        if not m.startswith(FALLBACK_PREFIX):
            return m in METHODS
        try:
            return 0 < split_method(m)[1] <= 1
        except ValueError:
            return False
    bad = [m for m in methods if not known(m)]
    if bad or not methods:
        raise argparse.ArgumentTypeError(f"methods must be among {', '.join(METHODS)}, or {FALLBACK_PREFIX}X "
                                         f"(specontext with confidence fallback at X in (0, 1]); got {text!r}")
    return methods


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from specontext import assets
    from specontext.settings import RuntimeSettings

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--text", help="haystack: any UTF-8 text file (default: the Paul Graham essays)")
    p.add_argument("--needle", default=assets.NEEDLE, help="the sentence hidden in the haystack")
    p.add_argument("--question", default=assets.NEEDLE_QUESTION, help="the question asked about it")
    p.add_argument("--answer-keywords", default=None,
                   help=f"comma-separated words an answer must all contain (default for the standard needle: "
                        f"{DEFAULT_KEYWORDS!r}; required with --needle)")
    p.add_argument("--contexts", type=int_list, default=[2048, 4096, 8192], help="comma-separated context lengths")
    p.add_argument("--budgets", type=int_list, default=[256, 512, 1024, 2048], help="comma-separated budgets")
    p.add_argument("--methods", type=method_list, default=list(METHODS),
                   help="comma-separated, among " + ", ".join(METHODS) + ", or " + FALLBACK_PREFIX + "X (specontext "
                        "with confidence fallback at threshold X, e.g. specontext+fb0.9); dense always runs as the "
                        "reference")
    p.add_argument("--continuation-tokens", type=int, default=256, help="teacher-forced tokens scored per context")
    p.add_argument("--depths", type=int_list, default=list(range(0, 101, 10)), help="needle depths in percent")
    p.add_argument("--needle-new-tokens", type=int, default=32, help="greedy tokens generated per needle answer")
    p.add_argument("--offset-tokens", type=int, default=0, help="start the haystack this many tokens into the text")
    p.add_argument("--retrieval-head", default="auto", help="NAME.json artefact, or auto (a head matching the model)")
    p.add_argument("--sink-tokens", type=int, default=4, help="always-kept first tokens (specontext, streaming)")
    p.add_argument("--window-tokens", type=int, default=60, help="always-kept recent tokens (specontext)")
    p.add_argument("--page-tokens", type=int, default=16, help="Quest page size")
    p.add_argument("--fallback-threshold", type=float, default=0.0, help="specontext confidence fallback (0 = off)")
    defaults = RuntimeSettings()
    p.add_argument("--pin-fraction", type=float, default=defaults.pin_fraction,
                   help="specontext: share of the budget pinned by the prompt's focus window (0 = off; default: "
                        "the runtime's)")
    p.add_argument("--focus-window-tokens", type=int, default=defaults.focus_window_tokens,
                   help="the focus window W (pinned specontext, snapkv)")
    p.add_argument("--focus-layers", default=defaults.focus_layers, help="layers the pins' focus averages")
    p.add_argument("--focus-pool-tokens", type=int, default=defaults.focus_pool_tokens,
                   help="max-pool width smoothing the focus before pinning")
    p.add_argument("--skip-needle", action="store_true", help="teacher-forced metrics only")
    p.add_argument("--skip-teacher-forced", action="store_true", help="needle only")
    p.add_argument("--model", default=None, help="a .gguf file or Hugging Face folder (default: SmolLM2-135M-Instruct)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="auto",
                   help="auto (float32 on CPU, bfloat16 on CUDA), float32, float16, bfloat16")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON path (default bench_edge/results/accuracy_DEVICE.json)")
    p.add_argument("--plot", default=None, help="PNG path (default: the JSON path with .png; 'none' to skip)")
    p.add_argument("--from-json", metavar="JSON",
                   help="measure nothing: print the tables and targets of an earlier result (or an interrupted "
                        "run's .partial) and draw its plot")
    args = p.parse_args(argv)
    if args.from_json:
        args.out = args.from_json
        args.plot = args.plot or os.path.splitext(args.from_json.removesuffix(".partial"))[0] + ".png"
        return args
    if args.answer_keywords is None:
        if args.needle != assets.NEEDLE:
            p.error("--needle needs --answer-keywords (the words a correct answer must contain)")
        args.answer_keywords = DEFAULT_KEYWORDS
    args.keywords = [k.strip() for k in args.answer_keywords.split(",") if k.strip()]
    if not args.keywords:
        p.error("--answer-keywords is empty")
    if args.needle != assets.NEEDLE and args.question == assets.NEEDLE_QUESTION:
        p.error("--needle needs --question (the default question is about the standard needle)")
    if args.continuation_tokens < 1:
        p.error("--continuation-tokens must be >= 1")
    if args.needle_new_tokens < 1:
        p.error("--needle-new-tokens must be >= 1")
    if max(args.depths) > 100:
        p.error("--depths are percentages, 0 to 100")
    if args.out is None:
        kind = "cpu" if args.device == "cpu" else "cuda"
        args.out = os.path.join(HERE, "results", f"accuracy_{kind}.json")
    if args.plot is None:
        args.plot = os.path.splitext(args.out)[0] + ".png"
    if "dense" not in args.methods:
        args.methods.insert(0, "dense")
    return args


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_retrieval_head(llm, spec: str) -> tuple[dict | None, str | None]:
    """Load the head named by ``spec`` into ``llm``; (description for the JSON, None) or (None, why not)."""
    from specontext.errors import SpecontextError
    from specontext.retrieval.head import find_head, head_paths, head_search_dirs

    path = find_head(llm.target) if spec == "auto" else spec
    if path is None:
        return None, (f"no retrieval head for this model was found (auto looked in {', '.join(head_search_dirs())}); "
                      "train one with specontext-distill or pass --retrieval-head PATH")
    try:
        llm.set_sparsity(sparsity="specontext", retrieval_head=path)
    except SpecontextError as exc:
        return None, f"cannot use retrieval head {path}: {exc}"
    head = llm.retrieval_head
    cfg = head.config
    weights, config = head_paths(path)
    info = {"spec": spec, "config_path": os.path.abspath(config), "weights_sha256": file_sha256(weights),
            "source": cfg.source, "quality": cfg.quality, "input_kind": cfg.input_kind,
            "hidden_layers": list(cfg.hidden_layers), "num_heads": cfg.num_heads, "num_kv_heads": cfg.num_kv_heads,
            "head_dim": cfg.head_dim, "trained_context_tokens": cfg.trained_context_tokens,
            "num_parameters": head.num_parameters()}
    return info, None


def sparsity_options(method: str, budget: int | None, args, measure_recall: bool):
    from specontext.retrieval.selection import SparsityOptions

    if method == "dense":
        return SparsityOptions(method="dense")
    method, fallback = split_method(method)
    if fallback is None:
        fallback = args.fallback_threshold if method == "specontext" else 0.0
    return SparsityOptions(method=method, budget_tokens=budget, sink_tokens=args.sink_tokens,
                           window_tokens=args.window_tokens, page_tokens=args.page_tokens,
                           fallback_threshold=fallback, measure_recall=measure_recall,
                           pin_fraction=args.pin_fraction, focus_window_tokens=args.focus_window_tokens,
                           focus_pool_tokens=args.focus_pool_tokens, focus_layers=args.focus_layers,
                           measure_selection_time=True)  # selection_s is reported (on CUDA this synchronises)


class Recorder:
    """Holds every measurement and rewrites ``OUT.partial`` after each one (atomically)."""

    def __init__(self, out: str, header: dict):
        self.out, self.partial = out, out + ".partial"
        self.data = {**header, "contexts": {}, "rows": []}
        self._rows: dict[tuple, dict] = {}

    @classmethod
    def load(cls, path: str) -> "Recorder":
        """A recorder over an earlier result (complete, or a run's ``.partial``)."""
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, json.JSONDecodeError) as exc:
            raise SystemExit(f"cannot read --from-json {path}: {exc}") from None
        rec = cls(path, {})
        rec.data = data
        rec._rows = {(r["context"], r["method"], r["budget_tokens"]): r for r in data.get("rows", [])}
        return rec

    def row(self, context: int, method: str, budget: int | None) -> dict:
        key = (context, method, budget)
        if key not in self._rows:
            self._rows[key] = {"context": context, "method": method, "budget_tokens": budget}
            self.data["rows"].append(self._rows[key])
        return self._rows[key]

    def get(self, context: int, method: str, budget: int | None) -> dict | None:
        return self._rows.get((context, method, budget))

    def context(self, context: int) -> dict:
        return self.data["contexts"].setdefault(str(context), {})

    def save(self, final: bool = False) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(self.out)), exist_ok=True)
        tmp = self.partial + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.data, f, indent=1)
            f.write("\n")
        os.replace(tmp, self.out if final else self.partial)
        if final and os.path.exists(self.partial):
            os.remove(self.partial)


def configurations(args, teacher_forced: bool = True) -> list[tuple[str, int | None]]:
    """The dense reference, then every (sparse method, budget) pair."""
    sparse = [m for m in args.methods if m != "dense" and (teacher_forced or m not in TEACHER_FORCED_ONLY)]
    return [("dense", None)] + [(m, b) for m in sparse for b in args.budgets]


def run_teacher_forced(llm, source, context: int, args, rec: Recorder, bar) -> None:
    import torch

    from specontext.errors import SpecontextError

    engine = llm.engine
    n = args.continuation_tokens
    prefix_len = min(context, engine.context_tokens - n - 1)
    ids = source.ids(prefix_len + n + 1, args.offset_tokens)
    prefix, continuation = ids[:prefix_len], ids[prefix_len:]
    bar.set_postfix_str(f"ctx {context}: prefill {prefix_len} tokens")
    t0 = time.perf_counter()
    state = engine.prefill_state(prefix, len(ids), focus_window_tokens=args.focus_window_tokens)
    info = rec.context(context)
    info["teacher_forced"] = {"prefix_tokens": prefix_len, "scored_tokens": n,
                              "prefill_s": round(time.perf_counter() - t0, 3)}
    target = torch.tensor(continuation[1:])
    dense_log_probs = None
    recorded = None  # per-step attention for the global oracle, recorded once per context
    for method, budget in configurations(args):
        bar.set_postfix_str(f"ctx {context}: teacher-forced {method} {budget or ''}")
        row = rec.row(context, method, budget)
        t0 = time.perf_counter()
        try:
            selector = None
            if method == global_oracle.METHOD:
                if recorded is None:
                    bar.set_postfix_str(f"ctx {context}: recording attention for {method}")
                    recorder = global_oracle.AttentionRecorder(engine.model.config.num_layers,
                                                               engine.model.config.num_kv_heads)
                    engine.teacher_forced(prefix, continuation, state=state, selector=recorder)
                    recorded = recorder.scores
                    info["teacher_forced"]["record_attention_s"] = round(time.perf_counter() - t0, 3)
                    t0 = time.perf_counter()
                sparsity_options("specontext", budget, args, True)  # the same budget checks as the head
                selector = global_oracle.ReplayedGlobalOracle(recorded, budget, args.sink_tokens, args.window_tokens,
                                                              engine.model.config.num_kv_heads)
            options = None if selector is not None else sparsity_options(method, budget, args, True)
            logits, selector = engine.teacher_forced(prefix, continuation, sparsity=options, state=state,
                                                     selector=selector)
        except SpecontextError as exc:  # a budget the method refuses: record it and go on
            row["teacher_forced"] = {"error": f"{type(exc).__name__}: {exc}"}
            bar.write(f"ctx {context} {method} {budget}: {exc}")
            bar.update(1)
            rec.save()
            continue
        log_probs = logits[1:].log_softmax(dim=-1)  # [N, V]: rows predicted by decode steps
        nll = float(-log_probs.gather(-1, target[:, None]).mean())
        if dense_log_probs is None:
            dense_log_probs = log_probs
        stats = selector.stats
        recall = stats.recall
        if method == "dense" or (recall is None and stats.sparse_steps == 0):
            recall = 1.0  # every step attended to everything
        kl = float((dense_log_probs.exp() * (dense_log_probs - log_probs)).sum(-1).mean())
        row["teacher_forced"] = {
            "recall": round(recall, 5),
            "top1_agreement": round(float((log_probs.argmax(-1) == dense_log_probs.argmax(-1)).float().mean()), 5),
            "perplexity": round(math.exp(nll), 4), "nll": round(nll, 5), "kl_from_dense": round(max(kl, 0.0), 6),
            "prefix_tokens": prefix_len, "scored_tokens": n, "sparse_steps": stats.sparse_steps,
            "dense_steps": stats.dense_steps, "fallback_steps": stats.fallback_steps,
            "selection_s": round(stats.selection_s, 4), "wall_s": round(time.perf_counter() - t0, 3)}
        if stats.confidence_sum:
            row["teacher_forced"]["mean_head_confidence"] = round(
                stats.confidence_sum / max(stats.sparse_steps + stats.fallback_steps, 1), 5)
        bar.update(1)
        rec.save()


def run_needle(llm, source, context: int, args, rec: Recorder, bar) -> None:
    import specontext
    from haystack import answer_passes, needle_prompt_ids
    from specontext.errors import SpecontextError

    engine = llm.engine
    new = args.needle_new_tokens
    target_tokens = min(context, engine.context_tokens - new)
    info = rec.context(context).setdefault("needle", {"target_prompt_tokens": target_tokens, "prompt_tokens": {},
                                                      "prefill_s": {}})
    gen = specontext.GenerationConfig(max_new_tokens=new, seed=args.seed)
    for depth in args.depths:
        ids = needle_prompt_ids(llm, source, args.needle, args.question, target_tokens, depth / 100,
                                args.offset_tokens)
        bar.set_postfix_str(f"ctx {context}: needle depth {depth}%: prefill {len(ids)} tokens")
        t0 = time.perf_counter()
        state = engine.prefill_state(ids, len(ids) + new, focus_window_tokens=args.focus_window_tokens)
        info["prompt_tokens"][str(depth)] = len(ids)
        info["prefill_s"][str(depth)] = round(time.perf_counter() - t0, 3)
        for method, budget in configurations(args, teacher_forced=False):
            bar.set_postfix_str(f"ctx {context}: needle depth {depth}% {method} {budget or ''}")
            row = rec.row(context, method, budget)
            needle = row.setdefault("needle", {"passes": {}, "answers": {}, "sparse_steps": 0, "dense_steps": 0,
                                               "fallback_steps": 0, "decode_steps": 0, "decode_s": 0.0,
                                               "selection_s": 0.0, "wall_s": 0.0})
            t0 = time.perf_counter()
            try:
                g = engine.generate(ids, gen, state=state, sparsity=sparsity_options(method, budget, args, False))
                for _ in g:
                    pass
            except SpecontextError as exc:
                needle["error"] = f"{type(exc).__name__}: {exc}"
                bar.update(1)
                continue
            result = g.result()
            sp = result.stats.sparsity
            needle["passes"][str(depth)] = answer_passes(result.text, args.keywords)
            needle["answers"][str(depth)] = result.text
            for key in ("sparse_steps", "dense_steps", "fallback_steps"):
                needle[key] += sp.get(key, 0)
            needle["decode_steps"] += result.stats.decode_steps
            needle["decode_s"] = round(needle["decode_s"] + result.stats.decode_s, 3)
            needle["selection_s"] = round(needle["selection_s"] + sp.get("selection_s", 0.0), 4)
            needle["wall_s"] = round(needle["wall_s"] + time.perf_counter() - t0, 3)
            passes = list(needle["passes"].values())
            needle["pass_rate"] = round(sum(passes) / len(passes), 4)
            bar.update(1)
            rec.save()


def value(row: dict | None, section: str, key: str):
    if row is None or section not in row:
        return None
    return row[section].get(key)


def ran_dense_only(row: dict | None, section: str) -> bool:
    """True when no step of the method ran sparse (its past never exceeded the budget)."""
    if row is None or section not in row or "error" in row[section]:
        return False
    s = row[section]
    return row["method"] != "dense" and s.get("sparse_steps", 0) == 0 and s.get("fallback_steps", 0) == 0


def tables(rec: Recorder, args) -> str:
    out = []
    methods = args.methods
    for key, section, title, fmt, _ in METRICS:
        if (section == "needle" and args.skip_needle) or (section == "teacher_forced" and args.skip_teacher_forced):
            continue
        out.append(f"\n{title}")
        out.append("| context | method | " + " | ".join(f"B={b}" for b in args.budgets) + " |")
        out.append("|---|---|" + "---|" * len(args.budgets))
        for context in args.contexts:
            for method in methods:
                cells = []
                for b in args.budgets:
                    row = rec.get(context, method, None if method == "dense" else b)
                    v = value(row, section, key)
                    cell = "n/a" if v is None else fmt.format(v)
                    cells.append(cell + ("=" if ran_dense_only(row, section) else ""))
                out.append(f"| {context} | {method} | " + " | ".join(cells) + " |")
    out.append("\n'=': no decode step ran sparse (the past never exceeded the budget), so the method equals dense.")
    for context in args.contexts:
        info = rec.data["contexts"].get(str(context), {})
        parts = []
        tf = info.get("teacher_forced")
        if tf:
            parts.append(f"teacher-forced prefix {tf['prefix_tokens']} tokens, {tf['scored_tokens']} scored")
        needle = info.get("needle")
        if needle and needle["prompt_tokens"]:
            lens = needle["prompt_tokens"].values()
            parts.append(f"needle prompts {min(lens)}-{max(lens)} tokens")
        if parts:
            out.append(f"context {context}: " + "; ".join(parts))
    return "\n".join(out)


def check_targets(rec: Recorder, args) -> list[dict]:
    """The issue's targets for the shipped head, as (statement, measured, ok) entries."""
    checks = []
    if "specontext" not in args.methods:
        return checks

    def add(statement, measured, ok):
        checks.append({"target": statement, "measured": measured, "ok": bool(ok)})

    row = rec.get(8192, "specontext", 1024)
    dense = rec.get(8192, "dense", None)
    if row is not None:
        for key, limit in (("recall", 0.90), ("top1_agreement", 0.97)):
            v = value(row, "teacher_forced", key)
            if v is not None:
                add(f"8k, B=1024: {key} >= {limit}", v, v >= limit)
        v, d = value(row, "needle", "pass_rate"), value(dense, "needle", "pass_rate")
        if v is not None and d is not None:
            add("8k, B=1024: needle pass rate equal to dense", f"{v} vs dense {d}", v >= d)
    for context in args.contexts:
        for b in args.budgets:
            ours = rec.get(context, "specontext", b)
            for key, section, _, _, larger in METRICS:
                mine = value(ours, section, key)
                if mine is None or ran_dense_only(ours, section):
                    continue
                for peer, strict in (("streaming", section != "needle"), ("quest", False)):
                    theirs = value(rec.get(context, peer, b), section, key)
                    if theirs is None:
                        continue
                    if larger:
                        ok = mine > theirs if strict else mine >= theirs
                    else:
                        ok = mine < theirs if strict else mine <= theirs
                    relation = ("better than" if strict else "at least equal to")
                    add(f"ctx {context}, B={b}: {key} {relation} {peer}", f"{mine} vs {theirs}", ok)
    return checks


def plot(rec: Recorder, args) -> str | None:
    """Draw accuracy against budget (one subplot per metric, one figure row per context)."""
    try:
        import matplotlib
    except ImportError:
        return "matplotlib is not installed, so no plot was drawn (pip install '.[bench]')"
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m for m in METRICS if not ((m[1] == "needle" and args.skip_needle)
                                          or (m[1] == "teacher_forced" and args.skip_teacher_forced))]
    fig, axes = plt.subplots(len(args.contexts), len(metrics), figsize=(4.2 * len(metrics), 3.3 * len(args.contexts)),
                             squeeze=False)
    # distinct markers and sizes, so lines that coincide (all at pass rate 1.0, say) stay visible
    styles = {"specontext": dict(color="tab:red", marker="o", markersize=5, zorder=5),
              "oracle": dict(color="tab:green", marker="s", markersize=10, fillstyle="none", linestyle=":"),
              "quest": dict(color="tab:blue", marker="^", markersize=8, fillstyle="none", linestyle="-."),
              "streaming": dict(color="tab:orange", marker="D", markersize=7, fillstyle="none", linestyle="--"),
              "oracle-global": dict(color="tab:purple", marker="v", markersize=7, fillstyle="none", linestyle=":")}
    for r, context in enumerate(args.contexts):
        for c, (key, section, title, _, _) in enumerate(metrics):
            ax = axes[r][c]
            d = value(rec.get(context, "dense", None), section, key)
            if d is not None:
                ax.axhline(d, color="black", linestyle="--", linewidth=1, label="dense")
            for method in args.methods:
                if method == "dense":
                    continue
                points = [(b, value(rec.get(context, method, b), section, key)) for b in args.budgets]
                points = [(b, v) for b, v in points if v is not None]
                if points:
                    ax.plot(*zip(*points), label=method, **styles.get(method, dict(marker="o")))
            ax.set_xscale("log", base=2)
            ax.set_xticks(args.budgets)
            ax.set_xticklabels([str(b) for b in args.budgets])
            ax.set_title(f"{title.split(' (')[0]}, ctx {context}", fontsize=9)
            ax.set_xlabel("budget (tokens per KV head)", fontsize=8)
            ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=len(labels), fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / fig.get_figheight()))
    os.makedirs(os.path.dirname(os.path.abspath(args.plot)), exist_ok=True)
    fig.savefig(args.plot, dpi=110)
    plt.close(fig)
    return None


def report(rec: Recorder, args) -> None:
    """Print the tables, the target checks and the head used; draw the plot."""
    print(tables(rec, args))
    if rec.data.get("targets"):
        print("\ntargets (specontext):")
        for t in rec.data["targets"]:
            print(f"  [{'ok' if t['ok'] else 'MISSED'}] {t['target']}: {t['measured']}")
    head = rec.data.get("retrieval_head") or {}
    if "skipped" in head:
        print(f"\nspecontext was not measured: {head['skipped']}")
    elif head:
        print(f"\nretrieval head: {head['config_path']} (source {head['source']}, "
              f"quality {json.dumps(head['quality'])})")
    if args.plot.lower() != "none":
        problem = plot(rec, args)
        print(problem or f"plot: {args.plot}")


def replay(args) -> int:
    """--from-json: report an earlier result with the settings it was measured with."""
    rec = Recorder.load(args.from_json)
    settings = rec.data.get("settings", {})
    for key in ("contexts", "budgets", "methods", "skip_needle", "skip_teacher_forced"):
        setattr(args, key, settings.get(key, getattr(args, key)))
    rec.data["targets"] = check_targets(rec, args)
    report(rec, args)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.from_json:
        return replay(args)
    import torch
    from tqdm import tqdm

    import specontext
    from haystack import TokenSource, read_text
    from machine import describe

    torch.manual_seed(args.seed)
    text, text_label = read_text(args.text)
    t_start = time.perf_counter()
    llm = specontext.load(args.model, device=args.device, dtype=args.dtype, threads=args.threads)
    head_info, head_note = (None, None)
    if any(split_method(m)[0] == "specontext" for m in args.methods):
        head_info, head_note = load_retrieval_head(llm, args.retrieval_head)
        if head_info is None and args.retrieval_head != "auto":
            print(f"error: {head_note}", file=sys.stderr)  # a head named explicitly must load
            return 1
        if head_info is None:
            print(f"note: skipping the retrieval head's methods: {head_note}", file=sys.stderr)
            args.methods = [m for m in args.methods if split_method(m)[0] != "specontext"]
    source = TokenSource(llm.tokenizer, text)
    settings = {k: v for k, v in vars(args).items() if k not in ("keywords", "from_json")}
    settings.update(text=text_label, text_tokens=source.text_tokens, model=llm.path,
                    model_context_tokens=llm.engine.context_tokens, dtype=str(llm.model.dtype))
    rec = Recorder(args.out, {"benchmark": "accuracy of sparse decode against dense", "machine": describe(),
                              "settings": settings, "retrieval_head": head_info or {"skipped": head_note}})

    total = len(args.contexts) * ((0 if args.skip_teacher_forced else len(configurations(args)))
                                  + (0 if args.skip_needle else len(args.depths) * len(configurations(args, False))))
    with tqdm(total=total, desc="accuracy", unit="run", file=sys.stderr, dynamic_ncols=True) as bar:
        for context in args.contexts:
            t0 = time.perf_counter()
            if not args.skip_teacher_forced:
                run_teacher_forced(llm, source, context, args, rec, bar)
            if not args.skip_needle:
                run_needle(llm, source, context, args, rec, bar)
            rec.context(context)["wall_s"] = round(time.perf_counter() - t0, 2)
            rec.save()
    rec.data["settings"]["text_repeats"] = source.repeats
    rec.data["targets"] = check_targets(rec, args)
    rec.data["wall_s"] = round(time.perf_counter() - t_start, 2)
    rec.save(final=True)
    report(rec, args)
    print(f"results: {args.out} ({rec.data['wall_s'] / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
