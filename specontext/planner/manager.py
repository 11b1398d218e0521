"""The adaptive memory manager: turns a plan into the runtime's per-layer placement schedule.

Before a generation starts, the plan for the device profile gives the thresholds S_i; the cache
then keeps every layer resident while it fits, and the step that would reach S_i first moves
the last device-resident layer's KV to host memory and gives it slots
(:meth:`specontext.kv.offload.OffloadedKVCache.plan_step`). A context above the plan's maximum
is refused before any work, with that maximum.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import ModelConfig
from ..errors import ContextLengthError
from ..methods import check_offload
from .host_memory import host_memory_for
from .memory import HeadShape, MemoryInputs
from .placement import Placement, plan_placement
from .profiles import DeviceProfile


@dataclass(frozen=True)
class Schedule:
    """Per layer, the cache length from which it lives in host memory (None: always resident)."""

    offload_from_tokens: tuple[int | None, ...]
    pool_tokens: int
    grow_tokens: int
    placement: Placement

    @property
    def host_layers(self) -> list[bool]:
        return [s is not None for s in self.offload_from_tokens]

    def to_dict(self) -> dict:
        return {"device_budget_bytes": self.placement.device_budget_bytes,
                "max_context_tokens": self.placement.max_context_tokens,
                "thresholds": [{"seq_tokens": t.seq_tokens, "num_offloaded": t.num_offloaded}
                               for t in self.placement.thresholds],
                "slot_pool": self.placement.slot_pool, "pool_tokens": self.pool_tokens}


def schedule_layers(model: ModelConfig, profile: DeviceProfile, *, capacity_tokens: int, batch_size: int,
                    dtype: torch.dtype, sparsity: str, budget_tokens: int, head: HeadShape | None, slot_pool: float,
                    block_tokens: int, prefill_chunk_tokens: int, weights_bytes: int, fused_attention: bool,
                    pin_tokens: int = 0, focus_window_tokens: int = 0, kv_format: str = "float") -> Schedule:
    """The placement schedule of one generation of ``capacity_tokens`` per row.

    Raises:
        ContextLengthError: the context does not fit in device plus host memory (says the maximum).
        InputError: a per-layer selection (oracle, quest, snapkv) would have to run with offloaded layers.
    """
    size = torch.empty(0, dtype=dtype).element_size()
    grow = prefill_chunk_tokens
    inputs = MemoryInputs(model=model, weight_bytes=size, kv_bytes=size, requests=batch_size, sparsity=sparsity,
                          budget_tokens=budget_tokens, head=head, slot_pool=slot_pool, block_tokens=block_tokens,
                          prefill_chunk_tokens=prefill_chunk_tokens, fused_attention=fused_attention,
                          measured_weight_bytes=weights_bytes, grow_tokens=grow, pin_tokens=pin_tokens,
                          focus_window_tokens=focus_window_tokens, cpu_threads=torch.get_num_threads(),
                          host_memory=host_memory_for(profile.kind), kv_format=kv_format)
    placement = plan_placement(inputs, profile.device_budget_bytes, profile.host_budget_bytes,
                               profile.unified_memory, target_seq_tokens=capacity_tokens,
                               max_seq_tokens=max(capacity_tokens, model.max_position_embeddings))
    if capacity_tokens > placement.max_context_tokens:
        raise ContextLengthError(
            f"a context of {capacity_tokens} tokens does not fit on {profile.name}: at most "
            f"{placement.max_context_tokens} tokens fit in device plus host memory ({placement.limit_reason}); "
            f"shorten the document or --max-new-tokens")
    L = model.num_layers
    start: list[int | None] = [None] * L
    for t in placement.thresholds:
        if t.seq_tokens > capacity_tokens:
            break
        for j in range(t.num_offloaded):  # the last layers leave first
            layer = L - 1 - j
            if start[layer] is None:
                start[layer] = t.seq_tokens if t.seq_tokens > 1 else 0  # moved by the step reaching it
    if any(s is not None for s in start):
        check_offload(sparsity, f"on {profile.name} this context needs layers in host memory, so")
    pool = inputs.pool_tokens(capacity_tokens, placement.slot_pool)
    return Schedule(tuple(start), pool, grow, placement)
