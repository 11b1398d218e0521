"""Weight formats on the default model: decode speed, weight bytes, peak RSS, agreement with float32.

Each format loads in its own process (so peak RSS is its own), decodes the same 1k-token essay
prompt greedily, and reports decode tokens/s, the bytes its weights take, the process's peak RSS,
and how many greedy tokens equal float32's; then it scores 300 essay tokens teacher-forced after
a 512-token prefix, for top-1 agreement and mean KL against float32 (``int8-a8`` is int8 with
activations quantized per token, on ``torch._int_mm``). Formats run one after the other on one
machine, so speeds compare within the run only.

    python bench_edge/bench_weights.py --out bench_edge/results/weights_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))


def one(fmt: str, context: int, new_tokens: int, threads: int, logits_path: str) -> dict:
    import resource
    import time

    import torch

    import specontext
    from haystack import TokenSource, read_text

    torch.set_num_threads(threads)
    from specontext.model.quant import Int8Linear

    t0 = time.perf_counter()
    llm = specontext.load(device="cpu", weights=fmt.split("-")[0])
    load_s = time.perf_counter() - t0
    if fmt == "int8-a8":
        for module in llm.model.modules():
            if isinstance(module, Int8Linear):
                module.activations = "int8"
    ids = TokenSource(llm.tokenizer, read_text(None)[0]).ids(context)
    llm.generate(ids[:64], chat=False, max_new_tokens=4, ignore_eos=True)  # warm-up
    r = llm.generate(ids, chat=False, max_new_tokens=new_tokens, ignore_eos=True)
    scored, _ = llm.engine.teacher_forced(ids[:512], ids[512:812])
    torch.save(scored.float(), logits_path)
    return {"weights": fmt, "load_s": round(load_s, 2), "decode_tokens_per_s": round(r.stats.decode_tokens_per_s, 2),
            "weight_bytes": llm.model.weight_bytes(),
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "token_ids": r.token_ids}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--formats", default="fp32,int8,int8-a8,int4")
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--logits", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    sys.path.insert(0, HERE)
    if args.one:
        print(json.dumps(one(args.one, args.context, args.new_tokens, args.threads, args.logits)))
        return
    from machine import describe

    import torch

    rows, scored = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in args.formats.split(","):
            path = os.path.join(tmp, f"{fmt}.pt")
            proc = subprocess.run([sys.executable, __file__, "--one", fmt, "--context", str(args.context),
                                   "--new-tokens", str(args.new_tokens), "--threads", str(args.threads),
                                   "--logits", path], capture_output=True, text=True, check=True)
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            scored[fmt] = torch.load(path)
    ref = next((r["token_ids"] for r in rows if r["weights"] == "fp32"), None)
    for r in rows:
        ids = r.pop("token_ids")
        if ref is not None:
            r["greedy_tokens_equal_to_fp32"] = f"{sum(a == b for a, b in zip(ids, ref))}/{len(ref)}"
            base, got = scored["fp32"].log_softmax(-1), scored[r["weights"]].log_softmax(-1)
            r["teacher_forced_300"] = {"top1_agreement_with_fp32": round((got.argmax(-1) == base.argmax(-1)).float()
                                                                          .mean().item(), 4),
                                       "mean_kl_from_fp32": round((base.exp() * (base - got)).sum(-1).mean().item(), 5)}
        print(json.dumps(r))
    result = {"benchmark": "weight formats, default model, CPU", "machine": describe(), "settings": vars(args),
              "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
