"""int4 weights against bfloat16 on one device: the dense decode step of a real shape with random
weights (issue 17: "the GPU check gains an int4 decode measurement on the Llama-3.1-8B shape").

Each format builds the model from the same random tensors (N(0, 0.02) matrices, seeded), prefills
``--context`` random tokens in chunks, then times ``--steps`` greedy decode steps (synchronised),
calling the model directly on a DenseKVCache. int4 quantizes the linear layers on load (groups of
32; on CUDA the tensor-core kernel ``aten._weight_int4pack_mm``). It reports decode tokens/s, the
weights' bytes and how far int4's last prefill logits are from bfloat16's (random weights, so no
accuracy claim).

    python bench_edge/bench_int4_gpu.py --device cuda --shape llama-3.1-8b --context 2048 --out int4.json
    python bench_edge/bench_int4_gpu.py --device cpu --shape tiny --context 256      # the flow on a CPU
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def random_tensors(cfg, device, dtype, seed: int) -> dict:
    """Hugging Face-named random weights of ``cfg`` (the names load_checkpoint fuses)."""
    import torch

    gen = torch.Generator(device=device).manual_seed(seed)
    E, I, L, V = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers, cfg.vocab_size
    H, G, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim

    def mat(rows, cols):
        return (torch.randn(rows, cols, generator=gen, device=device, dtype=torch.float32) * 0.02).to(dtype)
    out = {"model.embed_tokens.weight": mat(V, E), "model.norm.weight": torch.ones(E, device=device, dtype=dtype)}
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = mat(V, E)
    for i in range(L):
        p = f"model.layers.{i}."
        out.update({p + "self_attn.q_proj.weight": mat(H * D, E), p + "self_attn.k_proj.weight": mat(G * D, E),
                    p + "self_attn.v_proj.weight": mat(G * D, E), p + "self_attn.o_proj.weight": mat(E, H * D),
                    p + "mlp.gate_proj.weight": mat(I, E), p + "mlp.up_proj.weight": mat(I, E),
                    p + "mlp.down_proj.weight": mat(E, I),
                    p + "input_layernorm.weight": torch.ones(E, device=device, dtype=dtype),
                    p + "post_attention_layernorm.weight": torch.ones(E, device=device, dtype=dtype)})
        if cfg.qk_norm:
            out[p + "self_attn.q_norm.weight"] = torch.ones(D, device=device, dtype=dtype)
            out[p + "self_attn.k_norm.weight"] = torch.ones(D, device=device, dtype=dtype)
    return out


def run(fmt: str, cfg, args) -> tuple[dict, object]:
    import torch

    from specontext.kv.cache import DenseKVCache
    from specontext.model.llama import LlamaForCausalLM

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    model = LlamaForCausalLM(cfg, device="meta")
    t0 = time.perf_counter()
    model.load_checkpoint(random_tensors(cfg, device, dtype, args.seed), dtype, device,
                          quantize_to="int4" if fmt == "int4" else None)
    model.eval()
    sync()
    load_s = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    gen = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, cfg.vocab_size, (1, args.context), generator=gen).to(device)
    cache = DenseKVCache(cfg.num_layers, 1, cfg.num_kv_heads, cfg.head_dim, args.context + args.steps + 4, dtype, device)
    with torch.inference_mode():
        for start in range(0, args.context, args.chunk):
            chunk = ids[:, start:start + args.chunk]
            last = model(chunk, cache.plan_step([chunk.shape[1]]), cache)
        token = last.argmax(-1)[:, None]
        for _ in range(2):  # warm-up steps
            token = model(token, cache.plan_step([1]), cache).argmax(-1)[:, None]
        sync()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            token = model(token, cache.plan_step([1]), cache).argmax(-1)[:, None]
        sync()
        step_s = (time.perf_counter() - t0) / args.steps
    row = {"weights": fmt, "dtype": str(dtype).replace("torch.", ""), "load_s": round(load_s, 2), "decode_ms": round(step_s * 1e3, 3),
           "decode_tokens_per_s": round(1 / step_s, 2), "weight_bytes": model.weight_bytes()}
    if device.type == "cuda":
        row["peak_device_bytes"] = torch.cuda.max_memory_allocated(device)
    return row, last.float().cpu()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--shape", default="llama-3.1-8b", help="a shape of bench_offload_gpu.py (llama-3.1-8b, qwen3-8b, tiny)")
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--chunk", type=int, default=2048, help="prefill chunk tokens")
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    sys.path.insert(0, HERE)
    import torch

    from bench_offload_gpu import SHAPES, hf_config
    from machine import describe
    from specontext.config import ModelConfig

    if args.shape not in SHAPES:
        p.error(f"--shape must be one of {', '.join(sorted(SHAPES))}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA GPU here; use --device cpu --shape tiny")
    cfg = ModelConfig.from_hf_dict(hf_config(args.shape), name=f"random {args.shape}")
    rows, logits = [], {}
    for fmt in ("float", "int4"):
        row, logits[fmt] = run(fmt, cfg, args)
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    ref = logits["float"]
    result = {"benchmark": "int4 against bfloat16 weights, dense decode, random weights", "machine": describe(),
              "settings": vars(args), "rows": rows,
              "int4_speedup": round(rows[0]["decode_ms"] / rows[1]["decode_ms"], 3),
              "last_logits_relative_error": round(((logits["int4"] - ref).abs().max() / ref.abs().max()).item(), 4),
              "last_top1_equal": bool(logits["int4"].argmax(-1).eq(ref.argmax(-1)).all())}
    print(json.dumps({k: result[k] for k in ("int4_speedup", "last_logits_relative_error", "last_top1_equal")}))
    if args.out:
        tmp = args.out + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
        os.replace(tmp, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
