"""Which focus settle the pins: a study of query-focused pinning on the TUNING needles only.

    python bench_edge/focus_study.py                          # 4k and 8k, both haystacks (~1 h on 2 cores)
    python bench_edge/focus_study.py --contexts 4096 --depths 50 --needles 2 --out /tmp/study.json

Every instance (haystack, tuning needle, depth, context) is prefilled once, with several focus
windows W measured together; each variant then decodes greedily from that state. A variant is
the pin share of the budget, W, the max-pool width, how each KV group's query heads are reduced
(max or mean), and which layers are averaged (all, the first half, the second half). For each
variant and budget we record whether the answer holds the needle's keywords, and the needle
coverage: the fraction of the needle sentence's tokens that are pinned (mean over KV heads), a
smoother signal than pass/fail, and cheap: only the ``--decode`` variants generate, the others
report coverage alone. Dense, the head alone (pin share 0), snapkv and quest run as references on
the same states.

Defaults for ``--sparsity specontext`` are chosen from this file's output; the evaluation needles
(needles.EVAL_NEEDLES, first tokens of each haystack) are never used here.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import haystack  # noqa: E402
import machine  # noqa: E402
import needles  # noqa: E402


@dataclass(frozen=True)
class Variant:
    name: str
    pin_fraction: float = 0.25
    window: int = 32
    pool: int = 7
    reduce: str = "max"
    layers: str = "all"  # all, early (first half), late (second half)


BASE = Variant("base")
VARIANTS = (
    BASE,
    Variant("f0.125", pin_fraction=0.125), Variant("f0.5", pin_fraction=0.5), Variant("f0.75", pin_fraction=0.75),
    Variant("W8", window=8), Variant("W16", window=16), Variant("W64", window=64),
    Variant("pool1", pool=1), Variant("pool3", pool=3), Variant("pool15", pool=15),
    Variant("mean", reduce="mean"), Variant("early", layers="early"), Variant("late", layers="late"),
    Variant("f0.5-pool15", pin_fraction=0.5, pool=15), Variant("f0.5-W64", pin_fraction=0.5, window=64),
    Variant("f0.75-pool15", pin_fraction=0.75, pool=15), Variant("f0.75-late", pin_fraction=0.75, layers="late"),
    Variant("f0.75-W64", pin_fraction=0.75, window=64), Variant("f0.5-late", pin_fraction=0.5, layers="late"),
    Variant("f0.5-late-pool15", pin_fraction=0.5, layers="late", pool=15),
    Variant("f0.5-late-pool11", pin_fraction=0.5, layers="late", pool=11),
)
REFERENCES = ("dense", "head", "snapkv", "quest")


class Fanout:
    """Several QueryFocus objects filled by one prefill (the engine sees one focus)."""

    def __init__(self, foci):
        self.foci = foci

    def begin_chunk(self, input_lens):
        return any([f.begin_chunk(input_lens) for f in self.foci])  # a list: every focus must advance

    def observe(self, layer, queries, keys, mask):
        for f in self.foci:
            if f._rows:
                f.observe(layer, queries, keys, mask)


class LayerSubset:
    """A per-layer focus seen through a subset of its layers (what selectors call: ``pins``)."""

    def __init__(self, focus, layers: list[int]):
        self.focus, self.layers = focus, layers
        self.window_tokens, self.keep, self.prompt_lens = focus.window_tokens, focus.keep, focus.prompt_lens
        self.num_layers, self.capacity_tokens = focus.num_layers, focus.capacity_tokens

    def pins(self, num_pins, pool_tokens=1, sink_tokens=0, layer=None):
        from specontext.retrieval.focus import pins_from_scores

        if layer is not None:
            return self.focus.pins(num_pins, pool_tokens, sink_tokens, layer=layer)
        P = max(self.prompt_lens)
        scores = self.focus.by_layer[self.layers, :, :, :P].mean(0)
        return pins_from_scores(scores, self.prompt_lens, num_pins, pool_tokens, sink_tokens)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contexts", default="4096,8192")
    p.add_argument("--budgets", default="512,1024")
    p.add_argument("--depths", default=None, help="percent; default 20,50,80 at 4k and below, 30,70 above")
    p.add_argument("--needles", type=int, default=len(needles.DEV_NEEDLES), help="use the first N tuning needles")
    p.add_argument("--haystacks", default=",".join(needles.HAYSTACKS))
    p.add_argument("--new-tokens", type=int, default=24)
    p.add_argument("--analyze-foci", metavar="DIR", help="measure nothing: analyse --save-foci files (layers, windows)")
    p.add_argument("--save-foci", metavar="DIR", help="also save each instance's per-layer foci (safetensors) there")
    p.add_argument("--references", default="quest", help="quest, or none: also decode Quest (slow on CPU)")
    p.add_argument("--decode", default="base,f0.5,f0.75,late",
                   help="variants that also decode (pass rates); the others report needle coverage only")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--out", default=os.path.join(HERE, "results", "focus_study_cpu.json"))
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.analyze_foci:
        result = analyze_foci(args.analyze_foci)
        for k, v in result.items():
            if isinstance(v, dict):
                for name, cov in sorted(v.items(), key=lambda kv: -kv[1])[:25]:
                    print(f"  {name:40s} {cov}")
            else:
                print(k, v)
        return 0
    import torch

    import specontext
    from specontext.engine import PrefillState
    from specontext.retrieval.focus import QueryFocus, pinned_mask
    from specontext.retrieval.selection import SparsityOptions
    from specontext.settings import GenerationConfig

    torch.set_num_threads(args.threads)
    llm = specontext.load(sparsity="specontext")
    engine, cfg = llm.engine, llm.config
    L = cfg.num_layers
    subsets = {"all": list(range(L)), "early": list(range(L // 2)), "late": list(range(L // 2, L))}
    layer_specs = {"all": "all", "early": f"0-{L // 2 - 1}", "late": "late"}
    windows = sorted({v.window for v in VARIANTS})
    contexts = [int(c) for c in args.contexts.split(",")]
    budgets = [int(b) for b in args.budgets.split(",")]
    gen = GenerationConfig(max_new_tokens=args.new_tokens)
    decode = set(args.decode.split(","))
    refs = set(args.references.split(","))
    out = {"machine": machine.describe(), "split": "tuning needles (needles.DEV_NEEDLES), haystacks from token "
           f"{needles.DEV_OFFSET_TOKENS}", "variants": [v.__dict__ for v in VARIANTS], "instances": []}
    if os.path.exists(args.out + ".partial"):
        out["instances"] = json.load(open(args.out + ".partial"))["instances"]
    done = {(r["context"], r["haystack"], r["needle"], r["depth"]) for r in out["instances"]}
    for context in contexts:
        depths = [int(d) for d in args.depths.split(",")] if args.depths else ([20, 50, 80] if context <= 4096
                                                                              else [30, 70])
        for hay in args.haystacks.split(","):
            text, _ = needles.haystack_text(hay)
            source = haystack.TokenSource(llm.tokenizer, text)
            for ni, needle in enumerate(needles.DEV_NEEDLES[:args.needles]):
                for depth in depths:
                    key = (context, hay, ni, depth)
                    if key in done:
                        continue
                    t0 = time.perf_counter()
                    ids = haystack.needle_prompt_ids(llm, source, needle.sentence, needle.question, context,
                                                     depth / 100, offset_tokens=needles.DEV_OFFSET_TOKENS)
                    span = needles.needle_span(llm.tokenizer, ids, needle.sentence)
                    cap = len(ids) + args.new_tokens + 1
                    cache = engine.new_cache(cap)
                    head_sel = engine.new_selector(cap, sparsity=SparsityOptions(
                        method="specontext", budget_tokens=cap + 1, sink_tokens=0, window_tokens=0, pin_fraction=0))
                    foci = {(w, r): QueryFocus([len(ids)], L, cfg.num_heads, cfg.num_kv_heads, cap, w, llm.model.device,
                                               keep="layers", head_reduce=r)
                            for w in windows for r in ("max", "mean")}
                    logits = engine.prefill(ids, cache, selector=head_sel, focus=Fanout(list(foci.values())))
                    state = PrefillState(list(ids), cache, logits, head_sel)
                    if args.save_foci:  # per-layer foci and the needle's span, for offline aggregation studies
                        from safetensors.torch import save_file

                        os.makedirs(args.save_foci, exist_ok=True)
                        save_file({f"W{w}_{r}": f.by_layer[:, 0, :, :len(ids)].contiguous() for (w, r), f in foci.items()},
                                  os.path.join(args.save_foci, f"{context}_{hay}_{ni}_{depth}.safetensors"),
                                  metadata={"span": json.dumps(span), "prompt_tokens": str(len(ids))})
                    prefill_s = time.perf_counter() - t0
                    row = {"context": context, "haystack": hay, "needle": ni, "depth": depth, "prompt_tokens": len(ids),
                           "needle_span": span, "prefill_s": round(prefill_s, 2), "results": {}}

                    def run(name, opts, focus=None):
                        state.focus = focus
                        g = engine.generate(ids, gen, state=state, sparsity=opts)
                        for _ in g:
                            pass
                        text = g.result().text
                        res = {"pass": haystack.answer_passes(text, list(needle.keywords)), "answer": text[:120]}
                        sel = g.selector
                        mask = getattr(sel, "pin_mask", None)
                        if mask is not None and span is not None:
                            res["coverage"] = round(float(mask[0, :, span[0]:span[1]].float().mean()), 3)
                        row["results"][name] = res

                    run("dense", SparsityOptions())
                    for B in budgets:
                        common = dict(budget_tokens=B, sink_tokens=4, window_tokens=60)
                        run(f"head@{B}", SparsityOptions(method="specontext", pin_fraction=0, **common))
                        if "quest" in refs:
                            run(f"quest@{B}", SparsityOptions(method="quest", budget_tokens=B))
                        run(f"snapkv@{B}", SparsityOptions(method="snapkv", **common), foci[(32, "max")])
                        for v in VARIANTS:
                            focus = LayerSubset(foci[(v.window, v.reduce)], subsets[v.layers])
                            if v.name in decode:  # the selector weighs the layers itself (focus_layers)
                                opts = SparsityOptions(method="specontext", pin_fraction=v.pin_fraction,
                                                       focus_window_tokens=v.window, focus_pool_tokens=v.pool,
                                                       focus_layers=layer_specs[v.layers], **common)
                                run(f"{v.name}@{B}", opts, foci[(v.window, v.reduce)])
                            elif span is not None:  # coverage only: the pins, no decode
                                pos, ok = focus.pins(round(v.pin_fraction * B), v.pool, 4)
                                mask = pinned_mask(pos, ok, cap)
                                row["results"][f"{v.name}@{B}"] = {
                                    "coverage": round(float(mask[0, :, span[0]:span[1]].float().mean()), 3)}
                    row["total_s"] = round(time.perf_counter() - t0, 1)
                    out["instances"].append(row)
                    with open(args.out + ".partial", "w") as f:
                        json.dump(out, f, indent=1)
                    passes = {k: int(v["pass"]) for k, v in row["results"].items() if "pass" in v}
                    print(f"{context} {hay} n{ni} d{depth}: dense={passes['dense']} "
                          + " ".join(f"{k}={v}" for k, v in passes.items() if k != "dense"), flush=True)
    summarize(out)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    os.remove(args.out + ".partial")
    return 0


def summarize(out: dict) -> None:
    """Per context and variant: passes, passes where dense passed, and mean needle coverage."""
    summary = {}
    for row in out["instances"]:
        for name, res in row["results"].items():
            s = summary.setdefault(str(row["context"]), {}).setdefault(name, {"n": 0, "pass": 0, "pass_dense_ok": 0,
                                                                              "n_dense_ok": 0, "coverage": []})
            s["n"] += 1
            if "pass" in res:
                s["pass"] += int(res["pass"])
                if row["results"]["dense"]["pass"]:
                    s["n_dense_ok"] += 1
                    s["pass_dense_ok"] += int(res["pass"])
            if "coverage" in res:
                s["coverage"].append(res["coverage"])
    for per in summary.values():
        for s in per.values():
            cov = s.pop("coverage")
            s["mean_coverage"] = round(sum(cov) / len(cov), 3) if cov else None
    out["summary"] = summary
    for context, per in summary.items():
        print(f"== {context}")
        for name, s in per.items():
            print(f"  {name:22s} pass {s['pass']}/{s['n']}  (dense ok: {s['pass_dense_ok']}/{s['n_dense_ok']})"
                  f"  coverage {s['mean_coverage']}")



def analyze_foci(folder: str, budgets=(512, 1024), sink_tokens: int = 4) -> dict:
    """Offline, from ``--save-foci`` files: per layer, the share of the focus that falls on the needle,
    and the needle coverage of pins made from layer subsets chosen by that share (QRHead-style
    calibration), checked across haystacks (calibrated on one, measured on the other)."""
    import glob

    import torch
    from safetensors import safe_open

    from specontext.retrieval.focus import pinned_mask, pins_from_scores

    rows = []
    for path in sorted(glob.glob(os.path.join(folder, "*.safetensors"))):
        with safe_open(path, "pt") as f:
            meta = f.metadata()
            span = json.loads(meta["span"])
            if span is None:
                continue
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        name = os.path.basename(path)[:-len(".safetensors")]
        rows.append({"name": name, "haystack": name.split("_")[1], "span": span, "foci": tensors})
    key = "W32_max"
    out = {"instances": len(rows)}
    # per layer: mean over instances and KV groups of the focus mass on the needle (past the sinks)
    shares = []
    for r in rows:
        foc = r["foci"][key]  # [L, G, P]
        s0, s1 = r["span"]
        shares.append(foc[:, :, s0:s1].sum(-1) / foc[:, :, sink_tokens:].sum(-1).clamp_min(1e-9))  # [L, G]
    share = torch.stack(shares).mean(0)  # [L, G]
    out["needle_share_per_layer"] = [round(float(x), 4) for x in share.mean(1)]

    def coverage(r, layer_weights, window_key, fraction, budget, pool=7):
        foc = r["foci"][window_key]  # [L, G, P]
        w = layer_weights.to(foc.dtype)
        scores = (foc * w[:, :, None]).sum(0, keepdim=True) / w.sum(0)[None, :, None].clamp_min(1e-9)
        P = foc.shape[-1]
        pos, ok = pins_from_scores(scores, [P], round(fraction * budget), pool, sink_tokens)
        mask = pinned_mask(pos, ok, P)
        s0, s1 = r["span"]
        return float(mask[0, :, s0:s1].float().mean())

    L, G = share.shape
    strategies = {"all": lambda sh: torch.ones(L, G), "late": lambda sh: (torch.arange(L) >= L // 2)[:, None].expand(L, G).float()}
    for k in (4, 8, 12):
        strategies[f"top{k}-layers"] = lambda sh, k=k: torch.zeros(L).index_fill_(0, sh.mean(1).topk(k).indices, 1.0)[:, None].expand(L, G).clone()
        strategies[f"top{k}-per-group"] = lambda sh, k=k: torch.zeros(L, G).scatter_(0, sh.topk(k, dim=0).indices, 1.0)
    strategies["share-weighted"] = lambda sh: sh
    results = {}
    for hay_cal in sorted({r["haystack"] for r in rows}):
        cal = [r for r in rows if r["haystack"] == hay_cal]
        test = [r for r in rows if r["haystack"] != hay_cal] or cal
        sh = torch.stack([r["foci"][key][:, :, r["span"][0]:r["span"][1]].sum(-1)
                          / r["foci"][key][:, :, sink_tokens:].sum(-1).clamp_min(1e-9) for r in cal]).mean(0)
        for sname, make in strategies.items():
            weights = make(sh)
            for window_key in ("W16_max", "W32_max"):
                for fraction in (0.25, 0.5):
                    for budget in budgets:
                        cov = sum(coverage(r, weights, window_key, fraction, budget) for r in test) / len(test)
                        results.setdefault(f"{sname}/{window_key}/f{fraction}@{budget}", []).append(round(cov, 3))
    out["coverage_calibrated_on_other_haystack"] = {k: round(sum(v) / len(v), 3) for k, v in results.items()}
    return out


if __name__ == "__main__":
    sys.exit(main())
