"""How bench_edge/bench_e2e_gpu.py chooses the number of requests R: every R it picks must fit the
device and the host, whose memory a pinned cache fills in blocks of a power of two.

Pure arithmetic on CPU, at the shapes the GPU run uses. References: hand-computed byte counts
(the audit's 290 GB of host KV for transformers' offloaded cache at R = 64, Llama-3.1-8B, 32k),
and the memory planner's own verdict one step above the chosen R.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

from specontext.config import ModelConfig
from specontext.errors import SpecontextError
from specontext.planner.manager import schedule_layers
from specontext.planner.memory import HeadShape
from specontext.planner.profiles import DeviceProfile, load_profile
from specontext.retrieval.selection import SparsityOptions

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "bench_edge"))
import bench_e2e_gpu as e2e  # noqa: E402
import bench_offload_gpu  # noqa: E402

GIB = 2**30
SEQ = 2048 + 32768 + 1  # the [2k, 32k] setting, per request


@pytest.fixture(scope="module")
def llama8b():
    cfg = ModelConfig.from_hf_dict(bench_offload_gpu.hf_config("llama-3.1-8b"), name="llama-3.1-8b")
    return cfg, e2e._weights_bytes(cfg, torch.float16)


def h200(host_gib: float) -> DeviceProfile:
    """The H200 with ``host_gib`` of host memory available to the run (what _device_profile makes)."""
    return DeviceProfile(**{**load_profile("h200-141gb").to_dict(), "host_memory_gib": host_gib,
                            "reserved_host_gib": 0.0})


def test_host_margin_and_the_largest_request_count():
    assert e2e.usable_host_bytes(100 * GIB) == 90 * GIB
    assert e2e.usable_host_bytes(20 * GIB) == 16 * GIB  # at least 4 GiB kept
    assert e2e.usable_host_bytes(3 * GIB) == 0
    assert e2e.largest_requests(lambda R: R <= 20) == 16
    assert e2e.largest_requests(lambda R: False) == 0


def test_transformers_offloaded_cache_counts_every_layer_pinned_on_the_host(llama8b):
    cfg, weights = llama8b
    device, host = e2e.hf_memory_bytes(cfg, 64, SEQ, 2048, 2, weights, offloaded=True)
    logical = 64 * 2 * 32 * 8 * SEQ * 128 * 2  # R, K and V, layers, KV heads, tokens, head dim, fp16
    assert 290e9 < logical < 300e9  # the audit's figure
    block = 1 << (64 * 8 * SEQ * 128 * 2 - 1).bit_length()  # one layer's K: a pinned power of two
    assert block == 8 * GIB
    # every layer's K and V and the pair in flight, and as much again of the smaller blocks the
    # cache grew through (torch keeps them for requests of their own size)
    assert host == 2 * (2 * 32 + 2) * block > logical
    assert device < e2e.hf_memory_bytes(cfg, 64, SEQ, 2048, 2, weights, offloaded=False)[0]
    assert e2e.hf_memory_bytes(cfg, 64, SEQ, 2048, 2, weights, offloaded=False)[1] == 0


@pytest.mark.parametrize("host_gib", [128, 100, 40])
def test_transformers_request_counts_fit_device_and_host(llama8b, host_gib):
    cfg, weights = llama8b
    profile = h200(host_gib)
    for engine, offloaded in (("hf-offloaded", True), ("hf-sdpa", False)):
        R = e2e.planned_requests(engine, cfg, profile, seq_tokens=SEQ, weights_bytes=weights, element_bytes=2)
        assert R >= 1
        device, host = e2e.hf_memory_bytes(cfg, R, SEQ, 2048, 2, weights, offloaded)
        assert device * e2e.HF_DEVICE_MARGIN <= profile.device_budget_bytes and host <= profile.host_budget_bytes
        if R < 64:  # the next power of two does not fit
            device, host = e2e.hf_memory_bytes(cfg, 2 * R, SEQ, 2048, 2, weights, offloaded)
            assert device * e2e.HF_DEVICE_MARGIN > profile.device_budget_bytes or host > profile.host_budget_bytes
    # the audit's case: R = 64 is never picked for the offloaded cache on a 128 GiB host
    assert e2e.planned_requests("hf-offloaded", cfg, h200(128), seq_tokens=SEQ, weights_bytes=weights,
                                element_bytes=2) <= 4


def _fits_plan(cfg, profile, R, weights, opts, head) -> bool:
    try:
        schedule_layers(cfg, profile, capacity_tokens=SEQ, batch_size=R, dtype=torch.float16, sparsity=opts.method,
                        budget_tokens=opts.budget_tokens, head=head, slot_pool=e2e.SLOT_POOL, block_tokens=1,
                        prefill_chunk_tokens=e2e.PREFILL_CHUNK_TOKENS, weights_bytes=weights, fused_attention=True,
                        pin_tokens=opts.pin_tokens, focus_window_tokens=opts.focus_window_tokens)
        return True
    except SpecontextError:
        return False


@pytest.mark.parametrize("engine", ["specontext", "dense"])
def test_our_request_counts_follow_the_plan_and_shrink_with_the_host(llama8b, engine):
    cfg, weights = llama8b
    head = HeadShape.eagle3_like(cfg) if engine == "specontext" else None
    opts = SparsityOptions(method=engine, budget_tokens=2048)
    chosen = {}
    for host_gib in (128, 100, 8):
        profile = h200(host_gib)
        R = e2e.planned_requests(engine, cfg, profile, seq_tokens=SEQ, weights_bytes=weights, element_bytes=2,
                                 options=opts, head=head)
        assert R >= 1 and _fits_plan(cfg, profile, R, weights, opts, head)
        assert R == 64 or not _fits_plan(cfg, profile, 2 * R, weights, opts, head)
        chosen[host_gib] = R
    # with 8 GiB of host memory only what fits on the device runs; more host memory admits more
    assert chosen[128] >= chosen[100] >= chosen[8] and chosen[128] > chosen[8]


def test_nothing_fits_gives_zero(llama8b):
    cfg, weights = llama8b
    tiny_device = DeviceProfile(**{**h200(64).to_dict(), "device_memory_gib": 8.0, "reserved_device_gib": 0.5})
    assert e2e.planned_requests("dense", cfg, tiny_device, seq_tokens=SEQ, weights_bytes=weights, element_bytes=2,
                                options=SparsityOptions(method="dense")) == 0
    assert e2e.planned_requests("hf-sdpa", cfg, tiny_device, seq_tokens=SEQ, weights_bytes=weights,
                                element_bytes=2) == 0


def test_on_a_unified_profile_both_parts_share_one_budget(llama8b):
    cfg, weights = llama8b
    cpu = DeviceProfile(**{**load_profile("cpu").to_dict(), "device_memory_gib": 120.0, "reserved_device_gib": 0.0,
                           "host_memory_gib": 120.0, "reserved_host_gib": 0.0})
    R = e2e.planned_requests("hf-offloaded", cfg, cpu, seq_tokens=SEQ, weights_bytes=weights, element_bytes=2)
    device, host = e2e.hf_memory_bytes(cfg, R, SEQ, 2048, 2, weights, offloaded=True)
    assert R >= 1 and device * e2e.HF_DEVICE_MARGIN + host <= cpu.device_budget_bytes
