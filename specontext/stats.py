"""The counters of a generation, kept apart from the step: timings, memory, selection and transfers.

Times in seconds, memory in bytes.
"""

from __future__ import annotations

import resource
from dataclasses import asdict, dataclass, field

import torch

from .kv.cache import KVCache
from .kv.offload import OffloadedKVCache
from .retrieval.selection import SparsityOptions
from .retrieval.selector import Selector


@dataclass
class GenerationStats:
    """Timings and memory of one generation. Times in seconds, memory in bytes."""

    prompt_tokens: int = 0
    generated_tokens: int = 0
    decode_steps: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    kv_cache_bytes: int = 0
    weights_bytes: int = 0
    peak_host_rss_bytes: int = 0
    peak_device_bytes: int | None = None
    selector_bytes: int = 0
    sparsity: dict = field(default_factory=dict)
    offload: dict = field(default_factory=dict)  # placement, KV bytes per tier, transfers (offloaded caches)

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        # the first token comes from the prefill logits; each decode step makes one more
        return self.decode_steps / self.decode_s if self.decode_s > 0 else 0.0

    def to_dict(self) -> dict:
        out = asdict(self)
        out["prefill_tokens_per_s"] = round(self.prefill_tokens_per_s, 3)
        out["decode_tokens_per_s"] = round(self.decode_tokens_per_s, 3)
        out["total_s"] = round(self.prefill_s + self.decode_s, 4)
        return out


@dataclass
class GenerationResult:
    """Text and ids generated, why generation stopped, and its stats.

    ``stop_reason``: ``eos``, ``stop_string``, ``length`` (max_new_tokens), ``context`` (the
    model's context is full), ``interrupted``, or ``running`` if taken mid-generation.
    """

    text: str
    token_ids: list[int]
    stop_reason: str
    stats: GenerationStats = field(default_factory=GenerationStats)


@dataclass
class BatchStats:
    """The whole batch's timings: what throughput comparisons use. Times in seconds."""

    num_requests: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    decode_steps: int = 0  # batched model calls after prefill
    prefill_s: float = 0.0
    decode_s: float = 0.0

    def to_dict(self) -> dict:
        out = asdict(self)
        total = self.prefill_s + self.decode_s
        out["total_s"] = round(total, 4)
        # end to end, prefill included: every generated token over the batch's wall time
        out["tokens_per_s"] = round(self.generated_tokens / total, 3) if total > 0 else 0.0
        out["decode_tokens_per_s"] = round((self.generated_tokens - self.num_requests) / self.decode_s, 3) \
            if self.decode_s > 0 else 0.0
        return out


def sparsity_info(opts: SparsityOptions, selector: Selector, head_path: str | None) -> dict:
    """What a generation's sparse decode was set to, and the selector's counters."""
    info = {"method": opts.method}
    if opts.method != "dense":
        info["budget_tokens"] = opts.budget_tokens
        if opts.method in ("specontext", "streaming", "snapkv"):
            info["sink_tokens"] = opts.sink_tokens
        if opts.method in ("specontext", "snapkv"):
            info["window_tokens"] = opts.window_tokens
        if opts.method == "specontext":
            info["retrieval_head"] = head_path
            info["fallback_threshold"] = opts.fallback_threshold
            info["pin_tokens"] = opts.pin_tokens
        if selector.focus_window_tokens:
            info["focus_window_tokens"] = opts.focus_window_tokens
            info["focus_pool_tokens"] = opts.focus_pool_tokens
            info["focus_layers"] = opts.focus_layers
        if opts.method == "quest":
            info["page_tokens"] = opts.page_tokens
        info.update(selector.stats.to_dict())
    return info


def offload_info(cache: KVCache | None) -> dict:
    """Placement, KV bytes per tier and transfers of an offloaded cache ({} for a resident one)."""
    if not isinstance(cache, OffloadedKVCache):
        return {}
    info = {"kv_device_bytes": cache.device_bytes(), "kv_host_bytes": cache.host_bytes(), **cache.transfer_stats()}
    schedule = getattr(cache, "schedule", None)
    if schedule is not None:
        info["memory_plan"] = schedule.to_dict()
    return info


def peak_rss_bytes() -> int:
    """This process's peak resident memory: Linux's VmHWM where there is one (ru_maxrss also
    counts what the process held before an exec, e.g. as a fork of a larger parent)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def record_peaks(stats: GenerationStats, device: torch.device) -> None:
    """The process's peak RSS and, on CUDA, the device's peak allocation so far."""
    stats.peak_host_rss_bytes = peak_rss_bytes()
    if device.type == "cuda":
        stats.peak_device_bytes = torch.cuda.max_memory_allocated(device)
