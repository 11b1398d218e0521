"""What offloading costs in transfers, and how fast the host side moves KV rows.

    python bench_edge/bench_offload.py                        # both parts, CPU (about 15 min on 2 cores)
    python bench_edge/bench_offload.py --skip-gather --budgets 1024 --steps 64 --out /tmp/o.json   # a quick trial

Part 1, transfers (elastic loading and the slot pool). For each text (the essays, and a second
text of another kind: by default Python standard-library source code) the default model reads a
prefix of --context tokens (prefilled dense) and then decodes --steps tokens of the text's own
continuation (teacher-forced, so every budget sees the same tokens) under ``specontext``
selection at each budget B. Every step's index sets [KV heads, B] are recorded, then replayed:

* overlap: |S_now & S_last| / B per KV head, mean over steps (the paper reports > 0.8);
* fetched tokens per step through the slot pool (kv/slots.py) with P = f * B slots per KV head
  for each --pool-factors f, against a full reload of B tokens per step. f = 1 is the paper's
  elastic loading (exactly S_now - S_last); f > 1 keeps recently dropped tokens resident.
  Targets at B 1024-2048: >= 5x fewer bytes than a full reload with P = B, >= 10x with 1.25 B.
* bytes per step: tokens x 2 (K, V) x head_dim x dtype bytes x offloaded layers (--offload-layers
  of the model's layers, float16 as on a GPU).
* the same with block-granular selection (--block-tokens N consecutive tokens scored and moved
  as one; the newest block is refetched every step, since it grows), with the recall each
  granularity reaches at the same budget: the trade-off against part 2's throughput for
  256-byte rows versus whole blocks.

One configuration is also run through the real OffloadedKVCache (worker-thread pipeline on CPU),
and its counted fetches must equal the replay's.

Part 1b, the pipeline on CPU: decode step time at --context with B = --pipeline-budget for the
resident sparse cache, and with two thirds of the layers offloaded (P = 1.25 B), copies on the
worker thread (async) and inline; the fraction of the added copy time that the worker hides.

Part 2, host gather throughput (the C path that fills slots from host memory on a CPU, and the
worker that writes back): gathering --rows random rows of --row-bytes (256: one token of one KV
head at head_dim 128 in float16) out of a large host buffer, with the native library
(spc_gather_rows, threads 1, 2 and auto), torch.index_select, and a plain contiguous copy of the
same number of bytes (the memcpy ceiling); also whole blocks of --block-tokens rows. Target: the
native gather reaches >= 70% of memcpy bandwidth. Medians of --repeats.

Writes JSON with the machine description to --out.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import sysconfig
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

STDLIB_FILES = ("typing.py", "argparse.py", "inspect.py", "subprocess.py", "dataclasses.py", "pathlib.py")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--texts", default="essays,python-stdlib",
                   help="comma-separated: essays, python-stdlib (source files of this Python), or UTF-8 file paths")
    p.add_argument("--context", type=int, default=8192, help="prefix tokens (capped to fit the model)")
    p.add_argument("--steps", type=int, default=256, help="decode steps recorded per text and budget")
    p.add_argument("--budgets", default="512,1024,2048", help="comma-separated budgets")
    p.add_argument("--pool-factors", default="1,1.125,1.25,1.5,2", help="slot pool sizes as multiples of B")
    p.add_argument("--offload-layers", type=int, default=0, help="layers counted as offloaded (0: all)")
    p.add_argument("--retrieval-head", default="auto")
    p.add_argument("--rows", type=int, default=1 << 15, help="rows per gather in part 2")
    p.add_argument("--row-bytes", type=int, default=256)
    p.add_argument("--block-tokens", type=int, default=16, help="rows per block in part 2's block gather")
    p.add_argument("--host-mib", type=int, default=1024, help="size of the host buffer gathered from, MiB")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--pipeline-steps", type=int, default=48, help="decode steps per pipeline timing run")
    p.add_argument("--pipeline-budget", type=int, default=1024)
    p.add_argument("--pipeline-repeats", type=int, default=3)
    p.add_argument("--skip-transfers", action="store_true")
    p.add_argument("--skip-pipeline", action="store_true")
    p.add_argument("--skip-gather", action="store_true")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--model", default=None)
    p.add_argument("--out", default=os.path.join(HERE, "results", "offload_cpu.json"))
    args = p.parse_args(argv)
    try:
        args.budgets = [int(b) for b in args.budgets.split(",")]
        args.pool_factors = [float(f) for f in args.pool_factors.split(",")]
    except ValueError:
        p.error("--budgets are integers and --pool-factors numbers, comma-separated")
    if min(args.pool_factors) < 1 or min(args.budgets) < 1 or args.steps < 2:
        p.error("pool factors must be >= 1, budgets >= 1, steps >= 2")
    return args


def load_text(name: str) -> tuple[str, str]:
    if name == "essays":
        from haystack import read_text

        return read_text(None)
    if name == "python-stdlib":
        root = sysconfig.get_paths()["stdlib"]
        parts = []
        for f in STDLIB_FILES:
            with open(os.path.join(root, f), encoding="utf-8") as fh:
                parts.append(fh.read())
        return "\n\n".join(parts), f"python {sys.version.split()[0]} stdlib: {', '.join(STDLIB_FILES)}"
    from haystack import read_text

    return read_text(name)


def record_selections(llm, ids: list[int], prefix_len: int, budget: int, block_tokens: int = 1) -> tuple[list, float]:
    """Teacher-forced specontext decode; returns (each sparse step's past indices [G, K] and valid
    mask [G, K], on the CPU; the attention recall measured on the way)."""
    from specontext.retrieval.selection import SparsityOptions

    engine = llm.engine
    opts = SparsityOptions(method="specontext", budget_tokens=budget, sink_tokens=engine.sparsity.sink_tokens,
                           window_tokens=engine.sparsity.window_tokens, block_tokens=block_tokens,
                           measure_recall=True)
    recorded = []

    def record(sel, plan):
        if sel is not None:
            valid = None if sel.valid is None else sel.valid[0, :, :-1].cpu()
            recorded.append((sel.indices[0, :, :-1].cpu(), valid))
    engine.on_select = record
    try:
        _, selector = engine.teacher_forced(ids[:prefix_len], ids[prefix_len:], sparsity=opts)
    finally:
        engine.on_select = None
    return recorded, selector.stats.recall


def replay(sets: list, budget: int, factor: float, capacity: int, block_tokens: int = 1) -> dict:
    """Run recorded selections through a slot pool of ``factor * budget`` tokens per KV head
    (whole blocks of ``block_tokens``, the newest block refetched each step as the cache does)."""
    from specontext.kv.slots import SlotPool

    N = block_tokens
    G = sets[0][0].shape[0]
    pool = SlotPool(G, -(-capacity // N), math.ceil(factor * budget / N), "cpu")
    fetched, selected = [], []
    for indices, valid in sets:
        if valid is None:
            valid = torch_ones_like_bool(indices)
        if N > 1:
            units = indices.view(G, -1, N)[..., 0] // N
            unit_valid = valid.view(G, -1, N).any(-1)
            newest = int(indices[valid].max()) // N
            pool.forget_from(newest)
        else:
            units, unit_valid = indices, valid
        fetched.append(int(pool.assign(units, unit_valid).fetched) * N)
        selected.append(int(valid.sum()))
    steady = fetched[1:]  # the first step fills the pool from empty
    return {"pool_factor": factor, "pool_slots": pool.pool_slots * N, "total_fetched_tokens": sum(fetched),
            "fetched_tokens_per_step": round(statistics.mean(steady), 2),
            "full_reload_tokens_per_step": round(statistics.mean(selected[1:]), 2),
            "reduction_vs_full_reload": round(statistics.mean(selected[1:]) / max(statistics.mean(steady), 1e-9), 2),
            "first_step_fetched_tokens": fetched[0]}


def torch_ones_like_bool(t):
    import torch

    return torch.ones_like(t, dtype=torch.bool)


def overlap(sets: list) -> float:
    """Mean over steps and KV heads of |S_now & S_last| / |S_now| (valid entries only)."""
    values = []
    for (a, va), (b, vb) in zip(sets, sets[1:]):
        for g in range(a.shape[0]):
            sa = set(a[g][va[g]].tolist() if va is not None else a[g].tolist())
            sb = set(b[g][vb[g]].tolist() if vb is not None else b[g].tolist())
            values.append(len(sa & sb) / len(sb))
    return statistics.mean(values)


def run_transfers(llm, args, out: dict) -> None:
    from tqdm import tqdm

    from haystack import TokenSource

    cfg = llm.model.config
    offloaded = args.offload_layers or cfg.num_layers
    bytes_per_token = 2 * cfg.head_dim * 2 * offloaded  # K and V, float16, every offloaded layer
    out["transfers"] = {"offloaded_layers": offloaded, "bytes_per_token_all_offloaded_layers_fp16": bytes_per_token,
                        "texts": {}}
    names = [t for t in args.texts.split(",") if t]
    with tqdm(total=2 * len(names) * len(args.budgets), desc="transfers", unit="run", file=sys.stderr) as bar:
        for name in names:
            text, label = load_text(name)
            source = TokenSource(llm.tokenizer, text)
            prefix_len = min(args.context, llm.engine.context_tokens - args.steps - 2)
            ids = source.ids(prefix_len + args.steps + 1)
            entry = out["transfers"]["texts"].setdefault(name, {"label": label, "text_tokens": source.text_tokens,
                                                               "prefix_tokens": prefix_len, "budgets": {}})
            for budget in args.budgets:
                for block in (1, args.block_tokens):
                    bar.set_postfix_str(f"{name} B={budget} block {block}")
                    sets, recall = record_selections(llm, ids, prefix_len, budget, block)
                    curve = [replay(sets, budget, f, prefix_len + args.steps + 1, block) for f in args.pool_factors]
                    for c in curve:
                        c["fetched_bytes_per_step"] = round(c["fetched_tokens_per_step"] * bytes_per_token)
                        c["full_reload_bytes_per_step"] = round(c["full_reload_tokens_per_step"] * bytes_per_token)
                    key = str(budget) if block == 1 else f"{budget}/block{block}"
                    entry["budgets"][key] = {"block_tokens": block, "steps": len(sets), "recall": round(recall, 4),
                                             "adjacent_overlap": round(overlap(sets), 4), "pool_curve": curve}
                    bar.update(1)
                    save(out, args.out, partial=True)


def check_cache_counts(llm, args, out: dict) -> None:
    """The real offloaded cache (half the layers offloaded, P = 1.25 B) must count the same fetches
    as the replay of the same selections, and give the resident cache's logits exactly."""
    import specontext
    from haystack import TokenSource

    budget, prefix_len, steps = 512, 1024, 32
    ids = TokenSource(llm.tokenizer, load_text("essays")[0]).ids(prefix_len + steps + 1)
    prefix, continuation = ids[:prefix_len], ids[prefix_len:]
    kw = dict(model=llm.path, device="cpu", sparsity="specontext", budget_tokens=budget,
              retrieval_head=args.retrieval_head)
    resident = specontext.load(**kw)
    sets, _ = record_selections(resident, ids, prefix_len, budget)
    expected = replay(sets, budget, 1.25, len(ids))
    logits_resident, _ = resident.engine.teacher_forced(prefix, continuation)
    offloaded = specontext.load(**kw, offload_layers=llm.model.config.num_layers // 2, slot_pool=1.25)
    state = offloaded.engine.prefill_state(prefix, len(ids))
    logits_offloaded, _ = offloaded.engine.teacher_forced(prefix, continuation, state=state)
    stats = state.cache.transfer_stats()
    out["cache_check"] = {"budget": budget, "pool_factor": 1.25, "steps": len(sets),
                          "offloaded_layers": stats["offloaded_layers"],
                          "cache_fetched_tokens": stats["fetched_tokens"],
                          "replay_fetched_tokens": expected["total_fetched_tokens"],
                          "logits_identical_to_resident": bool(torch_equal(logits_offloaded, logits_resident))}


def torch_equal(a, b) -> bool:
    import torch

    return torch.equal(a, b)


def run_pipeline(llm, args, out: dict) -> None:
    """Decode time with offloaded layers (async worker pipeline vs copies inline) against the
    device-resident sparse cache, from the same prefilled prompt; the copy work per step comes
    from the copy engine's own clock."""
    import specontext
    from haystack import TokenSource

    from specontext.settings import GenerationConfig

    cfg = llm.model.config
    prefix_len = min(args.context, llm.engine.context_tokens - args.pipeline_steps - 2)
    ids = TokenSource(llm.tokenizer, load_text("essays")[0]).ids(prefix_len)
    gen = GenerationConfig(max_new_tokens=args.pipeline_steps, ignore_eos=True)
    rows = []
    offload = args.offload_layers or cfg.num_layers * 2 // 3
    for name, extra in (("resident", {}),
                        ("offloaded, async", dict(offload_layers=offload, slot_pool=1.25)),
                        ("offloaded, inline copies", dict(offload_layers=offload, slot_pool=1.25,
                                                          async_prefetch=False))):
        engine = specontext.load(llm.path, device="cpu", sparsity="specontext", budget_tokens=args.pipeline_budget,
                                 retrieval_head=args.retrieval_head, threads=args.threads, **extra).engine
        state = engine.prefill_state(ids, prefix_len + args.pipeline_steps + 1)
        times = []
        for _ in range(args.pipeline_repeats):
            g = engine.generate(ids, gen, state=state)
            for _ in g:
                pass
            result = g.result()
            times.append(result.stats.decode_s / result.stats.decode_steps)
        row = {"cache": name, "decode_step_s": round(statistics.median(times), 5)}
        if extra:
            off = result.stats.offload
            row.update(offloaded_layers=len(off["offloaded_layers"]), pool_slots=off["pool_slots"],
                       copy_s_per_step=round(off["copy_s"] / max(off["elastic_steps"], 1), 5),
                       fetched_bytes_per_step=off["fetched_bytes_per_step"])
        rows.append(row)
    base = rows[0]["decode_step_s"]
    for row in rows[1:]:
        row["step_vs_resident"] = round(row["decode_step_s"] / base, 3)
    a, s_ = rows[1], rows[2]
    added_async, added_inline = a["decode_step_s"] - base, s_["decode_step_s"] - base
    out["pipeline"] = {"context": prefix_len, "budget": args.pipeline_budget, "steps": args.pipeline_steps,
                       "rows": rows,
                       "hidden_fraction_of_copy_time": round(1 - added_async / added_inline, 3) if added_inline > 0
                       else None}


def timed(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run_gather(args, out: dict) -> None:
    import torch

    from specontext import native

    row = args.row_bytes
    total_rows = args.host_mib * (1 << 20) // row
    host = torch.empty(total_rows, row, dtype=torch.uint8)
    host.random_(0, 255)
    gen = torch.Generator().manual_seed(0)
    results = {"host_buffer_mib": args.host_mib, "cases": []}
    for label, rows_per_item, n in (("tokens", 1, args.rows), ("blocks", args.block_tokens, args.rows // args.block_tokens)):
        item_bytes = row * rows_per_item
        src = host.view(-1, item_bytes)
        idx = torch.randperm(src.shape[0], generator=gen)[:n].contiguous()
        dst = torch.empty(n, item_bytes, dtype=torch.uint8)
        moved = n * item_bytes
        case = {"unit": label, "item_bytes": item_bytes, "items": n, "bytes": moved}
        # the ceiling: one libc memcpy of a contiguous run of the same bytes out of the same (cold)
        # host buffer, a different run each time so no repeat reads from cache (the native host
        # path merges consecutive rows into one memcpy, so a gather of a run is exactly that)
        runs = [torch.arange(o, o + n) for o in range(0, src.shape[0] - n + 1, n)]
        turn = iter(range(1 << 30))
        case["memcpy_s"] = timed(lambda: native.gather_rows(src, runs[next(turn) % len(runs)], out=dst, num_threads=1),
                                 args.repeats)
        case["torch_index_select_s"] = timed(lambda: torch.index_select(src, 0, idx, out=dst), args.repeats)
        for threads in (1, 2, 0):
            case[f"native_threads_{threads or 'auto'}_s"] = timed(
                lambda t=threads: native.gather_rows(src, idx, out=dst, num_threads=t), args.repeats)
        for key in [k for k in case if k.endswith("_s")]:
            case[key[:-2] + "_gbps"] = round(moved / case[key] / 1e9, 3)
        best_native = max(case[k] for k in case if k.startswith("native") and k.endswith("_gbps"))
        case["native_best_fraction_of_memcpy"] = round(best_native / case["memcpy_gbps"], 3)
        results["cases"].append(case)
    out["host_gather"] = results


def save(out: dict, path: str, partial: bool = False) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    target = path + ".partial" if partial else path
    with open(target + ".tmp", "w", encoding="utf-8") as f:
        json.dump(out, f, indent=1)
        f.write("\n")
    os.replace(target + ".tmp", target)
    if not partial and os.path.exists(path + ".partial"):
        os.remove(path + ".partial")


def report(out: dict) -> None:
    tr = out.get("transfers")
    if tr:
        print(f"\ntransfers ({tr['offloaded_layers']} offloaded layers, {tr['bytes_per_token_all_offloaded_layers_fp16']} "
              "bytes per token and KV head, fp16): reduction vs a full reload of B per step")
        factors = [c["pool_factor"] for c in next(iter(next(iter(tr["texts"].values()))["budgets"].values()))["pool_curve"]]
        print("| text | B | recall | overlap | " + " | ".join(f"P={f:g}B" for f in factors) + " | bytes/step at P=B |")
        print("|---|---|---|---|" + "---|" * len(factors) + "---|")
        for name, entry in tr["texts"].items():
            for b, row in entry["budgets"].items():
                cells = [f"{c['reduction_vs_full_reload']:.1f}x" for c in row["pool_curve"]]
                print(f"| {name} | {b} | {row['recall']:.3f} | {row['adjacent_overlap']:.3f} | " + " | ".join(cells)
                      + f" | {row['pool_curve'][0]['fetched_bytes_per_step'] / 1e6:.2f} MB |")
    if out.get("cache_check"):
        print(f"\ncache check: {out['cache_check']}")
    pl = out.get("pipeline")
    if pl:
        print(f"\npipeline on CPU ({pl['context']} context, B={pl['budget']}, {pl['steps']} decode steps):")
        for row in pl["rows"]:
            print("  " + ", ".join(f"{k} {v}" for k, v in row.items()))
        print(f"  copy time hidden by the async pipeline: {pl['hidden_fraction_of_copy_time']}")
    hg = out.get("host_gather")
    if hg:
        print("\nhost gather (GB/s)")
        for c in hg["cases"]:
            natives = ", ".join(f"{k[len('native_'):-len('_gbps')]} {v}" for k, v in c.items()
                                if k.startswith("native") and k.endswith("_gbps"))
            print(f"  {c['unit']} of {c['item_bytes']} B: memcpy {c['memcpy_gbps']}, index_select "
                  f"{c['torch_index_select_gbps']}, native {natives}; best native = "
                  f"{c['native_best_fraction_of_memcpy']:.0%} of memcpy")


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    import specontext
    from machine import describe

    torch.set_num_threads(args.threads)
    out = {"benchmark": "offload transfers and host gather", "machine": describe(),
           "settings": {k: v for k, v in vars(args).items()}}
    t0 = time.perf_counter()
    if not args.skip_transfers:
        llm = specontext.load(args.model, device="cpu", sparsity="specontext", retrieval_head=args.retrieval_head)
        out["settings"]["model"] = llm.path
        out["retrieval_head"] = getattr(llm.retrieval_head, "path", None)
        run_transfers(llm, args, out)
        check_cache_counts(llm, args, out)
        save(out, args.out, partial=True)
    if not args.skip_pipeline:
        llm = specontext.load(args.model, device="cpu", sparsity="specontext", retrieval_head=args.retrieval_head)
        run_pipeline(llm, args, out)
        save(out, args.out, partial=True)
    if not args.skip_gather:
        run_gather(args, out)
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    save(out, args.out)
    report(out)
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
