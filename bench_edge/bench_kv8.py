"""The 8-bit KV cache on the default model: what it costs in accuracy and what it saves in memory.

300 essay tokens are scored teacher-forced after a 512-token prefix with ``--kv-dtype auto``
(float32 here), ``int8`` and ``fp8``, dense and with specontext at B = 256 (sparse steps gather,
and upcast, only the chosen rows), on the default weights (``--weights auto``: int4 for the
default GGUF); top-1 agreement and mean KL are against the same settings with float KV, as the
issue asks, with each one's perplexity of the scored tokens. KV bytes are the cache's own count
at that length.

Offloaded (``--offload-layers``, default all): the same specontext scoring with every layer's KV
in host memory, float32 and int8, whose logits must equal the resident cache's with the same KV
format; then a greedy generation of ``--generate`` tokens after the prefix with each, for the
bytes elastic loading fetched per step, set beside what the same fetched tokens take in fp16.

    python bench_edge/bench_kv8.py --out bench_edge/results/kv8_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prefix", type=int, default=512)
    parser.add_argument("--tokens", type=int, default=300)
    parser.add_argument("--budget", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--offload-layers", type=int, default=0, help="offloaded layers in the last part (0: all)")
    parser.add_argument("--generate", type=int, default=64, help="tokens generated for the transfer count")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    sys.path.insert(0, HERE)
    import torch

    import specontext
    from haystack import TokenSource, read_text
    from machine import describe

    torch.set_num_threads(args.threads)
    rows = []
    for sparsity in ("dense", "specontext"):
        scored, kv_bytes = {}, {}
        for kv in ("auto", "int8", "fp8"):
            llm = specontext.load(device="cpu", kv_dtype=kv, sparsity=sparsity, budget_tokens=args.budget)
            ids = TokenSource(llm.tokenizer, read_text(None)[0]).ids(args.prefix + args.tokens)
            scored[kv], _ = llm.engine.teacher_forced(ids[:args.prefix], ids[args.prefix:])
            cache = llm.engine.new_cache(args.prefix + args.tokens)
            kv_bytes[kv] = sum(layer.nbytes() for layer in cache.layers)
        targets = torch.tensor(ids[args.prefix:])
        base = scored["auto"].float().log_softmax(-1)

        def perplexity(logp):
            return round(torch.exp(-logp.gather(-1, targets[:, None]).mean()).item(), 3)
        row = {"sparsity": sparsity, "budget_tokens": args.budget if sparsity != "dense" else None,
               "perplexity_float_kv": perplexity(base), "kv_bytes_float32": kv_bytes["auto"]}
        for kv in ("int8", "fp8"):
            got = scored[kv].float().log_softmax(-1)
            row[kv] = {"top1_agreement_with_float_kv": round((got.argmax(-1) == base.argmax(-1)).float().mean().item(), 4),
                       "mean_kl_from_float_kv": round((base.exp() * (base - got)).sum(-1).mean().item(), 5),
                       "perplexity": perplexity(got), "kv_bytes": kv_bytes[kv]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    offloaded = {"sparsity": "specontext", "budget_tokens": args.budget}
    for kv in ("auto", "int8"):
        opts = dict(kv_dtype=kv, sparsity="specontext", budget_tokens=args.budget)
        resident = specontext.load(device="cpu", **opts)
        L = resident.model.config.num_layers
        llm = specontext.load(device="cpu", offload_layers=args.offload_layers or L, **opts)
        ids = TokenSource(llm.tokenizer, read_text(None)[0]).ids(args.prefix + args.tokens)
        want, _ = resident.engine.teacher_forced(ids[:args.prefix], ids[args.prefix:])
        got, _ = llm.engine.teacher_forced(ids[:args.prefix], ids[args.prefix:])
        stats = llm.generate(ids[:args.prefix], chat=False, max_new_tokens=args.generate, ignore_eos=True).stats
        off, D = stats.offload, llm.model.config.head_dim
        N = len(off["offloaded_layers"])
        steps = stats.generated_tokens - 1
        offloaded[kv] = {"offloaded_layers": N, "logits_equal_resident": bool(torch.equal(got, want)),
                         "fetched_tokens_per_step": round(off["fetched_tokens"] / steps, 1),
                         "fetched_bytes_per_step": round(off["fetched_bytes"] / steps),
                         "same_tokens_in_fp16_bytes_per_step": round(off["fetched_tokens"] * 2 * N * D * 2 / steps),
                         "full_reload_bytes_per_step": off["full_reload_bytes_per_step"]}
    offloaded["int8_bytes_per_fetched_token_over_fp16"] = round(
        offloaded["int8"]["fetched_bytes_per_step"] / offloaded["int8"]["same_tokens_in_fp16_bytes_per_step"], 4)
    rows.append(offloaded)
    print(json.dumps(offloaded), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"benchmark": "8-bit KV cache, default model, CPU", "machine": describe(), "settings": vars(args),
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
