"""End-to-end generation speed, prefill included: our sparse and dense modes next to the peers.

    python bench_edge/bench_e2e.py cpu                       # the default model, 1k/2k/4k/8k (about 15 min here)
    python bench_edge/bench_e2e.py cpu --contexts 1024,8192 --decode-tokens 32       # a quick look
    python bench_edge/bench_e2e.py gpu --shape llama-3.1-8b --setting 2k,32k         # on a GPU (see below)

**cpu**: the default model (SmolLM2-135M-Instruct) with essay text as the prompt, at each context C
(prompt C - N tokens, then N greedy tokens, EOS ignored) in a fresh process per run, so peak RSS
is that run's alone. Modes: ``dense``; ``specontext`` (the shipped head, --budget); llama.cpp
through llama-cpp-python when installed. Then batching: R requests of --batch-context tokens
decoding together (R = 1, 2, 4), their throughput against R = 1.

**gpu**: random-weight float16 models of published shapes (no hub access), prompts of random ids,
the paper's settings [input, output] in {[2k,16k], [2k,32k], [16k,2k], [32k,2k]} at B = 2048:
our specontext and dense modes, transformers (sdpa, dynamic cache) and transformers with
OffloadedCache, each at --requests, or by default at the most requests that fit both device
memory and the host memory available (our modes by the memory planner, transformers by counting
its cache, pinned host blocks included; see bench_e2e_gpu.py). With
``--edge`` the device is capped at 4 GB (torch's per-process memory fraction) for the
Llama-3.2-1B shape. ``--steps-sampled K`` times K decode steps at each of 5 points along the
output and integrates, so a 32k-token output does not have to be generated in full; prefill is
timed in full and included.

Every run records: tokens/s end to end (prefill included) and in decode, time per output token,
prefill time, peak host RSS and device memory, bytes read per decode step (weights + KV attended
+ the retrieval head's keys) and the fraction of the roofline reached (those bytes over the
machine's memory bandwidth, measured in the same run with a large copy, against the step time).

Writes JSON (with the machine's description) and a PNG per setting to bench_edge/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from bench_accuracy import int_list  # noqa: E402


def measure_bandwidth(device: str = "cpu", num_bytes: int = 1 << 29) -> float:
    """Memory bandwidth in bytes/s: a large tensor copy (bytes read + bytes written over the time)."""
    import torch

    src = torch.ones(num_bytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm-up: pages touched
    best = float("inf")
    for _ in range(5):
        if src.is_cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        if src.is_cuda:
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * num_bytes / best


def step_bytes(cfg, weights_bytes: int, element_bytes: int, past_tokens: int, mode: str, budget: int,
               head=None, requests: int = 1) -> int:
    """Bytes a decode step must read: the weights once, plus per request the K and V it attends and,
    for specontext, the retrieval head's keys over the whole past."""
    L, G, D = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim
    attended = past_tokens if mode == "dense" else min(budget, past_tokens)
    kv = 2 * L * G * (attended + 1) * D * element_bytes
    head_keys = 0
    if mode == "specontext" and head is not None:
        head_keys = head.config.num_kv_heads * past_tokens * head.config.head_dim * element_bytes
    return weights_bytes + requests * (kv + head_keys)


# --------------------------------------------------------------------------------------------- cpu


def _essay_ids(tokenizer, num_tokens: int, offset: int = 0) -> list[int]:
    from specontext import assets

    ids = tokenizer.encode(assets.essay_text()[: (num_tokens + offset) * 8], add_bos=False)
    if len(ids) < num_tokens + offset:
        raise SystemExit("not enough essay text for the requested context")
    return ids[offset:offset + num_tokens]


def cpu_worker(mode: str, context: int, decode_tokens: int, threads: int, budget: int, requests: int) -> dict:
    """One run in this process: ``requests`` prompts of ``context - decode_tokens`` essay tokens."""
    import torch

    import specontext

    llm = specontext.load(device="cpu", threads=threads,
                          **({"sparsity": "specontext", "budget_tokens": budget} if mode == "specontext" else {}))
    engine = llm.engine
    prompt_tokens = context - decode_tokens
    # each request reads a different stretch of the essays, so rows do not share a prompt
    prompts = [_essay_ids(llm.tokenizer, prompt_tokens, offset=r * 997) for r in range(requests)]
    gen = specontext.GenerationConfig(max_new_tokens=decode_tokens, ignore_eos=True)
    warm = engine.generate(prompts[0][:64], specontext.GenerationConfig(max_new_tokens=4, ignore_eos=True))
    for _ in warm:
        pass
    batch = engine.generate_batch(prompts, [gen] * requests)
    for _ in batch:
        pass
    b = batch.stats.to_dict()
    first = batch.result(0)
    cfg = llm.config
    weights = first.stats.weights_bytes
    step_s = batch.stats.decode_s / max(batch.stats.decode_steps, 1)
    mid_past = prompt_tokens + decode_tokens // 2
    read = step_bytes(cfg, weights, 4, mid_past, mode, budget, llm.retrieval_head, requests)
    return {"engine": f"specontext-{mode}", "mode": mode, "context": context, "requests": requests,
            "prompt_tokens": prompt_tokens, "decode_tokens": decode_tokens, "prefill_s": round(b["prefill_s"], 4),
            "decode_s": round(b["decode_s"], 4), "total_s": b["total_s"], "tokens_per_s": b["tokens_per_s"],
            "decode_tokens_per_s": b["decode_tokens_per_s"], "time_per_output_token_s": round(step_s / requests, 6),
            "decode_step_s": round(step_s, 6), "peak_host_rss_bytes": first.stats.peak_host_rss_bytes,
            "kv_cache_bytes": first.stats.kv_cache_bytes, "weights_bytes": weights,
            "bytes_read_per_step": read, "sparsity": first.stats.sparsity, "threads": torch.get_num_threads()}


def growth_worker(contexts: list[int], decode_tokens: int, threads: int, budget: int, repeats: int) -> dict:
    """Decode step time per (mode, context) in ONE process, the runs alternating, medians of ``repeats``.

    A shared machine's speed drifts over minutes, so the growth ratio (largest over smallest
    context) is measured here with every configuration interleaved; the per-process runs above
    give memory and end-to-end times.
    """
    import statistics

    import torch

    import specontext
    from specontext.retrieval.selection import SparsityOptions

    llm = specontext.load(device="cpu", threads=threads, sparsity="specontext", budget_tokens=budget)
    engine = llm.engine
    gen = specontext.GenerationConfig(max_new_tokens=decode_tokens, ignore_eos=True)
    states = {}
    for context in contexts:
        ids = _essay_ids(llm.tokenizer, context - decode_tokens)
        states[context] = (ids, engine.prefill_state(ids, context))
    modes = {"dense": SparsityOptions(), "specontext": SparsityOptions(method="specontext", budget_tokens=budget)}
    times: dict = {(m, c): [] for m in modes for c in contexts}
    for rep in range(repeats + 1):  # the first round warms up
        for context in contexts:
            ids, state = states[context]
            for mode, opts in modes.items():
                g = engine.generate(ids, gen, state=state, sparsity=opts)
                for _ in g:
                    pass
                s = g.result().stats
                if rep:
                    times[(mode, context)].append(s.decode_s / s.decode_steps)
    step = {f"{m} {c}": statistics.median(v) for (m, c), v in times.items()}
    lo, hi = min(contexts), max(contexts)
    return {"step_s": {k: round(v, 6) for k, v in step.items()}, "repeats": repeats,
            "threads": torch.get_num_threads(),
            "ratio": {m: round(step[f"{m} {hi}"] / step[f"{m} {lo}"], 3) for m in modes}}


def llamacpp_worker(context: int, decode_tokens: int, threads: int) -> dict:
    import resource

    import llama_cpp
    import numpy as np

    from specontext import assets
    from specontext.loaders.gguf_loader import GGUFFile
    from specontext.tokenizer import Tokenizer

    tok = Tokenizer.from_gguf_fields(GGUFFile(assets.default_model_path()).meta)
    ids = _essay_ids(tok, context - decode_tokens)
    m = llama_cpp.Llama(model_path=assets.default_model_path(), n_ctx=context, n_threads=threads,
                        n_threads_batch=threads, n_batch=512, verbose=False)
    m.eval(ids[:64])
    m.reset()
    t0 = time.perf_counter()
    m.eval(ids)
    prefill_s = time.perf_counter() - t0
    n_vocab = m.n_vocab()
    token = int(np.argmax(np.ctypeslib.as_array(m._ctx.get_logits(), shape=(n_vocab,))))
    t0 = time.perf_counter()
    for _ in range(decode_tokens - 1):
        m.eval([token])
        token = int(np.argmax(np.ctypeslib.as_array(m._ctx.get_logits(), shape=(n_vocab,))))
    decode_s = time.perf_counter() - t0
    step = decode_s / (decode_tokens - 1)
    return {"engine": "llama.cpp", "mode": "dense", "context": context, "requests": 1, "prompt_tokens": len(ids),
            "decode_tokens": decode_tokens, "prefill_s": round(prefill_s, 4), "decode_s": round(decode_s, 4),
            "total_s": round(prefill_s + decode_s, 4), "tokens_per_s": round(decode_tokens / (prefill_s + decode_s), 3),
            "decode_tokens_per_s": round(1 / step, 3), "time_per_output_token_s": round(step, 6),
            "decode_step_s": round(step, 6),
            "peak_host_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "threads": threads}


def run_cpu(args) -> dict:
    from machine import describe

    engines = ["dense", "specontext"]
    try:
        import llama_cpp  # noqa: F401
        engines.append("llamacpp")
    except ImportError:
        print("llama-cpp-python is not installed; llama.cpp is skipped (pip install '.[llamacpp]')", file=sys.stderr)
    jobs = [(e, c, 1) for c in args.contexts for e in engines]
    jobs += [(m, args.batch_context, r) for m in ("dense", "specontext") for r in args.batch_requests if r > 1]
    bandwidth = measure_bandwidth("cpu")
    print(f"memory bandwidth (copy): {bandwidth / 1e9:.1f} GB/s", file=sys.stderr)
    rows = []
    for engine, context, requests in jobs:
        cmd = [sys.executable, __file__, "cpu", "--worker", engine, "--contexts", str(context),
               "--decode-tokens", str(args.decode_tokens), "--threads", str(args.threads),
               "--budget", str(args.budget), "--batch-requests", str(requests)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"{engine} at {context} x{requests}: failed: {proc.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
            continue
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        if "bytes_read_per_step" in row:
            row["roofline_step_s"] = round(row["bytes_read_per_step"] / bandwidth, 6)
            row["roofline_fraction"] = round(row["roofline_step_s"] / row["decode_step_s"], 3)
        rows.append(row)
        print(f"{row['engine']:22s} ctx {context:5d} x{requests}: {row['tokens_per_s']:7.1f} tok/s end to end, "
              f"{row['time_per_output_token_s'] * 1e3:6.1f} ms/token, peak RSS {row['peak_host_rss_bytes'] / 2**20:5.0f} MiB",
              file=sys.stderr, flush=True)
    single = {(r["engine"], r["context"]): r for r in rows if r["requests"] == 1}
    lo, hi = min(args.contexts), max(args.contexts)
    growth = {}
    for engine in ("specontext-dense", "specontext-specontext", "llama.cpp"):
        a, b = single.get((engine, lo)), single.get((engine, hi))
        if a and b:
            growth[engine] = round(b["decode_step_s"] / a["decode_step_s"], 3)
    # the same ratio with the runs interleaved in one process (robust to the machine's drift)
    cmd = [sys.executable, __file__, "cpu", "--worker", "growth", "--contexts", f"{lo},{hi}",
           "--decode-tokens", str(args.decode_tokens), "--threads", str(args.threads), "--budget", str(args.budget)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    interleaved = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else {
        "error": (proc.stderr.strip().splitlines() or [""])[-1]}
    print(f"interleaved decode steps: {json.dumps(interleaved)}", file=sys.stderr)
    batching = {}
    for mode in ("dense", "specontext"):
        base = next((r for r in rows if r["mode"] == mode and r["context"] == args.batch_context
                     and r["requests"] == 1 and r["engine"].startswith("specontext")), None)
        for r in rows:
            if base and r["engine"] == base["engine"] and r["context"] == args.batch_context and r["requests"] > 1:
                batching[f"{mode} x{r['requests']}"] = round(r["decode_tokens_per_s"] / base["decode_tokens_per_s"], 3)
    targets = []
    ratio = interleaved.get("ratio", {}).get("specontext")
    if ratio is not None:
        targets.append({"target": f"CPU: sparse decode step at {hi} no more than 1.15x its time at {lo} "
                                  f"(budget {args.budget}; interleaved runs)", "measured": ratio, "met": ratio <= 1.15})
    return {"benchmark": "end-to-end generation on CPU, default model", "machine": describe(),
            "memory_bandwidth_bytes_per_s": round(bandwidth), "settings": {k: v for k, v in vars(args).items()
                                                                            if k not in ("worker", "func")},
            "rows": rows, "decode_step_growth": {"from": lo, "to": hi, "ratio_separate_processes": growth,
                                                 "interleaved": interleaved},
            "batching_decode_speedup": batching, "targets": targets}


def cpu_table(result: dict) -> str:
    lines = ["| engine | context | requests | end-to-end tok/s | decode tok/s | ms / decode step | ms / output token | "
             "prefill s | peak RSS MiB | MB read / step | roofline fraction |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        read = f"{r['bytes_read_per_step'] / 1e6:.0f}" if "bytes_read_per_step" in r else "n/a"
        roof = f"{r['roofline_fraction']:.2f}" if "roofline_fraction" in r else "n/a"
        lines.append(f"| {r['engine']} | {r['context']} | {r['requests']} | {r['tokens_per_s']:.1f} | "
                     f"{r['decode_tokens_per_s']:.1f} | {r['decode_step_s'] * 1e3:.1f} | "
                     f"{r['time_per_output_token_s'] * 1e3:.1f} | {r['prefill_s']:.2f} | "
                     f"{r['peak_host_rss_bytes'] / 2**20:.0f} | {read} | {roof} |")
    return "\n".join(lines)


def plot_cpu(result: dict, path: str) -> str | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    for engine, style in (("specontext-specontext", "o-"), ("specontext-dense", "s--"), ("llama.cpp", "^:")):
        pts = sorted((r["context"], r["time_per_output_token_s"] * 1e3) for r in result["rows"]
                     if r["engine"] == engine and r["requests"] == 1)
        if pts:
            a.plot(*zip(*pts), style, label=engine.replace("specontext-", "ours, "))
    a.set_xscale("log", base=2)
    a.set_xlabel("context (tokens)")
    a.set_ylabel("ms per output token")
    a.set_title("decode time per token (1 request)", fontsize=9)
    a.grid(alpha=0.3)
    a.legend(fontsize=8)
    ctx = result["settings"]["batch_context"]
    for mode, style in (("specontext", "o-"), ("dense", "s--")):
        pts = sorted((r["requests"], r["decode_tokens_per_s"]) for r in result["rows"]
                     if r["mode"] == mode and r["context"] == ctx and r["engine"].startswith("specontext"))
        if pts:
            b.plot(*zip(*pts), style, label=f"ours, {mode}")
    b.set_xlabel(f"requests decoding together ({ctx}-token context)")
    b.set_ylabel("decode tokens/s (all requests)")
    b.set_title("batching", fontsize=9)
    b.grid(alpha=0.3)
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


# --------------------------------------------------------------------------------------------- main


def write_json(result: dict, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".partial"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="suite", required=True)
    c = sub.add_parser("cpu", help="the default model on this CPU (always)")
    c.add_argument("--contexts", type=int_list, default=[1024, 2048, 4096, 8192])
    c.add_argument("--decode-tokens", type=int, default=64, help="greedy tokens generated per request")
    c.add_argument("--budget", type=int, default=1024)
    c.add_argument("--batch-context", type=int, default=2048, help="context of each request in the batching runs")
    c.add_argument("--batch-requests", type=int_list, default=[1, 2, 4], help="batch sizes for the batching runs")
    c.add_argument("--threads", type=int, default=os.cpu_count())
    c.add_argument("--out", default=os.path.join(HERE, "results", "e2e_cpu.json"))
    c.add_argument("--plot", default=os.path.join(HERE, "results", "e2e_cpu.png"))
    c.add_argument("--worker", help=argparse.SUPPRESS)
    g = sub.add_parser("gpu", help="random-weight models of real shapes on a CUDA GPU")
    import bench_e2e_gpu

    bench_e2e_gpu.add_arguments(g)
    args = p.parse_args(argv)

    if args.suite == "cpu":
        if args.worker:
            if args.worker == "llamacpp":
                row = llamacpp_worker(args.contexts[0], args.decode_tokens, args.threads)
            elif args.worker == "growth":
                row = growth_worker(args.contexts, args.decode_tokens, args.threads, args.budget, repeats=3)
            else:
                row = cpu_worker(args.worker, args.contexts[0], args.decode_tokens, args.threads, args.budget,
                                 args.batch_requests[0])
            print(json.dumps(row))
            return 0
        if args.decode_tokens < 2 or max(args.contexts) <= args.decode_tokens:
            raise SystemExit("--decode-tokens must be >= 2 and smaller than every context")
        result = run_cpu(args)
        write_json(result, args.out)
        print(cpu_table(result))
        print(json.dumps({k: result[k] for k in ("decode_step_growth", "batching_decode_speedup", "targets")}, indent=1))
        png = plot_cpu(result, args.plot)
        print(f"results: {args.out}" + (f", plot: {png}" if png else " (no plot: pip install '.[bench]')"))
        return 0
    return bench_e2e_gpu.run(args)


if __name__ == "__main__":
    sys.exit(main())
