"""Weight formats on the default model: decode speed, weight bytes, peak RSS, agreement with float32.

Each format loads in its own process (so peak RSS is its own), decodes the same 1k-token essay
prompt greedily, and reports decode tokens/s, the bytes its weights take, the process's peak RSS,
and how many greedy tokens equal float32's; then it scores 300 essay tokens teacher-forced after
a 512-token prefix (essay tokens 512-812), for top-1 agreement and mean KL against float32.
``int8-a8`` is ``--weights int8 --activations int8`` (smoothed int8 activations on
``torch._int_mm``, ``specontext/model/smooth.py``); its settings were chosen on essay tokens
6512-6812, not on the span scored here. A ``+emb8`` suffix adds ``--embeddings int8`` (the
default model ties its head to the table, so the head stays float and only the lookups change:
``fp32,fp32+emb8`` measures the int8 table's cost alone). Formats run one after the other on one machine, so
speeds compare within the run only.

    python bench_edge/bench_weights.py --out bench_edge/results/weights_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from functools import partial

HERE = os.path.dirname(os.path.abspath(__file__))


def one_llamacpp(context: int, new_tokens: int, threads: int, logits_path: str, kv_f32: bool = False) -> dict:
    """llama.cpp on the same GGUF, prompt and span (its Q8 activations on the Q4_1 weights): the
    logits of the scored span and the greedy tokens. Speed and memory: ``bench_dense.py``, whose
    llama.cpp keeps no logits for every position. ``kv_f32``: its KV cache in float32 instead of
    its default float16 (``llamacpp-kvf32``: how far llama.cpp moves from itself, the scale of the
    KL figures)."""
    import llama_cpp
    import numpy as np
    import torch

    from bench_dense import gguf_tokenizer
    from haystack import TokenSource, read_text
    from specontext import assets

    ids = TokenSource(gguf_tokenizer(), read_text(None)[0]).ids(context)
    m = llama_cpp.Llama(model_path=assets.default_model_path(), n_ctx=max(context + new_tokens, 1024),
                        n_threads=threads, n_threads_batch=threads, n_batch=512, logits_all=True, verbose=False,
                        **({"type_k": 0, "type_v": 0} if kv_f32 else {}))  # 0: GGML_TYPE_F32
    m.eval(ids[:812])
    torch.save({"logits": torch.tensor(np.asarray(m.scores[511:811]), dtype=torch.float32),
                "targets": torch.tensor(ids[512:812])}, logits_path)
    m.reset()
    m.eval(ids)
    out = [int(np.argmax(m.scores[len(ids) - 1]))]
    for _ in range(new_tokens - 1):
        m.eval([out[-1]])
        out.append(int(np.argmax(m.scores[m.n_tokens - 1])))
    return {"weights": "llamacpp-kvf32" if kv_f32 else "llamacpp", "token_ids": out}


def one(fmt: str, context: int, new_tokens: int, threads: int, logits_path: str) -> dict:
    import resource
    import time

    import torch

    import specontext
    from haystack import TokenSource, read_text

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    weights, _, table = fmt.partition("+")
    llm = specontext.load(device="cpu", weights=weights.split("-")[0], activations="int8" if weights == "int8-a8" else
                          "float", embeddings="int8" if table == "emb8" else "float")
    load_s = time.perf_counter() - t0
    ids = TokenSource(llm.tokenizer, read_text(None)[0]).ids(context)
    llm.generate(ids[:64], chat=False, max_new_tokens=4, ignore_eos=True)  # warm-up
    r = llm.generate(ids, chat=False, max_new_tokens=new_tokens, ignore_eos=True)
    scored, _ = llm.engine.teacher_forced(ids[:512], ids[512:812])
    torch.save({"logits": scored.float(), "targets": torch.tensor(ids[512:812])}, logits_path)
    return {"weights": fmt, "load_s": round(load_s, 2), "decode_tokens_per_s": round(r.stats.decode_tokens_per_s, 2),
            "weight_bytes": llm.model.weight_bytes(),
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "token_ids": r.token_ids}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--formats", default="fp32,int8,int8-a8,int4,llamacpp",
                        help="weight formats (fp32, int8, int8-a8, int4, gguf, each optionally +emb8 for "
                        "--embeddings int8), and llamacpp (llama.cpp on the same GGUF; needs the llamacpp extra; "
                        "llamacpp-kvf32 with its KV cache in float32)")
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--logits", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    sys.path.insert(0, HERE)
    if args.one:
        run = (partial(one_llamacpp, kv_f32=args.one == "llamacpp-kvf32") if args.one.startswith("llamacpp")
               else partial(one, args.one))
        print(json.dumps(run(args.context, args.new_tokens, args.threads, args.logits)))
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
            saved = torch.load(path)
            scored[fmt] = saved["logits"]
            nll = torch.nn.functional.cross_entropy(saved["logits"], saved["targets"])
            rows[-1]["perplexity_300"] = round(torch.exp(nll).item(), 3)  # of the essay text itself
    greedy = {r["weights"]: r["token_ids"] for r in rows}
    for r in rows:
        ids = r.pop("token_ids")
        r["teacher_forced_300"] = {}
        for name in ("fp32", "llamacpp"):  # each format against float32 and against llama.cpp
            if name not in greedy or name == r["weights"]:
                continue
            ref = greedy[name]
            r[f"greedy_tokens_equal_to_{name}"] = f"{sum(a == b for a, b in zip(ids, ref))}/{len(ref)}"
            base, got = scored[name].log_softmax(-1), scored[r["weights"]].log_softmax(-1)
            r["teacher_forced_300"][f"top1_agreement_with_{name}"] = round(
                (got.argmax(-1) == base.argmax(-1)).float().mean().item(), 4)
            r["teacher_forced_300"][f"mean_kl_from_{name}"] = round((base.exp() * (base - got)).sum(-1).mean().item(), 5)
        print(json.dumps(r))
    result = {"benchmark": "weight formats, default model, CPU", "machine": describe(), "settings": vars(args),
              "split": {"scored": "essay tokens 512-812 after 0-512",
                        "int8_activation_settings_chosen_on": "essay tokens 6512-6812 after 6000-6512"},
              "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
