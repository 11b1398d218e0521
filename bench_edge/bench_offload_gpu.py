"""Offloaded decoding at real shapes on a GPU: the copy kernel's bandwidth, the transfer time the
asynchronous pipeline hides, and decode speed against Hugging Face transformers' OffloadedCache.

    python bench_edge/bench_offload_gpu.py                                  # Llama-3.1-8B shape, 32k, H100-class GPU
    python bench_edge/bench_offload_gpu.py --shape tiny --device cpu --context 512 --steps 8 --no-hf   # logic check

Weights are random (no hub access), built from the published config values of --shape, in
float16; the same weights serve transformers and specontext (ours are loaded from the
transformers model's state dict). The prompt is random token ids; decode steps are teacher-forced
with random ids, so every configuration runs the same steps. Per configuration:

* kernel: one offloaded layer's K and V planes in pinned host memory, a step's fetch list of
  --fetch-rows random rows of head_dim float16 values (256 bytes at head_dim 128) into device
  slots: the native kernel (spc_cuda_copy_rows_planes), cudaMemcpyAsync per run
  (spc_cuda_memcpy_rows_planes), and one contiguous cudaMemcpy of the same bytes (the link's
  ceiling), timed with CUDA events;
* decode: time per decode step at --context with specontext selection (B = --budget) for the
  device-resident cache, for --offload-layers layers offloaded with the async copy stream, and the
  same with copies inline on the compute stream. hidden = 1 - (async - resident) / (inline -
  resident): the fraction of the transfer time the pipeline hides (target >= 0.8);
* transformers: greedy generation with cache_implementation="offloaded" (all layers' KV on the
  CPU, prefetched a layer ahead) from the same prompt: decode time per token is the time for
  --steps + 1 tokens minus the time for 1 token (prefill), over --steps.

Writes JSON with the machine description to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

# Published config values (config.json of each model), for random-weight models of that shape.
SHAPES = {
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=128, vocab_size=128256, max_position_embeddings=131072,
                         rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False,
                         rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=64, vocab_size=128256, max_position_embeddings=131072,
                         rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=True,
                         rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    # Qwen3-8B: q/k RMSNorm, head_dim 128 given explicitly (4096 / 32 heads happens to agree)
    "qwen3-8b": dict(model_type="qwen3", hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                     max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1000000.0,
                     tie_word_embeddings=False),
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=6, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=32, vocab_size=1000, max_position_embeddings=4096,
                 rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False),
}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama-3.1-8b")
    p.add_argument("--context", type=int, default=32768)
    p.add_argument("--steps", type=int, default=64, help="decode steps timed per configuration")
    p.add_argument("--budget", type=int, default=2048)
    p.add_argument("--slot-pool", type=float, default=1.25)
    p.add_argument("--offload-layers", type=int, default=0, help="0: all but the first quarter of the layers")
    p.add_argument("--fetch-rows", type=int, default=8 * 300, help="rows per fetch in the kernel test (KV heads x diff)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--no-hf", action="store_true", help="skip transformers")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join(HERE, "results", "offload_gpu.json"))
    return p.parse_args(argv)


def hf_config(shape: str) -> dict:
    family = SHAPES[shape].get("model_type", "llama")
    arch = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}[family]
    return {"architectures": [arch], "model_type": family, "torch_dtype": "float16",
            "bos_token_id": 1, "eos_token_id": 2, **SHAPES[shape]}


def random_hf_model(shape: str, seed: int, device, dtype):
    """A transformers model of ``shape`` with random weights (N(0, 0.02) matrices), in eval mode.

    The same (shape, seed) gives the same weights when built on the same device type.
    """
    import torch
    import transformers

    torch.manual_seed(seed)
    raw = hf_config(shape)
    prefix = {"llama": "Llama", "qwen3": "Qwen3"}[raw["model_type"]]
    hf_cfg = getattr(transformers, f"{prefix}Config")(
        **{k: v for k, v in raw.items() if k not in ("architectures", "torch_dtype", "model_type")})
    hf_cfg._attn_implementation = "sdpa"
    with torch.device(device):
        hf = getattr(transformers, f"{prefix}ForCausalLM")(hf_cfg).to(dtype)
    with torch.no_grad():  # default init is tuned for training; keep activations in float16 range
        for name, p in hf.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.02)
    return hf.eval()


def our_model(shape: str, tensors: dict, dtype, device):
    """Our decoder of ``shape`` from Hugging Face-named ``tensors`` (consumed), on ``device``."""
    from specontext.config import ModelConfig
    from specontext.model.llama import LlamaForCausalLM

    cfg = ModelConfig.from_hf_dict(hf_config(shape), name=f"random {shape}")
    ours = LlamaForCausalLM(cfg)
    ours.load_checkpoint(tensors, dtype, device)
    return ours.eval(), cfg


def build_models(args):
    """(transformers model, our model, ModelConfig) sharing random float16 weights on the device."""
    import torch

    dtype = torch.float16 if args.device != "cpu" else torch.float32
    hf = random_hf_model(args.shape, args.seed, args.device, dtype)
    ours, cfg = our_model(args.shape, dict(hf.state_dict()), dtype, args.device)
    return hf, ours, cfg


def random_head(cfg, device, dtype):
    import torch

    from specontext.retrieval.head import RetrievalHead, RetrievalHeadConfig, TargetInfo

    L, H, G = cfg.num_layers, cfg.num_heads, cfg.num_kv_heads
    head_cfg = RetrievalHeadConfig(target=TargetInfo.of(cfg, "random"), input_kind="embedding+hidden",
                                   hidden_layers=(1, L // 2 - 1, L - 4), num_heads=H, num_kv_heads=G,
                                   head_dim=cfg.head_dim, kv_group_of_head=tuple(h // (H // G) for h in range(H)))
    head = RetrievalHead(head_cfg)
    with torch.no_grad():
        for p in head.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.02)
    return head.to(device=device, dtype=dtype).eval()


def sync(device):
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_decode(model, cfg, head, args, prefix, continuation, **settings) -> dict:
    import torch

    from specontext.engine import Engine
    from specontext.retrieval.selection import SparsityOptions
    from specontext.settings import RuntimeSettings

    dtype = "float16" if args.device != "cpu" else "float32"
    opts = SparsityOptions(method="specontext", budget_tokens=args.budget)
    engine = Engine(model, None, RuntimeSettings(device=args.device, dtype=dtype, prefill_chunk_tokens=4096,
                                                 sparsity="specontext", budget_tokens=args.budget, **settings),
                    sparsity=opts, retrieval_head=head)
    if torch.device(args.device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(args.device)
    t0 = time.perf_counter()
    state = engine.prefill_state(prefix, len(prefix) + len(continuation))
    sync(args.device)
    prefill_s = time.perf_counter() - t0
    engine.teacher_forced(prefix, continuation[:4], state=state)  # warm-up
    sync(args.device)
    t0 = time.perf_counter()
    engine.teacher_forced(prefix, continuation, state=state)
    sync(args.device)
    step_s = (time.perf_counter() - t0) / (len(continuation) - 1)
    row = {"settings": settings, "prefill_s": round(prefill_s, 3), "decode_step_s": round(step_s, 6),
           "decode_tokens_per_s": round(1 / step_s, 3)}
    if torch.device(args.device).type == "cuda":
        row["peak_device_bytes"] = torch.cuda.max_memory_allocated(args.device)
    cache = state.cache
    if hasattr(cache, "transfer_stats"):
        row["transfers"] = cache.transfer_stats()
        row["kv_device_bytes"], row["kv_host_bytes"] = cache.device_bytes(), cache.host_bytes()
    del state, engine
    return row


def time_hf_offloaded(hf, args, prefix, steps: int) -> dict:
    import torch

    ids = torch.tensor([prefix], device=args.device)

    def run(n):
        sync(args.device)
        t0 = time.perf_counter()
        hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, cache_implementation="offloaded",
                    pad_token_id=0)
        sync(args.device)
        return time.perf_counter() - t0

    run(2)  # warm-up
    one = run(1)
    full = run(steps + 1)
    step_s = (full - one) / steps
    return {"prefill_s": round(one, 3), "decode_step_s": round(step_s, 6), "decode_tokens_per_s": round(1 / step_s, 3)}


def time_kernel(cfg, args) -> dict:
    """Host pinned planes -> device slots for one offloaded layer: kernel vs memcpy vs one copy."""
    import torch

    from specontext import native

    D, G = cfg.head_dim, cfg.num_kv_heads
    S, P = args.context, int(args.budget * args.slot_pool)
    host = torch.randn(2, G * S, D, dtype=torch.float16).pin_memory()
    slots = torch.empty(2, G * P, D, dtype=torch.float16, device=args.device)
    n = min(args.fetch_rows, G * P)
    gen = torch.Generator().manual_seed(args.seed)
    src = torch.randperm(G * S, generator=gen)[:n].contiguous()
    dst = torch.randperm(G * P, generator=gen)[:n].contiguous()
    src_d, dst_d = src.to(args.device), dst.to(args.device)
    flat = host.view(-1)[:2 * n * D]
    out = torch.empty_like(flat, device=args.device)
    moved = 2 * n * D * 2

    def timed(fn, reps=50):
        fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / reps

    kernel = timed(lambda: native.copy_rows_planes(host, src_d, slots, dst_d))
    memcpy_runs = timed(lambda: native.copy_rows_planes(host, src, slots, dst, method="memcpy"), reps=10)
    contiguous = timed(lambda: out.copy_(flat, non_blocking=True))
    gbps = lambda t: round(moved / t / 1e9, 2)  # noqa: E731
    return {"rows": n, "row_bytes": D * 2, "planes": 2, "bytes": moved,
            "kernel_s": kernel, "kernel_gbps": gbps(kernel),
            "memcpy_per_row_s": memcpy_runs, "memcpy_per_row_gbps": gbps(memcpy_runs),
            "contiguous_copy_s": contiguous, "contiguous_copy_gbps": gbps(contiguous),
            "kernel_fraction_of_contiguous": round(contiguous / kernel, 3)}


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from machine import describe

    if args.device != "cpu" and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU here; run with --device cpu --shape tiny for a logic check")
    out = {"benchmark": "offloaded decode at real shapes", "machine": describe(), "settings": vars(args)}
    hf, ours, cfg = build_models(args)
    L = cfg.num_layers
    offload = args.offload_layers or L - L // 4
    out["model"] = {"shape": args.shape, "layers": L, "offloaded_layers": offload,
                    "weights_bytes": sum(p.numel() * p.element_size() for p in ours.parameters())}
    dtype = next(ours.parameters()).dtype
    head = random_head(cfg, args.device, dtype)
    gen = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(3, cfg.vocab_size, (args.context + args.steps + 1,), generator=gen).tolist()
    prefix, continuation = ids[:args.context], ids[args.context:]
    if args.device != "cpu":
        out["kernel"] = time_kernel(cfg, args)
    rows = {}
    rows["resident"] = time_decode(ours, cfg, head, args, prefix, continuation)
    rows["offloaded_async"] = time_decode(ours, cfg, head, args, prefix, continuation, offload_layers=offload,
                                          slot_pool=args.slot_pool)
    rows["offloaded_inline"] = time_decode(ours, cfg, head, args, prefix, continuation, offload_layers=offload,
                                           slot_pool=args.slot_pool, async_prefetch=False)
    base = rows["resident"]["decode_step_s"]
    added_async = rows["offloaded_async"]["decode_step_s"] - base
    added_inline = rows["offloaded_inline"]["decode_step_s"] - base
    out["decode"] = rows
    out["hidden_fraction_of_transfer_time"] = round(1 - added_async / added_inline, 3) if added_inline > 0 else None
    if not args.no_hf:
        out["transformers_offloaded"] = time_hf_offloaded(hf, args, prefix, args.steps)
        out["speedup_vs_transformers_offloaded"] = round(
            out["transformers_offloaded"]["decode_step_s"] / rows["offloaded_async"]["decode_step_s"], 2)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(out, f, indent=1)
        f.write("\n")
    print(json.dumps({k: v for k, v in out.items() if k not in ("machine", "settings")}, indent=1))
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
