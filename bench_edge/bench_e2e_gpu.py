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

For each, R is --requests if given, else the largest R (powers of two up to 64) that fits both
device memory and host memory, the host's being what psutil reports available (within a container's
cgroup limit) when the engine
starts, less a margin (:func:`usable_host_bytes`): for our engines by the memory planner
(pinned host KV included), for transformers by counting its cache (:func:`hf_memory_bytes`: on
the host, every layer's KV in pinned blocks of a power of two). A device out-of-memory error
still halves R; the host is never overcommitted by trying, since the kernel's OOM killer ends
the process instead of raising.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
GIB = 2**30
REQUEST_CHOICES = (64, 32, 16, 8, 4, 2, 1)
PREFILL_CHUNK_TOKENS = 2048  # every engine prefills in chunks of this many tokens per request
SLOT_POOL = 1.25  # our engines' slot pool, P / K
# Host memory kept free besides what an engine's plan counts: the process itself (Python, torch,
# the CUDA context and its own pinned staging), the page cache others need; 10 %, at least 4 GiB.
HOST_MARGIN_FRACTION, HOST_MARGIN_MIN_BYTES = 0.10, 4 * GIB
# transformers' device working set is estimated term by term (hf_memory_bytes); 10 % on top
# covers what it leaves out (its allocator's fragmentation, small buffers). Our engines' plans
# count their device memory exactly and leave the profile's reserve.
HF_DEVICE_MARGIN = 1.10
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


def our_settings(args, mode: str, profile: str | None = None):
    """Our engine's RuntimeSettings for ``mode`` (specontext or dense); with a ``profile`` file, the
    memory manager places layers by it."""
    from specontext.settings import RuntimeSettings

    return RuntimeSettings(device=args.device, dtype="float16" if args.device != "cpu" else "float32",
                           prefill_chunk_tokens=PREFILL_CHUNK_TOKENS, sparsity=mode, budget_tokens=args.budget,
                           slot_pool=SLOT_POOL, adaptive_offload=profile is not None, device_profile=profile or "auto")


class OursRunner:
    """Our engine at R requests: prefill, fast-forward, time K steps."""

    def __init__(self, model, cfg, head, mode, args, requests, capacity, profile):
        from specontext.engine import Engine

        settings = our_settings(args, mode, profile)
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
            self.engine.step(x, [1] * self.requests, self.cache, self.selector, decode=True)

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
        for start in range(0, ids.shape[1], PREFILL_CHUNK_TOKENS):
            with torch.no_grad():
                self.hf(ids[:, start:start + PREFILL_CHUNK_TOKENS], past_key_values=self.cache, use_cache=True)

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
    _release_memory(args.device)
    return row


def _release_memory(device) -> None:
    """Give back the device's cached blocks and the pinned host blocks torch keeps for reuse
    (its caching host allocator never returns them otherwise), so the next engine's plan, which
    reads the host's available memory, sees them free."""
    import torch

    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        if hasattr(torch._C, "_host_emptyCache"):  # torch >= 2.5, CUDA builds
            torch._C._host_emptyCache()


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
    # One engine's model on the device at a time. Weights are drawn with a fixed seed on one device
    # type, so every engine gets the same ones: on the GPU directly in float16 (an 8B model in
    # seconds, with no float32 copy), except under the 4 GB edge cap, which must hold one model
    # only (drawn on the CPU in float32, then moved).
    dtype = torch.float16 if args.device != "cpu" else torch.float32
    build_device, build_dtype = ("cpu", torch.float32) if args.edge else (args.device, dtype)

    def hf_model():
        return bench_offload_gpu.random_hf_model(args.shape, args.seed, build_device, build_dtype).to(args.device, dtype)

    def ours_model():
        hf = bench_offload_gpu.random_hf_model(args.shape, args.seed, build_device, build_dtype)
        tensors = dict(hf.state_dict())
        del hf
        return bench_offload_gpu.our_model(args.shape, tensors, dtype, args.device)

    from specontext.config import ModelConfig

    cfg = ModelConfig.from_hf_dict(bench_offload_gpu.hf_config(args.shape), name=f"random {args.shape}")
    head = bench_offload_gpu.random_head(cfg, args.device, dtype)
    weights = _weights_bytes(cfg, dtype)
    runtime_profile: list = [None]  # the profile file our engines place layers by (None on CPU: no offload)
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
        return lambda R, cap: OursRunner(model_for(mode), cfg, head, mode, args, R, cap, runtime_profile[0])

    def hf_runner(offloaded):
        return lambda R, cap: HFRunner(model_for("hf-offloaded" if offloaded else "hf-sdpa"), offloaded, R,
                                       args.device)

    makers = {"specontext": ours_runner("specontext"), "dense": ours_runner("dense"),
              "hf-sdpa": hf_runner(False), "hf-offloaded": hf_runner(True)}
    from specontext.planner.profiles import host_memory_bytes

    head_shape = None
    if "specontext" in engines:
        from specontext.planner.memory import HeadShape

        head_shape = HeadShape.from_config(head.config)
    path = args.out or os.path.join(HERE, "results", f"e2e_gpu_{args.shape}_{input_tokens}_{output_tokens}"
                                    f"{'_edge' if args.edge else ''}.json")
    t_start = time.perf_counter()
    for engine in engines:
        _release_memory(args.device)
        profile = _device_profile(args, usable_host_bytes(host_memory_bytes(available=True)))
        runtime_profile[0] = _profile_file(profile) if args.device != "cpu" else None
        options = our_settings(args, engine).sparsity_options() if engine in ("specontext", "dense") else None
        R = args.requests or planned_requests(
            engine, cfg, profile, seq_tokens=input_tokens + output_tokens + 1, weights_bytes=weights,
            element_bytes=dtype.itemsize, options=options, head=head_shape,
            fused_attention=torch.device(args.device).type == "cuda")
        if R == 0:
            out["engines"][engine] = {"error": f"no request count fits {_gib(profile.device_budget_bytes)} of device "
                                               f"and {_gib(profile.host_budget_bytes)} of host memory"}
            print(f"{engine:13s} {json.dumps(out['engines'][engine])}", file=sys.stderr, flush=True)
            continue
        print(f"[{time.perf_counter() - t_start:6.0f}s] {engine}: {R} requests", file=sys.stderr, flush=True)
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
        out["ratios"] = _ratios(out["engines"])
        write_json(out, path)  # after every engine, so a run stopped later keeps the earlier ones
        print(f"[{time.perf_counter() - t_start:6.0f}s] {engine:13s} {json.dumps(row)[:300]}", file=sys.stderr,
              flush=True)
    out["ratios"] = _ratios(out["engines"])
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


def _gib(num_bytes: int) -> str:
    return f"{num_bytes / GIB:,.1f} GiB"


def usable_host_bytes(available_bytes: int) -> int:
    """Host memory an engine may fill: ``available_bytes`` (available memory, within the cgroup limit) less
    HOST_MARGIN_FRACTION of it, and at least HOST_MARGIN_MIN_BYTES less."""
    margin = max(int(HOST_MARGIN_FRACTION * available_bytes), HOST_MARGIN_MIN_BYTES)
    return max(available_bytes - margin, 0)


def _device_profile(args, host_bytes: int):
    """The profile our engines plan and place by: the detected GPU (4 GB with --edge) whose host
    memory is ``host_bytes``; for --device cpu, the CPU with ``host_bytes`` as its one pool."""
    from specontext.planner.profiles import DeviceProfile, load_profile

    host_gib = max(host_bytes, 1) / GIB  # a profile's memory must be > 0; 1 byte fits nothing
    if args.device == "cpu":
        base = load_profile("cpu").to_dict()
        base.update(name="cpu, available memory", device_memory_gib=host_gib, reserved_device_gib=0.0,
                    host_memory_gib=host_gib, reserved_host_gib=0.0)
        return DeviceProfile(**base)
    base = load_profile("auto").to_dict()
    if base["kind"] != "cuda":  # no NVML here: the GPU's memory from torch, the rest from a shipped profile
        import torch

        props = torch.cuda.get_device_properties(args.device)
        base = {**load_profile("h100-80gb").to_dict(), "name": "detected-gpu (torch)", "description": props.name,
                "device_memory_gib": props.total_memory / GIB, "source": "memory from torch (no NVML); "
                "bandwidths assumed as in the shipped h100-80gb profile"}
    base.update(host_memory_gib=host_gib, reserved_host_gib=0.0,
                source=base["source"] + "; host memory: available now (psutil, cgroup limit) less a margin")
    if args.edge:
        base.update(name=f"{base['name']} capped at 4 GB", device_memory_gib=4.0,
                    reserved_device_gib=min(base["reserved_device_gib"], 0.5))
    return DeviceProfile(**base)


def _profile_file(profile) -> str:
    """``profile`` as a JSON file (one per process, rewritten), for RuntimeSettings.device_profile:
    the runtime places layers by the same profile the request count was planned with."""
    import tempfile

    path = os.path.join(tempfile.gettempdir(), f"specontext-e2e-profile-{os.getpid()}.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(profile.to_dict(), f)
    return path


def largest_requests(fits, choices=REQUEST_CHOICES) -> int:
    """The first R of ``choices`` (largest first) for which ``fits(R)``; 0 if none does."""
    return next((R for R in choices if fits(R)), 0)


def hf_memory_bytes(cfg, requests: int, seq_tokens: int, chunk_tokens: int, element_bytes: int, weights_bytes: int,
                    offloaded: bool) -> tuple[int, int]:
    """(device, host) bytes of transformers' model with SDPA attention and its dynamic cache (every
    layer's KV on the device) or its offloaded cache (every layer's KV on the host), at R =
    ``requests`` rows of ``seq_tokens``, prefilled in chunks of ``chunk_tokens``.

    Host (offloaded): each layer's K and V leave the device by ``.to("cpu", non_blocking=True)``,
    which allocates them pinned from torch's caching host allocator, one block each rounded up to
    a power of two (``pinned_block_bytes``), plus the pair being copied. That allocator reuses a
    freed block only for a request of the same power of two and never returns it, so the blocks
    of the shorter caches it grew through stay pinned: at most as much again (a geometric sum).

    Device: the weights; the KV of every layer plus the concatenation that appends to one
    (dynamic) or of the layers in flight (offloaded: the one computing, the one prefetched, the
    one being written back, the concatenation); K and V repeated per query head (``repeat_kv``,
    whenever SDPA gets a mask); a prefill chunk's boolean mask, SDPA's bias of it and its padded
    copy, its activations and its logits (every position of the chunk, and again in float32).
    """
    from specontext.planner.host_memory import pinned_block_bytes
    from specontext.planner.memory import SDPA_BIAS_ALIGN

    L, G, H, D = cfg.num_layers, cfg.num_kv_heads, cfg.num_heads, cfg.head_dim
    E, I, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    R, S, e = requests, seq_tokens, element_bytes
    C = min(chunk_tokens, S)
    plane = R * G * S * D * e  # one layer's K (or V)
    if offloaded:
        host = 2 * (2 * L + 2) * pinned_block_bytes(plane)
        kv_device = 4 * 2 * plane
    else:
        host = 0
        kv_device = (L + 1) * 2 * plane
    repeated = 2 * R * H * S * D * e
    mask = R * C * S + R * C * (S + -(-S // SDPA_BIAS_ALIGN) * SDPA_BIAS_ALIGN) * e
    activations = R * C * (3 * E + 2 * (H + 2 * G) * D + 4 * I) * e
    logits = R * C * V * (e + 4)
    return weights_bytes + kv_device + repeated + mask + activations + logits, host


def planned_requests(engine: str, cfg, profile, *, seq_tokens: int, weights_bytes: int, element_bytes: int,
                     options=None, head=None, fused_attention: bool = True, chunk_tokens: int = PREFILL_CHUNK_TOKENS,
                     choices=REQUEST_CHOICES) -> int:
    """The largest R of ``choices`` whose run fits ``profile``'s device and host budgets (0: none).

    Our engines (``specontext``, ``dense``): the memory plan the runtime places layers by
    (``schedule_layers``, which refuses what does not fit in device plus host memory, the pinned
    host KV counted as it is allocated). transformers (``hf-sdpa``, ``hf-offloaded``):
    :func:`hf_memory_bytes`, its device part with HF_DEVICE_MARGIN. On a unified-memory profile
    (the CPU) both parts share the device budget.

    Args:
        profile: a :class:`~specontext.planner.profiles.DeviceProfile` (see _device_profile).
        seq_tokens: tokens per request at the end (input + output + 1).
        options: our engine's SparsityOptions (budget, blocks, pinning), as it runs.
        head: the retrieval head's HeadShape (specontext).
    """
    import torch

    from specontext.errors import SpecontextError
    from specontext.planner.manager import schedule_layers
    from specontext.retrieval.selection import SparsityOptions

    if engine in ("specontext", "dense"):
        dtype = {2: torch.float16, 4: torch.float32}[element_bytes]
        opts = options or SparsityOptions(method=engine)

        def fits(R):
            try:
                schedule_layers(cfg, profile, capacity_tokens=seq_tokens, batch_size=R, dtype=dtype,
                                sparsity=opts.method, budget_tokens=opts.budget_tokens,
                                head=head if opts.method == "specontext" else None, slot_pool=SLOT_POOL,
                                block_tokens=opts.block_tokens, prefill_chunk_tokens=chunk_tokens,
                                weights_bytes=weights_bytes, fused_attention=fused_attention,
                                pin_tokens=opts.pin_tokens, focus_window_tokens=opts.focus_window_tokens)
                return True
            except SpecontextError:  # the planner refuses what does not fit
                return False
        return largest_requests(fits, choices)

    def fits(R):
        device, host = hf_memory_bytes(cfg, R, seq_tokens, chunk_tokens, element_bytes, weights_bytes,
                                       offloaded=engine == "hf-offloaded")
        device = int(device * HF_DEVICE_MARGIN)
        if profile.unified_memory:
            return device + host <= profile.device_budget_bytes
        return device <= profile.device_budget_bytes and host <= profile.host_budget_bytes
    return largest_requests(fits, choices)


def _ratios(engines: dict) -> dict:
    def tps(name):
        return engines.get(name, {}).get("tokens_per_s")

    out = {}
    for peer in ("dense", "hf-sdpa", "hf-offloaded"):
        if tps("specontext") and tps(peer):
            out[f"specontext_over_{peer}"] = round(tps("specontext") / tps(peer), 3)
    return out
