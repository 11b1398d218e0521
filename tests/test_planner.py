"""The memory model, device profiles and the planning mode (specontext/planner/).

References: parameter counts of Hugging Face transformers models; the runtime's own accounting of
the buffers it allocated (weights, caches, slots, the retrieval head and its K cache) after real
generation runs; a brute-force search for the placement thresholds.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

import specontext
from specontext.retrieval.selection import SparsityOptions
from specontext.config import ModelConfig
from specontext.errors import InputError
from specontext.kv.cache import DenseKVCache
from specontext.planner.host_memory import CUDA_HOST_MEMORY, pinned_block_bytes
from specontext.planner.memory import (HeadShape, MemoryInputs, buffers, model_weight_bytes, prefill_workspace,
                                       tier_bytes)
from specontext.planner.placement import plan_placement
from specontext.planner.profiles import DeviceProfile, detect_profile, load_profile, read_profile, shipped_profiles
from specontext.planner.plan import make_plan
from specontext.retrieval.head import RetrievalHead, RetrievalHeadConfig, save_head

from conftest import make_hf_model

HERE = os.path.dirname(os.path.abspath(__file__))
SHAPES = os.path.join(os.path.dirname(HERE), "bench_edge", "shapes")


@pytest.mark.parametrize("family,overrides", [("llama", {}), ("llama", {"tie_word_embeddings": True}),
                                               ("qwen2", {}), ("qwen3", {"head_dim": 24})])
def test_weight_bytes_from_the_config_equal_transformers_parameter_count(tmp_path, family, overrides):
    hf = make_hf_model(family, str(tmp_path / "m"), **overrides)
    cfg = ModelConfig.from_hf_file(str(tmp_path / "m"))
    assert model_weight_bytes(cfg, 4) == 4 * hf.num_parameters()
    assert model_weight_bytes(cfg, 2) == 2 * hf.num_parameters()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("planner")
    make_hf_model("llama", str(root / "m"), max_position_embeddings=512)
    llm = specontext.load(str(root / "m"), device="cpu", prefill_chunk_tokens=32)
    cfg = RetrievalHeadConfig(target=llm.target, input_kind="embedding+hidden", hidden_layers=(0, 1), num_heads=4,
                              num_kv_heads=2, head_dim=8, kv_group_of_head=(0, 0, 1, 1))
    save_head(RetrievalHead(cfg), str(root / "head" / "tiny"))
    return {"path": str(root / "m"), "head": str(root / "head" / "tiny.json"), "head_cfg": cfg,
            "config": llm.model.config}


# a grid of contexts x budgets x placements x methods, as the runtime runs them, and 8-bit KV
# resident and offloaded (packed rows in host memory, slots and staging)
GRID = [(ctx, budget, offload, method, pool, block, "auto")
        for ctx, budget in ((100, 24), (200, 48), (300, 96))
        for offload, method, pool, block in ((0, "dense", 1.0, 1), (0, "specontext", 1.0, 1), (2, "streaming", 1.0, 1),
                                             (3, "specontext", 1.5, 1), (1, "specontext", 1.25, 8),
                                             (0, "snapkv", 1.0, 1))] + \
       [(200, 48, 2, "streaming", 1.0, 1, "int8"), (300, 96, 3, "specontext", 1.5, 1, "fp8"),
        (200, 48, 1, "specontext", 1.25, 8, "int8"), (100, 24, 0, "specontext", 1.0, 1, "int8")]


@pytest.mark.parametrize("ctx,budget,offload,method,pool,block,kv", GRID)
def test_predicted_memory_matches_the_runtime_accounting(tiny, ctx, budget, offload, method, pool, block, kv):
    """Item 6 on CPU: the model's buffers against what the runtime allocated (within 5%; in fact exact)."""
    options = dict(sparsity=method, offload_layers=offload, slot_pool=pool, block_tokens=block, kv_dtype=kv)
    if method != "dense":
        options.update(budget_tokens=budget, sink_tokens=2, window_tokens=4)
    if method == "specontext":
        options["retrieval_head"] = tiny["head"]
    llm = specontext.load(tiny["path"], device="cpu", prefill_chunk_tokens=32, **options)
    prompt = torch.randint(3, 90, (ctx - 8,), generator=torch.Generator().manual_seed(ctx)).tolist()
    gen = llm.engine.generate(prompt, specontext.GenerationConfig(max_new_tokens=8, ignore_eos=True))
    for _ in gen:
        pass
    stats = gen.result().stats
    head_bytes = sum(p.numel() * p.element_size() for p in llm.retrieval_head.parameters()) if method == "specontext" else 0
    measured = stats.weights_bytes + head_bytes + stats.kv_cache_bytes + stats.selector_bytes
    capacity = len(prompt) + 8
    head = HeadShape.from_config(tiny["head_cfg"]) if method == "specontext" else None
    opts = llm.engine.sparsity  # query-focused pinning's buffers (specontext's defaults pin, snapkv's per layer)
    inputs = MemoryInputs(model=tiny["config"], weight_bytes=4, kv_bytes=4, sparsity=method, budget_tokens=budget,
                          head=head, slot_pool=pool, block_tokens=block, prefill_chunk_tokens=32, fused_attention=False,
                          pin_tokens=opts.pin_tokens, focus_window_tokens=opts.focus_window_tokens,
                          kv_format="float" if kv == "auto" else kv)
    bufs = buffers(inputs, capacity, offload)
    if method == "specontext":
        assert any(b.name == "pin_mask" for b in bufs)
    predicted = tier_bytes(bufs, "device", include_workspace=False) + tier_bytes(bufs, "host")
    assert abs(predicted - measured) <= 0.05 * measured, (predicted, measured, bufs)
    assert predicted == measured


def _peak_allocated_bytes(fn) -> int:
    """The most bytes held at once while ``fn`` runs, beyond what was held before: every CPU
    allocation and free the profiler records (torch's CPU allocator reports each), in order."""
    from torch.profiler import ProfilerActivity, profile

    try:
        from torch._C._profiler import _EventType
    except ImportError:
        pytest.skip("this torch's profiler does not expose its allocation events")
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation:
            events.append((node.start_time_ns, node.extra_fields.alloc_size))  # < 0 for a free
        stack.extend(node.children)
    held = peak = 0
    for _, size in sorted(events):
        held += size
        peak = max(peak, held)
    return peak


@pytest.mark.parametrize("heads,kv_heads,requests,chunk,prompt,kv", [
    (8, 2, 1, 64, 256, "float"), (8, 2, 4, 64, 256, "float"), (8, 2, 3, 32, 200, "float"), (4, 4, 4, 64, 300, "float"),
    (8, 2, 4, 64, 256, "int8"), (4, 4, 4, 64, 300, "fp8")])
def test_prefill_workspace_bounds_what_a_batched_prefill_allocates(tmp_path, heads, kv_heads, requests, chunk, prompt,
                                                                   kv):
    """The prefill term against the peak that prefilling R rows together really allocates on CPU
    (the cache preallocated, so all of it is transient): an upper bound, and a tight one. A count
    per row, or one that leaves out the grouped mask or SDPA's bias of it, or 8-bit KV's upcast,
    falls below the peak."""
    make_hf_model("llama", str(tmp_path / "m"), vocab_size=96, hidden_size=32, intermediate_size=48,
                  num_hidden_layers=2, num_attention_heads=heads, num_key_value_heads=kv_heads,
                  max_position_embeddings=1024)
    llm = specontext.load(str(tmp_path / "m"), device="cpu", prefill_chunk_tokens=chunk)
    cfg = llm.model.config
    cache = DenseKVCache(cfg.num_layers, requests, cfg.num_kv_heads, cfg.head_dim, prompt, torch.float32, "cpu",
                         kv_format=kv)
    rows = [[3 + (7 * i + r) % 90 for i in range(prompt)] for r in range(requests)]
    measured = _peak_allocated_bytes(lambda: llm.engine.prefill_rows(rows, cache))
    # the measurement sees SDPA's float bias of the grouped mask, counted by hand
    assert measured > requests * (heads // kv_heads) * chunk * prompt * 4
    inputs = MemoryInputs(model=cfg, weight_bytes=4, kv_bytes=4, requests=requests, sparsity="dense",
                          prefill_chunk_tokens=chunk, fused_attention=False, cpu_threads=torch.get_num_threads(),
                          kv_format=kv)
    planned, formula = prefill_workspace(inputs, prompt)
    assert measured <= planned <= 1.5 * measured, (measured, planned, formula)
    assert [b.num_bytes for b in buffers(inputs, prompt, 0) if b.name == "workspace_prefill"] == [planned]


def test_cuda_prefill_workspace_scales_with_requests_and_counts_the_bias():
    """At the GPU run's shape (Llama-3.1-8B, 2k chunks, 32k context): R rows cost R times one row,
    and the boolean masks plus SDPA's fp16 bias and its padded copy are there, by hand."""
    cfg = ModelConfig.from_hf_file(os.path.join(SHAPES, "llama-3.1-8b.json"))
    S, C = 2048 + 32768 + 1, 2048

    def workspace(R):
        return prefill_workspace(MemoryInputs(model=cfg, requests=R, sparsity="dense", prefill_chunk_tokens=C), S)[0]

    assert workspace(32) == 32 * workspace(1)
    masks = C * S * (1 + 4)  # [C, S] and the grouped [4 C, S], bool
    bias = 4 * C * S * 2 + 4 * C * (S + 7) // 8 * 8 * 2  # where(mask, 0, -inf) in fp16, and padded to 8 keys
    assert workspace(1) > masks + bias
    assert workspace(32) > 45e9  # the audit's "about 30 GB" left out the padded copy and the activations


def test_host_kv_is_counted_as_the_runtime_pins_it():
    assert pinned_block_bytes(17 * 2**30) == 32 * 2**30
    assert pinned_block_bytes(2**30) == 2**30 and pinned_block_bytes(2**30 + 1) == 2**31
    assert pinned_block_bytes(0) == 0 and pinned_block_bytes(5, "pageable") == 5
    assert pinned_block_bytes(1, "registered") == pinned_block_bytes(4095, "registered") > 0
    with pytest.raises(InputError, match="host_memory must be one of"):
        pinned_block_bytes(1, "mlock")
    cfg = ModelConfig.from_hf_file(os.path.join(SHAPES, "llama-3.1-8b.json"))
    logical = 20 * 2 * 8 * 8 * 32769 * 128 * 2  # N layers, K and V, R, G, S, D, fp16: 20.0 GiB
    for kind, expected in (("pageable", logical), ("pin_memory", 32 * 2**30)):
        inputs = MemoryInputs(model=cfg, requests=8, sparsity="streaming", host_memory=kind)
        (host,) = [b for b in buffers(inputs, 32769, 20) if b.tier == "host"]
        assert host.num_bytes == expected, kind
    # a plan for a discrete GPU counts the host KV as the runtime holds it there
    plan = make_plan(os.path.join(SHAPES, "llama-3.1-8b.json"), "rtx-4090-24gb", context_tokens=131072,
                     sparsity="specontext", budget_tokens=2048)
    d = plan.to_dict()
    N = d["at_context"]["num_offloaded"]
    assert d["settings"]["host_memory"] == CUDA_HOST_MEMORY and N > 0
    (host,) = [b for b in d["at_context"]["buffers"] if b["tier"] == "host"]
    assert host["bytes"] == pinned_block_bytes(N * 2 * 8 * 131072 * 128 * 2, CUDA_HOST_MEMORY)


def test_thresholds_equal_a_brute_force_search(tiny):
    head = HeadShape.from_config(tiny["head_cfg"])
    inputs = MemoryInputs(model=tiny["config"], weight_bytes=4, kv_bytes=4, sparsity="specontext", budget_tokens=24,
                          head=head, prefill_chunk_tokens=32)
    fixed = tier_bytes(buffers(inputs, 1, 0), "device")
    device_budget = fixed + 200_000  # room for a few hundred tokens of KV
    place = plan_placement(inputs, device_budget, 10**9, unified_memory=False, target_seq_tokens=400,
                           max_seq_tokens=512)
    L = tiny["config"].num_layers
    for S in range(1, 513):
        fitting = [n for n in range(L + 1) if tier_bytes(buffers(inputs, S, n), "device") <= device_budget]
        if not fitting:
            assert S > place.max_context_tokens
            continue
        assert place.num_offloaded_at(S) == min(fitting), S
    assert [t.num_offloaded for t in place.thresholds] == sorted({t.num_offloaded for t in place.thresholds})
    with pytest.raises(InputError, match=f"the maximum is {place.max_context_tokens}"):
        place.num_offloaded_at(place.max_context_tokens + 1)


def test_unified_memory_never_offloads(tiny):
    inputs = MemoryInputs(model=tiny["config"], sparsity="streaming", budget_tokens=24)
    fixed = tier_bytes(buffers(inputs, 1, 0), "device")
    place = plan_placement(inputs, fixed + 100_000, fixed + 100_000, unified_memory=True, target_seq_tokens=100,
                           max_seq_tokens=512)
    assert [t.num_offloaded for t in place.thresholds] == [0]
    assert 0 < place.max_context_tokens < 512 and place.limit_reason == "device memory is full"


def test_the_slot_pool_grows_into_memory_left_over():
    cfg = ModelConfig.from_hf_file(os.path.join(SHAPES, "llama-3.1-8b.json"))
    inputs = MemoryInputs(model=cfg, sparsity="specontext", budget_tokens=2048)
    small = plan_placement(inputs, 20 * 2**30, 200 * 2**30, False, target_seq_tokens=100_000, max_seq_tokens=131072)
    assert small.num_offloaded_at(100_000) > 0 and small.slot_pool > 1.0
    assert tier_bytes(buffers(inputs, 100_000, small.num_offloaded_at(100_000), small.slot_pool), "device") <= 20 * 2**30


def test_shipped_profiles_load_and_bad_ones_name_the_field(tmp_path):
    names = set(shipped_profiles())
    assert {"jetson-orin-nano-8gb", "jetson-orin-nx-16gb", "jetson-agx-orin-64gb", "rtx-4060-laptop-8gb",
            "rtx-4090-24gb", "a100-80gb", "h100-80gb", "h200-141gb", "cpu"} <= names
    for name in names:
        p = load_profile(name)
        assert p.source and p.device_budget_bytes > 0 and p.host_budget_bytes > 0
        assert p.unified_memory == (name.startswith("jetson") or name == "cpu")
    good = load_profile("h100-80gb").to_dict()
    cases = [({k: v for k, v in good.items() if k != "host_link_gb_s"}, "missing field 'host_link_gb_s'"),
             ({**good, "memory_bandwidth_gb_s": "fast"}, "field 'memory_bandwidth_gb_s' must be a number"),
             ({**good, "unified_memory": "no"}, "field 'unified_memory' must be true or false"),
             ({**good, "device_memory_gib": -1}, "field 'device_memory_gib' must be a number >= 0"),
             ({**good, "vram": 1}, "unknown field 'vram'"),
             ({**good, "kind": "tpu"}, "field 'kind' must be one of cuda, cpu"),
             ({**good, "reserved_device_gib": 90}, "field 'reserved_device_gib'")]
    for data, message in cases:
        path = tmp_path / "p.json"
        path.write_text(json.dumps(data))
        with pytest.raises(InputError, match=message):
            read_profile(str(path))
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(InputError, match="not valid JSON"):
        load_profile(str(tmp_path / "bad.json"))
    with pytest.raises(InputError, match="unknown device profile 'h900'.*h100-80gb"):
        load_profile("h900")


def test_detection_without_a_gpu_reads_host_ram(monkeypatch):
    import psutil

    from specontext.planner import profiles

    monkeypatch.setattr(profiles, "_nvml_gpu", lambda index: None)
    monkeypatch.setattr(profiles, "_jetson_model", lambda: None)
    p = detect_profile()
    assert p.kind == "cpu" and p.unified_memory
    assert abs(p.device_memory_gib * 2**30 - psutil.virtual_memory().total) < 2**30 * 0.01
    monkeypatch.setattr(profiles, "_jetson_model", lambda: "NVIDIA Jetson Orin NX Engineering Reference Developer Kit")
    p = detect_profile()
    assert p.kind == "cuda" and p.unified_memory and p.memory_bandwidth_gb_s == 102.4
    monkeypatch.setattr(profiles, "_jetson_model", lambda: None)
    monkeypatch.setattr(profiles, "_nvml_gpu", lambda index: ("NVIDIA H100 80GB HBM3", 79.6, 3352.3, 63.0))
    p = detect_profile()
    assert p.kind == "cuda" and not p.unified_memory and p.description == "NVIDIA H100 80GB HBM3"


def test_plan_from_a_config_alone_and_its_errors(tmp_path, capsys):
    from specontext import cli

    config = os.path.join(SHAPES, "llama-3.1-8b.json")
    plan = make_plan(config, "rtx-4090-24gb", context_tokens=131072, sparsity="specontext", budget_tokens=2048)
    d = plan.to_dict()
    assert d["model"]["name"] == "llama-3.1-8b" and d["max_context_tokens"] == 131072
    assert d["at_context"]["num_offloaded"] > 0 and d["at_context"]["device_bytes"] <= d["device_budget_bytes"]
    assert d["thresholds"][0] == {"seq_tokens": 1, "num_offloaded": 0, "device_resident_layers": 32}
    assert [r["num_offloaded"] for r in d["per_length"]] == sorted(r["num_offloaded"] for r in d["per_length"])
    with pytest.raises(InputError, match=r"weights alone need 15,317 MiB in bfloat16 .* 7,578 MiB usable"):
        make_plan(config, "rtx-4060-laptop-8gb", context_tokens=4096, sparsity="dense")
    small = os.path.join(SHAPES, "llama-3.2-1b.json")
    with pytest.raises(InputError, match=r"does not fit on jetson-orin-nano-8gb: at most \d+ tokens fit .* --context-tokens"):
        make_plan(small, "jetson-orin-nano-8gb", context_tokens=131072, requests=4, sparsity="dense")
    out = tmp_path / "plan.json"
    code = cli.main(["--plan", "--model", config, "--device-profile", "h100-80gb", "--context-tokens", "32768",
                     "--requests", "8", "--sparsity", "specontext", "--budget", "2048", "--json", "--output", str(out)])
    printed = json.loads(capsys.readouterr().out)
    assert code == 0 and printed == json.loads(out.read_text())
    assert printed["settings"]["requests"] == 8 and printed["device_profile"]["name"] == "h100-80gb"
    code = cli.main(["--plan", "--model", config, "--device-profile", "rtx-4060-laptop-8gb"])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "weights alone need" in err


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    """A tiny model whose KV dominates its memory (8 MHA layers, short prefill chunks), and a head."""
    root = tmp_path_factory.mktemp("managed")
    make_hf_model("llama", str(root / "m"), num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=4,
                  max_position_embeddings=512)
    llm = specontext.load(str(root / "m"), device="cpu", prefill_chunk_tokens=8)
    cfg = RetrievalHeadConfig(target=llm.target, input_kind="embedding+hidden", hidden_layers=(0, 3), num_heads=4,
                              num_kv_heads=4, head_dim=8, kv_group_of_head=(0, 1, 2, 3))
    torch.manual_seed(0)
    head = RetrievalHead(cfg)
    with torch.no_grad():
        for p in head.parameters():
            p.normal_(0, 0.3)
    save_head(head, str(root / "head" / "deep"))
    return {"path": str(root / "m"), "head": str(root / "head" / "deep.json"), "head_cfg": cfg,
            "config": llm.model.config}


def _tight_profile(tmp_path, model, room_tokens: int, sparsity: str, budget: int, kv_format: str = "float") -> str:
    """A profile whose device holds everything, every layer resident, up to ``room_tokens``."""
    head = HeadShape.from_config(model["head_cfg"]) if sparsity == "specontext" else None
    pins = SparsityOptions(method=sparsity, budget_tokens=budget, sink_tokens=2, window_tokens=4).pin_tokens
    inputs = MemoryInputs(model=model["config"], weight_bytes=4, kv_bytes=4, sparsity=sparsity, budget_tokens=budget,
                          head=head, prefill_chunk_tokens=8, fused_attention=False, grow_tokens=8, pin_tokens=pins,
                          focus_window_tokens=32, kv_format=kv_format)
    device = tier_bytes(buffers(inputs, room_tokens, 0), "device")
    data = {**load_profile("cpu").to_dict(), "name": "tight", "unified_memory": False,
            "device_memory_gib": device / 2**30, "reserved_device_gib": 0.0,
            "host_memory_gib": 1.0, "reserved_host_gib": 0.0}
    path = tmp_path / "tight.json"
    path.write_text(json.dumps(data))
    return str(path)


@pytest.mark.parametrize("sparsity,budget,kv", [("specontext", 24, "auto"), ("streaming", 24, "auto"),
                                                ("dense", 1024, "auto"), ("specontext", 24, "int8")])
def test_the_manager_moves_layers_as_the_context_grows_with_the_same_answers(deep, tmp_path, sparsity, budget, kv):
    """Item 2: layers leave the device at the plan's thresholds mid-generation; tokens are unchanged
    (8-bit KV too: a moved layer's 8-bit rows and scales go to host memory as they are)."""
    common = dict(sparsity=sparsity, budget_tokens=budget, sink_tokens=2, window_tokens=4, kv_dtype=kv)
    if sparsity == "specontext":
        common["retrieval_head"] = deep["head"]
    prompt = torch.randint(3, 90, (100,), generator=torch.Generator().manual_seed(5)).tolist()
    resident = specontext.load(deep["path"], device="cpu", prefill_chunk_tokens=8, **common)
    ref = resident.generate(prompt, max_new_tokens=140, ignore_eos=True)
    # 8-bit KV frees less per offloaded layer (a quarter of float32's bytes), so its device is larger
    profile = _tight_profile(tmp_path, deep, room_tokens=150 if kv == "auto" else 190, sparsity=sparsity, budget=budget,
                             kv_format="float" if kv == "auto" else kv)
    llm = specontext.load(deep["path"], device="cpu", prefill_chunk_tokens=8, adaptive_offload=True,
                          device_profile=profile, **common)
    result = llm.generate(prompt, max_new_tokens=140, ignore_eos=True)
    assert result.token_ids == ref.token_ids
    off = result.stats.offload
    moves, plan = off["moves"], off["memory_plan"]
    L = deep["config"].num_layers
    assert len(moves) >= 2, "the context grows well past the first threshold, so layers must move"
    assert [m["layer"] for m in moves] == list(range(L - 1, L - 1 - len(moves), -1))  # the last resident one first
    # each layer moves at the step that first reaches its threshold (a decode step: one token)
    first_at = {}
    for t in plan["thresholds"]:
        for n in range(1, t["num_offloaded"] + 1):
            first_at.setdefault(n, t["seq_tokens"])
    for n, m in enumerate(moves, start=1):
        assert m["seq_tokens"] == first_at[n] - 1
    assert plan["max_context_tokens"] >= 240
    if sparsity != "dense":
        assert 0 < off["fetched_tokens"] < off["full_reload_tokens"]


def test_the_manager_refuses_a_context_that_cannot_fit_up_front(deep, tmp_path):
    profile = _tight_profile(tmp_path, deep, room_tokens=40, sparsity="streaming", budget=24)
    data = json.loads(open(profile).read())
    data["host_memory_gib"] = data["device_memory_gib"] / 8  # little room on the host either
    open(profile, "w").write(json.dumps(data))
    llm = specontext.load(deep["path"], device="cpu", prefill_chunk_tokens=8, adaptive_offload=True,
                          device_profile=profile, sparsity="streaming", budget_tokens=24, sink_tokens=2)
    with pytest.raises(specontext.ContextLengthError, match=r"does not fit on tight: at most \d+ tokens fit"):
        llm.generate(list(range(3, 90)) * 3, max_new_tokens=200, ignore_eos=True)
    with pytest.raises(InputError, match="drop offload_layers"):
        specontext.load(deep["path"], device="cpu", adaptive_offload=True, offload_layers=1)


def test_host_memory_respects_a_container_limit(tmp_path, monkeypatch):
    from specontext.planner import profiles

    assert profiles.cgroup_memory_limit(str(tmp_path)) is None  # no controller files: no limit
    (tmp_path / "memory.max").write_text("max\n")
    (tmp_path / "memory.current").write_text("123\n")
    assert profiles.cgroup_memory_limit(str(tmp_path)) is None  # "max": unlimited
    (tmp_path / "memory.max").write_text(f"{8 * 2**30}\n")
    (tmp_path / "memory.current").write_text(f"{3 * 2**30}\n")
    assert profiles.cgroup_memory_limit(str(tmp_path)) == (8 * 2**30, 3 * 2**30)
    monkeypatch.setattr(profiles, "cgroup_memory_limit", lambda: (8 * 2**30, 3 * 2**30))
    assert profiles.host_memory_bytes() <= 8 * 2**30
    assert profiles.host_memory_bytes(available=True) <= 5 * 2**30


def test_host_memory_respects_an_address_space_limit():
    """`ulimit -v` caps what this process can map: the plan counts it as the host's memory."""
    import subprocess
    import sys

    code = ("import resource\n"
            "from specontext.planner import profiles\n"
            "assert profiles.address_space_limit() is None\n"
            "resource.setrlimit(resource.RLIMIT_AS, (6 * 2**30, resource.RLIM_INFINITY))\n"
            "limit, held = profiles.address_space_limit()\n"
            "assert limit == 6 * 2**30 and 0 < held < limit\n"
            "assert profiles.host_memory_bytes() <= 6 * 2**30\n"
            "assert profiles.host_memory_bytes(available=True) <= 6 * 2**30 - held\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
