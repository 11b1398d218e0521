"""Prefill and decode throughput of the default model at 1k-8k context, next to llama.cpp.

Our engine runs each ``--ours`` configuration (weight format / dense or specontext selection);
llama.cpp runs dense on the same GGUF with the same thread count. Each (engine, context) pair
runs in a fresh subprocess so peak RSS belongs to that run alone.
The prompt is essay text cut to ``context - decode_tokens`` tokens; decoding is greedy with EOS
ignored, so both engines do the same work. Warm-up runs outside the timed region.

    python bench_edge/bench_dense.py                       # all contexts, both engines
    python bench_edge/bench_dense.py --contexts 1024 2048 --decode-tokens 32
    python bench_edge/bench_dense.py --contexts 1024 8192 --repeats 3 --ours auto/dense auto/dense/kv8 \
        auto/specontext auto/specontext/kv8 --out bench_edge/results/edge_cpu.json   # issue 17's comparison

Writes bench_edge/results/dense_cpu.json (or --out) with the machine's description and prints a
Markdown table.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def _prompt_ids(tok, num_tokens: int) -> list[int]:
    from specontext import assets

    # our tokenizer gives llama.cpp's ids (tested), so both engines see the same prompt
    ids = tok.encode(assets.essay_text()[: num_tokens * 8], add_bos=False)
    assert len(ids) >= num_tokens, "not enough essay text"
    return ids[:num_tokens]


def gguf_tokenizer():
    """The default GGUF's own tokenizer, without loading its weights (its ids equal llama.cpp's, tested)."""
    from specontext import assets
    from specontext.loaders.gguf_loader import GGUFFile
    from specontext.tokenizer import Tokenizer

    return Tokenizer.from_gguf_fields(GGUFFile(assets.default_model_path()).meta)


def worker_ours(context: int, decode_tokens: int, threads: int, config: str = "fp32/dense",
                budget: int = 1024) -> dict:
    """Our engine: ``config`` is WEIGHTS/SPARSITY[/kv8][/compiled|/aot], WEIGHTS one of auto, fp32, int8,
    int8-a8 (--activations int8), int4, gguf (the GGUF's blocks on ggml's kernels), SPARSITY dense or specontext (the shipped head, ``budget``
    tokens; specontext+ort runs the head on ONNX Runtime), ``kv8`` an 8-bit KV cache (--kv-dtype
    int8), ``compiled`` the decode step under torch.compile (--compile-decode on) and ``aot`` the
    step compiled ahead of time (--compile-decode aot). A compiled step is compiled for its cache's
    shape, so its warm-up is the same generation, run once before the timed one (``warmup_s``
    records it: compiling plus one run; aot's step is built or loaded with the model, before it)."""
    import torch

    import specontext

    weights, sparsity, *extra = config.split("/")
    opts = {"weights": weights.split("-")[0], "activations": "int8" if weights == "int8-a8" else "float"}
    if set(extra) - {"kv8", "compiled", "aot"}:
        raise SystemExit(f"unknown part {'/'.join(extra)!r} in {config!r}; use WEIGHTS/SPARSITY[/kv8][/compiled|/aot]")
    if "kv8" in extra:
        opts["kv_dtype"] = "int8"
    if "compiled" in extra:
        opts["compile_decode"] = "on"
    if "aot" in extra:
        opts["compile_decode"] = "aot"
    if sparsity.endswith("+ort"):  # the retrieval head on ONNX Runtime (the onnx extra)
        sparsity = sparsity[:-4]
        opts["retrieval_backend"] = "onnxruntime"
    if sparsity != "dense":
        opts.update(sparsity=sparsity, budget_tokens=budget)
    llm = specontext.load(device="cpu", threads=threads, **opts)
    ids = _prompt_ids(llm.tokenizer, context - decode_tokens)
    engine = llm.engine
    compiled = "compiled" in extra or "aot" in extra
    started = time.perf_counter()
    warm = engine.generate(ids if compiled else ids[:64],
                           specontext.GenerationConfig(max_new_tokens=decode_tokens if compiled else 8, ignore_eos=True))
    for _ in warm:
        pass
    warmup_s = time.perf_counter() - started
    del warm  # its cache too: the timed run's peak RSS must not count the warm-up's (360 MiB at 8k)
    gc.collect()
    g = engine.generate(ids, specontext.GenerationConfig(max_new_tokens=decode_tokens, ignore_eos=True))
    for _ in g:
        pass
    r = g.result()
    s = r.stats
    return {"engine": f"specontext {config}", "context": context, "sparse_steps": s.sparsity.get("sparse_steps"),
            "prompt_tokens": s.prompt_tokens,
            "decode_tokens": s.generated_tokens, "prefill_s": s.prefill_s,
            "prefill_tokens_per_s": s.prefill_tokens_per_s, "decode_s": s.decode_s,
            "decode_tokens_per_s": s.decode_tokens_per_s, "kv_cache_bytes": s.kv_cache_bytes,
            "weights_bytes": s.weights_bytes, "peak_rss_bytes": s.peak_host_rss_bytes,
            "threads": torch.get_num_threads(), "warmup_s": round(warmup_s, 2)}


def worker_llamacpp(context: int, decode_tokens: int, threads: int) -> dict:
    import llama_cpp
    import numpy as np

    from specontext import assets

    ids = _prompt_ids(gguf_tokenizer(), context - decode_tokens)
    m = llama_cpp.Llama(model_path=assets.default_model_path(), n_ctx=context, n_threads=threads,
                        n_threads_batch=threads, n_batch=512, verbose=False)
    m.eval(ids[:64])  # warm-up
    m.reset()
    t0 = time.perf_counter()
    m.eval(ids)
    prefill_s = time.perf_counter() - t0
    n_vocab = m.n_vocab()

    def last_logits():
        # without logits_all, llama.cpp keeps one row: the last evaluated token's logits
        return np.ctypeslib.as_array(m._ctx.get_logits(), shape=(n_vocab,))

    token = int(np.argmax(last_logits()))
    t0 = time.perf_counter()
    for _ in range(decode_tokens - 1):
        m.eval([token])
        token = int(np.argmax(last_logits()))
    decode_s = time.perf_counter() - t0
    return {"engine": "llama.cpp", "context": context, "prompt_tokens": len(ids), "decode_tokens": decode_tokens,
            "prefill_s": prefill_s, "prefill_tokens_per_s": len(ids) / prefill_s, "decode_s": decode_s,
            "decode_tokens_per_s": (decode_tokens - 1) / decode_s,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "threads": threads}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--engines", nargs="+", default=["ours", "llamacpp"], choices=["ours", "llamacpp"])
    parser.add_argument("--ours", nargs="+", default=["fp32/dense"],
                        help="our configurations, WEIGHTS/SPARSITY[/kv8][/compiled|/aot]: auto, fp32, int8, int8-a8, "
                        "int4 or gguf / dense, specontext or specontext+ort (the head on ONNX Runtime) / kv8 for --kv-dtype "
                        "int8 / compiled for --compile-decode on, aot for --compile-decode aot")
    parser.add_argument("--budget", type=int, default=1024, help="token budget of the specontext configurations")
    parser.add_argument("--repeats", type=int, default=1, help="rounds of every run, interleaved; the table gives "
                        "each figure's median over them (this machine is shared)")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "dense_cpu.json"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        if args.worker == "llamacpp":
            print(json.dumps(worker_llamacpp(args.contexts[0], args.decode_tokens, args.threads)))
        else:
            print(json.dumps(worker_ours(args.contexts[0], args.decode_tokens, args.threads, args.ours[0], args.budget)))
        return

    sys.path.insert(0, HERE)
    from machine import describe

    engines = list(args.engines)
    if "llamacpp" in engines:
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            print("llama-cpp-python is not installed; skipping llama.cpp (pip install '.[llamacpp]')", file=sys.stderr)
            engines.remove("llamacpp")
    runs = [("llamacpp", None) if e == "llamacpp" else ("ours", c) for e in engines
            for c in (args.ours if e == "ours" else [None])]
    rows = []
    for repeat, context in ((r, c) for r in range(args.repeats) for c in args.contexts):  # rounds interleave
        for engine, config in runs:
            cmd = [sys.executable, __file__, "--worker", engine, "--contexts", str(context),
                   "--decode-tokens", str(args.decode_tokens), "--threads", str(args.threads),
                   "--budget", str(args.budget)] + (["--ours", config] if config else [])
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"{engine} {config or ''} at {context}: failed: {proc.stderr.strip().splitlines()[-1:]}",
                      file=sys.stderr)
                continue
            row = {**json.loads(proc.stdout.strip().splitlines()[-1]), "repeat": repeat}
            rows.append(row)
            print(f"{row['engine']:30s} ctx {context:5d}: prefill {row['prefill_tokens_per_s']:7.1f} tok/s, "
                  f"decode {row['decode_tokens_per_s']:6.1f} tok/s, peak RSS {row['peak_rss_bytes'] / 2**20:6.0f} MiB",
                  file=sys.stderr, flush=True)
    result = {"benchmark": "dense prefill/decode, default model (SmolLM2-135M-Instruct Q4_1 GGUF)",
              "machine": describe(), "decode_tokens": args.decode_tokens, "threads": args.threads,
              "budget": args.budget,
              "note": "ours: WEIGHTS/SPARSITY[/kv8][/compiled|/aot] (fp32 dequantizes the GGUF; auto and int4 keep its "
                      "Q4_1 blocks as int4; gguf keeps its blocks as they are, on ggml's kernels; int8-a8 is --weights int8 --activations int8; kv8 is --kv-dtype int8; "
                      "compiled is --compile-decode on, aot is --compile-decode aot, both timed after a warm-up run of the same shape); llama.cpp "
                      "computes on the Q4_1 weights, dense",
              "command": " ".join(["python", *sys.argv]),
              "rows": rows}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    tmp = args.out + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    os.replace(tmp, args.out)
    print(table(rows))


def medians(rows: list[dict]) -> list[dict]:
    """One row per (context, engine): each figure's median over the repeats, and their count."""
    import statistics

    groups: dict = {}
    for r in rows:
        groups.setdefault((r["context"], r["engine"]), []).append(r)
    out = []
    for group in groups.values():
        row = dict(group[0])
        for key in ("prefill_tokens_per_s", "decode_tokens_per_s", "peak_rss_bytes"):
            row[key] = statistics.median(r[key] for r in group)
        row["repeats"] = len(group)
        out.append(row)
    return out


def table(rows: list[dict]) -> str:
    lines = ["| context | engine | prefill tok/s | decode tok/s | peak RSS MiB | KV cache MiB |",
             "|---|---|---|---|---|---|"]
    for r in medians(rows):
        kv = f"{r['kv_cache_bytes'] / 2**20:.0f}" if "kv_cache_bytes" in r else "n/a"
        lines.append(f"| {r['context']} | {r['engine']} | {r['prefill_tokens_per_s']:.0f} | "
                     f"{r['decode_tokens_per_s']:.1f} | {r['peak_rss_bytes'] / 2**20:.0f} | {kv} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
