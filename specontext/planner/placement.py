"""Where each layer's KV lives as the context grows, and what a decode step then costs.

Shape letters and symbols as in :mod:`.memory`: L target layers, N of them offloaded, S cache
capacity in tokens, K budget, P slots per KV head of an offloaded layer, R requests.

:func:`plan_placement` searches :func:`~.memory.buffers` for the largest S each N fits (memory
grows with S), which gives the thresholds S_i where one more layer must leave the device
(SPECONTEXT.md §3), then sizes the slot pool. :func:`step_time` predicts a decode step from the
bytes it reads and moves, over the bandwidths.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..errors import InputError
from ..methods import GLOBAL_METHODS, SPARSE_METHODS
from .memory import MemoryInputs, buffers, kv_row_bytes, model_weight_bytes, tier_bytes


@dataclass(frozen=True)
class StepTime:
    """Predicted decode step: bytes read from device memory and moved over the host link, over bandwidth."""

    device_read_bytes: int
    link_bytes: int
    compute_s: float
    transfer_s: float

    @property
    def step_s(self) -> float:
        """Transfers overlap compute (asynchronous prefetch), so the slower of the two bounds the step."""
        return max(self.compute_s, self.transfer_s)


# Measured on the default model, 8k essays (bench_edge/results/offload_cpu.json, B = 1024): the
# fraction of a full reload of K tokens an elastic step fetches, by P / K. Interpolated between.
FETCH_FRACTION_BY_POOL = ((1.0, 1 / 5.8), (1.125, 1 / 7.9), (1.25, 1 / 10.8), (1.5, 1 / 20.1), (2.0, 1 / 70.9))


def fetch_fraction(pool_factor: float) -> float:
    """The fraction of a full reload an elastic step fetches with P / K = ``pool_factor``
    (FETCH_FRACTION_BY_POOL, interpolated linearly, constant beyond its ends)."""
    pts = FETCH_FRACTION_BY_POOL
    if pool_factor <= pts[0][0]:
        return pts[0][1]
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if pool_factor <= x1:
            return y0 + (y1 - y0) * (pool_factor - x0) / (x1 - x0)
    return pts[-1][1]


def step_time(inputs: MemoryInputs, seq_tokens: int, num_offloaded: int, memory_bandwidth: float,
              link_bandwidth: float, slot_pool: float | None = None) -> StepTime:
    """Bytes over bandwidth for one decode step of every request (bandwidths in bytes/s)."""
    m, x = inputs.model, inputs
    L, G, D, R, e, w, N = m.num_layers, m.num_kv_heads, m.head_dim, x.requests, x.kv_bytes, x.weight_bytes, num_offloaded
    weights = x.measured_weight_bytes if x.measured_weight_bytes is not None else \
        model_weight_bytes(m, w, x.weight_format, x.quant_scale_bytes, x.head_bytes, x.embedding_format)
    sparse = x.sparsity in SPARSE_METHODS
    K = x.budget(seq_tokens)
    attended = K if sparse else seq_tokens
    row, packed = kv_row_bytes(x), kv_row_bytes(x, offloaded=True)  # stored bytes of a K (or V) row
    read = weights + 2 * R * L * G * attended * row
    head = x.head_shape
    if head is not None:
        read += head.num_parameters * w + R * head.num_kv_heads * seq_tokens * head.head_dim * w
    if x.sparsity == "quest":  # page key bounds of every layer
        read += 2 * R * L * G * -(-seq_tokens // 16) * D * e
    link = 0
    if N:
        if x.sparsity in GLOBAL_METHODS and K < seq_tokens:
            factor = x.pool_tokens(seq_tokens, slot_pool) / max(K, 1)
            link = int(2 * R * N * G * K * packed * fetch_fraction(factor))
        else:  # whole offloaded layers streamed every step
            link = 2 * R * N * G * seq_tokens * packed
    return StepTime(device_read_bytes=read, link_bytes=link, compute_s=read / memory_bandwidth,
                    transfer_s=link / link_bandwidth if link else 0.0)


@dataclass(frozen=True)
class Threshold:
    """From ``seq_tokens`` on (until the next threshold), ``num_offloaded`` layers live in host memory."""

    seq_tokens: int
    num_offloaded: int


@dataclass
class Placement:
    """The plan: thresholds S_i, the slot pool, and the largest context that fits."""

    device_budget_bytes: int
    host_budget_bytes: int
    unified_memory: bool
    slot_pool: float
    thresholds: list[Threshold] = field(default_factory=list)
    max_context_tokens: int = 0
    limit_reason: str = ""

    def num_offloaded_at(self, seq_tokens: int) -> int:
        """Offloaded layers at capacity ``seq_tokens``; raises when it does not fit at all."""
        if seq_tokens > self.max_context_tokens:
            raise InputError(f"a context of {seq_tokens} tokens does not fit: the maximum is {self.max_context_tokens} "
                             f"({self.limit_reason})")
        n = 0
        for t in self.thresholds:
            if seq_tokens >= t.seq_tokens:
                n = t.num_offloaded
        return n


def _fits(inputs: MemoryInputs, S: int, N: int, placement: Placement, slot_pool: float) -> bool:
    bufs = buffers(inputs, S, N, slot_pool)
    dev, host = tier_bytes(bufs, "device"), tier_bytes(bufs, "host")
    if placement.unified_memory:
        return dev + host <= placement.device_budget_bytes
    return dev <= placement.device_budget_bytes and host <= placement.host_budget_bytes


def _max_fitting(inputs: MemoryInputs, N: int, placement: Placement, slot_pool: float, limit: int) -> int:
    """Largest S in [0, limit] that fits with N offloaded (memory grows with S, so bisect)."""
    if not _fits(inputs, 1, N, placement, slot_pool):
        return 0
    lo, hi = 1, limit
    if _fits(inputs, hi, N, placement, slot_pool):
        return hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _fits(inputs, mid, N, placement, slot_pool):
            lo = mid
        else:
            hi = mid
    return lo


def plan_placement(inputs: MemoryInputs, device_budget_bytes: int, host_budget_bytes: int, unified_memory: bool,
                   target_seq_tokens: int, max_seq_tokens: int, max_slot_pool: float = 2.0) -> Placement:
    """Maximise device-resident layers as S grows, then spend what is left on slot pools.

    For each N (offloaded layers), the largest S that fits is found; the placement at S is the
    smallest N that fits, which gives the thresholds S_i where one more layer must leave the
    device. Offloaded layers need a global selection to decode from slots; with other methods
    they stream whole layers every step (the plan still holds, the step is slower). On a
    unified-memory device offload adds no capacity, so every layer stays resident.

    The slot pool is chosen for ``target_seq_tokens`` (the run's capacity): the largest
    P / K <= ``max_slot_pool`` that still fits there with the same N, since the offload
    benchmark shows fetched bytes falling steeply with P (FETCH_FRACTION_BY_POOL).

    Args:
        device_budget_bytes, host_budget_bytes: usable memory (profile minus reserves); for
            unified memory the device budget is the whole shared pool.
        target_seq_tokens: S of the run (prompt + new tokens).
        max_seq_tokens: the model's context limit (the search bound).
    """
    L = inputs.model.num_layers
    place = Placement(device_budget_bytes, host_budget_bytes, unified_memory, inputs.slot_pool)
    layer_choices = [0] if unified_memory else list(range(L + 1))

    def schedule(slot_pool: float) -> tuple[dict, list[Threshold]]:
        best = {N: _max_fitting(inputs, N, place, slot_pool, max_seq_tokens) for N in layer_choices}
        thresholds, current = [], None
        for S in sorted({1, *[best[N] + 1 for N in layer_choices]}):
            fitting = [n for n in layer_choices if best[n] >= S]
            if not fitting:
                break
            if min(fitting) != current:
                current = min(fitting)
                thresholds.append(Threshold(S, current))
        return best, thresholds

    # the capability: the smallest pool (P = K), the largest context
    best, place.thresholds = schedule(inputs.slot_pool)
    place.max_context_tokens = max(best.values())
    if place.max_context_tokens == 0:
        place.limit_reason = "the weights and fixed buffers alone exceed the device memory"
    elif place.max_context_tokens >= max_seq_tokens:
        place.limit_reason = f"the model's context limit of {max_seq_tokens} tokens"
    else:
        N = max(best, key=best.get)
        bufs = buffers(inputs, place.max_context_tokens + 1, N)
        dev = tier_bytes(bufs, "device") + (tier_bytes(bufs, "host") if unified_memory else 0)
        place.limit_reason = ("device memory is full" if dev > device_budget_bytes
                              else "host memory for the offloaded KV is full")
    # the run: grow P at its capacity while that placement still fits, then re-derive the thresholds
    if inputs.sparsity in GLOBAL_METHODS and 0 < target_seq_tokens <= place.max_context_tokens:
        N = place.num_offloaded_at(target_seq_tokens)
        if N:
            lo, hi = inputs.slot_pool, max(max_slot_pool, inputs.slot_pool)
            if _fits(inputs, target_seq_tokens, N, place, hi):
                lo = hi
            else:
                for _ in range(20):
                    mid = (lo + hi) / 2
                    lo, hi = (mid, hi) if _fits(inputs, target_seq_tokens, N, place, mid) else (lo, mid)
            pool = math.floor(lo * 1000) / 1000
            if pool > inputs.slot_pool:
                # a larger pool only adds memory: N still fits at the target and no smaller N does
                place.slot_pool, (_, place.thresholds) = pool, schedule(pool)
    return place
