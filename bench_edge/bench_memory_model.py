"""Is the memory model right? Predicted against measured memory over a grid of contexts and budgets.

    python bench_edge/bench_memory_model.py                     # the default model on this machine
    python bench_edge/bench_memory_model.py --device cuda       # on a GPU: against max_memory_allocated

For each context x budget x placement, one real generation (a prefill of essay text, then a few
decode steps) runs, and the model's prediction for the same settings is compared with:

* on CPU, the runtime's own accounting of the buffers it allocated (weights, retrieval head,
  KV cache with slots and staging, the head's K cache): the model's non-workspace terms;
* on CUDA, ``torch.cuda.max_memory_allocated`` over the run (reset after loading): the model's
  peak, workspace included.

Writes JSON (bench_edge/results/memory_model_{cpu,cuda}.json) with the machine description.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model path (default: the default model)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--contexts", default="1024,2048,4096")
    p.add_argument("--budgets", default="256,1024")
    p.add_argument("--offload-layers", type=int, default=20, help="layers offloaded in the offloaded placement")
    p.add_argument("--new-tokens", type=int, default=4)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    import torch
    from tqdm import tqdm

    import machine
    import specontext
    from haystack import TokenSource, read_text
    from specontext.planner.memory import HeadShape, MemoryInputs, buffers, tier_bytes

    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    out = args.out or os.path.join(HERE, "results", f"memory_model_{'cuda' if cuda else 'cpu'}.json")
    contexts = [int(c) for c in args.contexts.split(",")]
    budgets = [int(b) for b in args.budgets.split(",")]
    grid = [(c, b, n, pool) for c in contexts for b in budgets for n, pool in ((0, 1.0), (args.offload_layers, 1.25))]
    rows = []
    text_ids = None
    for ctx, budget, offload, pool in tqdm(grid, desc="grid", unit="run"):
        llm = specontext.load(args.model, device=args.device, sparsity="specontext", budget_tokens=budget,
                              offload_layers=offload, slot_pool=pool)
        if text_ids is None:
            text_ids = TokenSource(llm.tokenizer, read_text(None)[0]).ids(max(contexts))
        prompt = text_ids[:ctx - args.new_tokens]
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        gen = llm.engine.generate(prompt, specontext.GenerationConfig(max_new_tokens=args.new_tokens, ignore_eos=True))
        for _ in gen:
            pass
        stats = gen.result().stats
        head = llm.retrieval_head
        elem = torch.empty(0, dtype=llm.model.dtype).element_size()
        inputs = MemoryInputs(model=llm.model.config, weight_bytes=elem, kv_bytes=elem, sparsity="specontext",
                              budget_tokens=budget, head=HeadShape.from_config(head.config), slot_pool=pool,
                              prefill_chunk_tokens=llm.settings.prefill_chunk_tokens, fused_attention=cuda)
        bufs = buffers(inputs, len(prompt) + args.new_tokens, offload)
        head_bytes = sum(t.numel() * t.element_size() for t in head.parameters())
        row = {"context_tokens": ctx, "budget_tokens": budget, "offload_layers": offload, "slot_pool": pool,
               "seconds": round(time.perf_counter() - t0, 2),
               "predicted": {b.name: b.num_bytes for b in bufs}}
        if cuda:
            measured = torch.cuda.max_memory_allocated()
            predicted = tier_bytes(bufs, "device")
            row.update(measured_peak_device_bytes=measured, predicted_peak_device_bytes=predicted)
        else:
            measured = stats.weights_bytes + head_bytes + stats.kv_cache_bytes + stats.selector_bytes
            predicted = tier_bytes(bufs, "device", include_workspace=False) + tier_bytes(bufs, "host")
            row.update(measured_buffer_bytes=measured, predicted_buffer_bytes=predicted)
        row["relative_error"] = round((predicted - measured) / measured, 5)
        rows.append(row)
        del llm, gen
    worst = max(abs(r["relative_error"]) for r in rows)
    result = {"benchmark": "memory_model", "device": args.device, "machine": machine.describe(),
              "what": "CUDA: peak allocated vs the model's peak" if cuda else
                      "CPU: the runtime's accounting of its buffers vs the model's buffer terms",
              "max_abs_relative_error": worst, "target": 0.05, "rows": rows}
    tmp = out + ".partial"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    os.replace(tmp, out)
    print(f"{'context':>8} {'budget':>7} {'offload':>8} {'predicted MiB':>14} {'measured MiB':>13} {'error':>8}")
    for r in rows:
        pred = r.get("predicted_peak_device_bytes", r.get("predicted_buffer_bytes"))
        meas = r.get("measured_peak_device_bytes", r.get("measured_buffer_bytes"))
        print(f"{r['context_tokens']:>8} {r['budget_tokens']:>7} {r['offload_layers']:>8} {pred / 2**20:>14.1f} "
              f"{meas / 2**20:>13.1f} {r['relative_error']:>8.2%}")
    print(f"worst |error| {worst:.2%} (target 5%); written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
