"""The GPU part of bench_e2e.py: the paper's [input, output] settings at real shapes, against peers.

Run through ``python bench_edge/bench_e2e.py gpu ...`` (see that file's docstring). A logic check
without a GPU: ``python bench_edge/bench_e2e.py gpu --device cpu --shape tiny --setting 256,256
--requests 2 --steps-sampled 2``.

How a long output is timed without generating all of it: R prompts of ``input`` random tokens are
prefilled (timed in full, all requests). Then at 5 points along the output (o = 0, O/4, O/2,
3O/4, O - K) the cache is brought to ``input + o`` tokens per request by prefilling random tokens
(not timed) and K decode steps are timed. Decode time is the integral of the step time over the
output (trapezoids through the 5 points), so end-to-end tokens/s = R * O / (prefill + decode).
Every engine is timed the same way, so the ratios compare like with like.

Engines (one process, models sharing the same random weights):

* ``specontext``: our engine, retrieval-head selection at --budget; the memory manager places
  layers (``adaptive_offload`` on the detected device profile), so KV beyond device memory lives
  in pinned host memory with elastic, asynchronous loading;
* ``dense``: our engine, every past token, the same placement policy;
* ``hf-sdpa``: transformers with SDPA attention and its dynamic cache (all KV on the device);
* ``hf-offloaded``: transformers with its offloaded cache (``OffloadedCache`` in 4.x,
  ``DynamicCache(offloading=True)`` in 5.x: KV on the host, whole layers prefetched one ahead).

For each, R is --requests if given, else the largest R (powers of two up to 64) that runs: for
our engine from the memory plan, for transformers by trying (an out-of-memory error halves R).
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SETTINGS = {"2k,16k": (2048, 16384), "2k,32k": (2048, 32768), "16k,2k": (16384, 2048), "32k,2k": (32768, 2048)}
ENGINES = ("specontext", "dense", "hf-sdpa", "hf-offloaded")


def add_arguments(p) -> None:
    p.add_argument("--shape", default="llama-3.1-8b", help="llama-3.1-8b, qwen3-8b, llama-3.2-1b or tiny")
    p.add_argument("--setting", default="2k,32k", help="input,output tokens: 2k,16k / 2k,32k / 16k,2k / 32k,2k, "
                                                        "or two integers")
    p.add_argument("--budget", type=int, default=2048)
    p.add_argument("--requests", type=int, default=0, help="requests decoding together (0: the most that fit)")
    p.add_argument("--engines", default=",".join(ENGINES), help="comma-separated among " + ", ".join(ENGINES))
    p.add_argument("--steps-sampled", type=int, default=8, help="decode steps timed at each of 5 output points")
    p.add_argument("--edge", action="store_true", help="cap the device at 4 GB (the paper's edge setting)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="default: bench_edge/results/e2e_gpu_SHAPE_SETTING.json")


def parse_setting(text: str) -> tuple[int, int]:
    if text in SETTINGS:
        return SETTINGS[text]
    try:
        a, b = (int(v) for v in text.split(","))
    except ValueError:
        raise SystemExit(f"--setting must be one of {', '.join(SETTINGS)} or two integers, got {text!r}") from None
    return a, b


def _sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError" or "out of memory" in str(exc)


def output_points(output_tokens: int, steps: int) -> list[int]:
    last = max(output_tokens - steps, 0)
    return sorted({0, last // 4, last // 2, 3 * last // 4, last})


def integrate(points: list[int], step_s: list[float], output_tokens: int) -> float:
    """Decode seconds for ``output_tokens`` tokens from step times measured at ``points``."""
    if len(points) == 1:
        return step_s[0] * output_tokens
    total = 0.0
    for (a, ta), (b, tb) in zip(zip(points, step_s), zip(points[1:], step_s[1:])):
        total += (b - a) * (ta + tb) / 2
    return total + (output_tokens - points[-1]) * step_s[-1]


class OursRunner:
    """Our engine at R requests: prefill, fast-forward, time K steps."""

    def __init__(self, model, cfg, head, mode, args, requests, capacity, profile):
        from specontext.engine import Engine
        from specontext.settings import RuntimeSettings

        dtype = "float16" if args.device != "cpu" else "float32"
        settings = RuntimeSettings(device=args.device, dtype=dtype, prefill_chunk_tokens=2048,
                                   sparsity="specontext" if mode == "specontext" else "dense",
                                   budget_tokens=args.budget, slot_pool=1.25, adaptive_offload=profile is not None,
                                   device_profile=profile or "auto")
        self.engine = Engine(model, None, settings, sparsity=settings.sparsity_options(),
                             retrieval_head=head if mode == "specontext" else None)
        self.requests, self.device = requests, args.device
        self.cache = self.engine.new_cache(capacity, batch_size=requests)
        self.selector = self.engine.new_selector(capacity, batch_size=requests, cache=self.cache)

    def prefill(self, rows):
        return self.engine.prefill_rows(rows, self.cache, selector=self.selector)

    def steps(self, tokens):
        import torch

        model = self.engine.model
        for t in tokens:
            x = torch.tensor([[t]] * self.requests, dtype=torch.int64, device=model.device)
            plan = self.cache.plan_step([1] * self.requests)
            plan.selection = self.selector.select(x, plan)
            captured: dict = {}
            model(x, plan, self.cache, capture_layers=self.selector.capture_layers, captured=captured)
            self.selector.observe(x, plan, captured)

    def extra(self) -> dict:
        out = {}
        if hasattr(self.cache, "transfer_stats"):
            out["transfers"] = self.cache.transfer_stats()
            out["kv_device_bytes"], out["kv_host_bytes"] = self.cache.device_bytes(), self.cache.host_bytes()
        return out


class HFRunner:
    """transformers at R requests with a dynamic (device) or offloaded (host) cache."""

    def __init__(self, hf, offloaded: bool, requests: int, device):
        import transformers

        self.hf, self.requests, self.device = hf, requests, device
        if not offloaded:
            self.cache = transformers.DynamicCache()
        elif hasattr(transformers, "OffloadedCache"):  # transformers 4.x
            self.cache = transformers.OffloadedCache()
        else:  # transformers 5: the dynamic cache with layer offloading (what generate's "offloaded" builds)
            self.cache = transformers.DynamicCache(config=hf.config, offloading=True)

    def prefill(self, rows):
        import torch

        ids = torch.tensor(rows, device=self.device)
        for start in range(0, ids.shape[1], 2048):
            with torch.no_grad():
                self.hf(ids[:, start:start + 2048], past_key_values=self.cache, use_cache=True)

    def steps(self, tokens):
        import torch

        for t in tokens:
            with torch.no_grad():
                self.hf(torch.full((self.requests, 1), t, device=self.device), past_key_values=self.cache,
                        use_cache=True)

    def extra(self) -> dict:
        return {}


def time_engine(make_runner, input_tokens, output_tokens, requests, args, vocab) -> dict:
    import torch

    gen = torch.Generator().manual_seed(args.seed)
    rand = lambda n: torch.randint(3, vocab, (requests, n), generator=gen).tolist()  # noqa: E731
    if torch.device(args.device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(args.device)
    runner = make_runner(requests, input_tokens + output_tokens + 1)
    _sync(args.device)
    t0 = time.perf_counter()
    runner.prefill(rand(input_tokens))
    _sync(args.device)
    prefill_s = time.perf_counter() - t0
    K = args.steps_sampled
    points = output_points(output_tokens, K)
    reached, step_s = 0, []
    for o in points:
        if o > reached:
            runner.prefill(rand(o - reached))  # fast-forward, not timed
            reached = o
        tokens = torch.randint(3, vocab, (K + 1,), generator=gen).tolist()
        runner.steps(tokens[:1])  # warm-up at this length
        _sync(args.device)
        t0 = time.perf_counter()
        runner.steps(tokens[1:])
        _sync(args.device)
        step_s.append((time.perf_counter() - t0) / K)
        reached += K + 1
    decode_s = integrate(points, step_s, output_tokens)
    row = {"requests": requests, "prefill_s": round(prefill_s, 4), "decode_s_integrated": round(decode_s, 4),
           "step_s_at_points": dict(zip(map(str, points), [round(s, 6) for s in step_s])),
           "time_per_output_token_s": round(decode_s / output_tokens, 6),
           "tokens_per_s": round(requests * output_tokens / (prefill_s + decode_s), 3),
           "decode_tokens_per_s": round(requests * output_tokens / decode_s, 3), **runner.extra()}
    if torch.device(args.device).type == "cuda":
        row["peak_device_bytes"] = torch.cuda.max_memory_allocated(args.device)
    import resource

    row["peak_host_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    del runner
    gc.collect()
    if torch.device(args.device).type == "cuda":
        torch.cuda.empty_cache()
    return row


def run(args) -> int:
    import torch

    sys.path.insert(0, HERE)
    import bench_offload_gpu
    from bench_e2e import measure_bandwidth, step_bytes, write_json
    from machine import describe

    if args.device != "cpu" and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU here; for a logic check: --device cpu --shape tiny --setting 256,256 "
                         "--requests 2 --steps-sampled 2")
    input_tokens, output_tokens = parse_setting(args.setting)
    engines = [e for e in args.engines.split(",") if e]
    bad = [e for e in engines if e not in ENGINES]
    if bad:
        raise SystemExit(f"--engines must be among {', '.join(ENGINES)}, got {bad[0]!r}")
    if args.edge:
        if args.device == "cpu":
            raise SystemExit("--edge caps GPU memory; it needs --device cuda")
        total = torch.cuda.get_device_properties(args.device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(4 * 2**30 / total, 1.0), args.device)
    # One engine's model on the device at a time (the 4 GB edge cap must hold only it): weights are
    # drawn on the CPU with a fixed seed, so every engine gets the same ones.
    dtype = torch.float16 if args.device != "cpu" else torch.float32

    def hf_model():
        return bench_offload_gpu.random_hf_model(args.shape, args.seed, "cpu", torch.float32).to(args.device, dtype)

    def ours_model():
        hf = bench_offload_gpu.random_hf_model(args.shape, args.seed, "cpu", torch.float32)
        tensors = dict(hf.state_dict())
        del hf
        return bench_offload_gpu.our_model(args.shape, tensors, dtype, args.device)

    from specontext.config import ModelConfig

    cfg = ModelConfig.from_hf_dict(bench_offload_gpu.hf_config(args.shape), name=f"random {args.shape}")
    head = bench_offload_gpu.random_head(cfg, args.device, dtype)
    weights = _weights_bytes(cfg, dtype)
    profile = _device_profile(args) if args.device != "cpu" else None
    bandwidth = measure_bandwidth(args.device)
    out = {"benchmark": "end-to-end generation, paper settings", "machine": describe(),
           "settings": {k: v for k, v in vars(args).items() if k != "func"},
           "input_tokens": input_tokens, "output_tokens": output_tokens, "shape": args.shape,
           "weights_bytes": weights, "memory_bandwidth_bytes_per_s": round(bandwidth), "engines": {}}

    loaded: dict = {}

    def model_for(engine):
        kind = "ours" if engine in ("specontext", "dense") else "hf"
        if kind not in loaded:
            loaded.clear()  # free the other engine's model first
            gc.collect()
            if torch.device(args.device).type == "cuda":
                torch.cuda.empty_cache()
            loaded[kind] = ours_model()[0] if kind == "ours" else hf_model()
        return loaded[kind]

    def ours_runner(mode):
        return lambda R, cap: OursRunner(model_for(mode), cfg, head, mode, args, R, cap, profile)

    def hf_runner(offloaded):
        return lambda R, cap: HFRunner(model_for("hf-offloaded" if offloaded else "hf-sdpa"), offloaded, R,
                                       args.device)

    makers = {"specontext": ours_runner("specontext"), "dense": ours_runner("dense"),
              "hf-sdpa": hf_runner(False), "hf-offloaded": hf_runner(True)}
    for engine in engines:
        R = args.requests or _planned_requests(engine, cfg, head, args, input_tokens + output_tokens, weights, profile)
        row = None
        while R >= 1:
            try:
                row = time_engine(makers[engine], input_tokens, output_tokens, R, args, cfg.vocab_size)
                break
            except Exception as exc:  # noqa: BLE001 - out of memory halves R; anything else is reported
                if not _is_oom(exc):
                    row = {"requests": R, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
                    break
                gc.collect()
                if torch.device(args.device).type == "cuda":
                    torch.cuda.empty_cache()
                R //= 2
        if row is None:
            row = {"error": "out of memory even with 1 request"}
        if "time_per_output_token_s" in row:
            mode = "dense" if engine != "specontext" else "specontext"
            mid = input_tokens + output_tokens // 2
            read = step_bytes(cfg, weights, dtype.itemsize, mid, mode, args.budget, head, row["requests"])
            row["bytes_read_per_step"] = read
            row["roofline_step_s"] = round(read / bandwidth, 6)
            row["roofline_fraction"] = round(row["roofline_step_s"] / row["time_per_output_token_s"], 3)
        out["engines"][engine] = row
        print(f"{engine:13s} {json.dumps(row)[:300]}", file=sys.stderr, flush=True)
    out["ratios"] = _ratios(out["engines"])
    path = args.out or os.path.join(HERE, "results", f"e2e_gpu_{args.shape}_{input_tokens}_{output_tokens}"
                                    f"{'_edge' if args.edge else ''}.json")
    write_json(out, path)
    print(json.dumps({"engines": {k: {x: v.get(x) for x in ("requests", "tokens_per_s", "time_per_output_token_s",
                                                             "roofline_fraction", "error")}
                                  for k, v in out["engines"].items()}, "ratios": out["ratios"]}, indent=1))
    print(f"results: {path}")
    return 0


def _weights_bytes(cfg, dtype) -> int:
    """Parameter bytes of our decoder of ``cfg`` (counted on the meta device, nothing allocated)."""
    import torch

    from specontext.model.llama import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    size = torch.empty(0, dtype=dtype).element_size()
    tied = model.lm_head.weight.numel() if cfg.tie_word_embeddings else 0  # tied at load time, not on meta
    return (sum(p.numel() for p in model.parameters()) - tied) * size


def _device_profile(args) -> str | None:
    """A profile for the memory manager: 'auto' (NVML), or for --edge a 4 GB device profile file."""
    if not args.edge:
        return "auto"
    from specontext.planner.profiles import load_profile

    base = load_profile("auto").to_dict()
    base.update(name=f"{base['name']} capped at 4 GB", device_memory_gib=4.0,
                reserved_device_gib=min(base["reserved_device_gib"], 0.5))
    path = os.path.join(HERE, "results", ".edge_profile.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(base, f)
    return path


def _planned_requests(engine, cfg, head, args, length, weights, profile) -> int:
    """Largest power-of-two R (<= 64) whose plan fits: our planner for our engines; for transformers
    the KV of every layer on the device (its dynamic cache) or one layer ahead (offloaded)."""
    import torch

    if engine in ("specontext", "dense") and profile is not None:
        from specontext.errors import SpecontextError
        from specontext.planner.manager import schedule_layers
        from specontext.planner.memory import HeadShape
        from specontext.planner.profiles import load_profile

        device_profile = load_profile(profile)
        head_shape = HeadShape.from_config(head.config) if engine == "specontext" else None
        for R in (64, 32, 16, 8, 4, 2, 1):
            try:
                schedule_layers(cfg, device_profile, capacity_tokens=length, batch_size=R, dtype=torch.float16,
                                sparsity=engine, budget_tokens=args.budget, head=head_shape, slot_pool=1.25,
                                block_tokens=1, prefill_chunk_tokens=2048, weights_bytes=weights,
                                fused_attention=True)
                return R
            except SpecontextError:  # the planner refuses what does not fit
                continue
        return 1
    free = torch.cuda.mem_get_info(args.device)[0] if args.device != "cpu" else 8 * 2**30
    per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 2
    if engine == "hf-offloaded":
        per_token //= cfg.num_layers  # roughly two layers resident at a time
    for R in (64, 32, 16, 8, 4, 2, 1):
        if R * length * per_token * 1.2 < free:
            return R
    return 1


def _ratios(engines: dict) -> dict:
    def tps(name):
        return engines.get(name, {}).get("tokens_per_s")

    out = {}
    for peer in ("dense", "hf-sdpa", "hf-offloaded"):
        if tps("specontext") and tps(peer):
            out[f"specontext_over_{peer}"] = round(tps("specontext") / tps(peer), 3)
    return out
