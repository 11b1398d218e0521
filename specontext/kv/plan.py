"""What one forward step does, decided before layer 0 runs: the step plan and the selection.

Shape letters: B batch, T new tokens this step, G KV heads, H query heads, K budget (past tokens
attended per KV head), P past positions, D head dim.

The step's plan is made on the host, once per step; every layer reads it. What a decode step
attends to comes in as a :class:`Selection`: either one index set for every layer (a global
selection, which the retrieval head makes before the model runs), or a per-layer policy that
attention calls with that layer's queries and past keys (the oracle, Quest, SnapKV). The cache
gathers whatever was chosen; it never chooses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch


class LayerPolicy(Protocol):
    """Chooses inside one layer: ``(layer, queries [B, H, 1, D], past_keys [B, G, P, D], past_valid
    [B, P] bool or None) -> (indices [B, G, K + 1], valid [B, G, K + 1] or None)``, the current
    token's position last. ``past_keys`` is None for a layer whose keys are not on the device
    (offloaded); only a policy that ignores the keys (a global selection seen per layer) runs there."""

    def __call__(self, layer: int, queries: torch.Tensor, past_keys: torch.Tensor | None,
                 past_valid: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]: ...


@dataclass(frozen=True)
class Selection:
    """One decode step's choice, carried in ``StepPlan.selection``.

    Attributes:
        indices: [B, G, K + 1] int64 positions to attend, the current token's last, shared by
            every layer; None when ``policy`` chooses per layer.
        valid: [B, G, K + 1] bool where rows hold fewer than K real choices (padding is False);
            None when every entry is real.
        policy: called by attention in each layer (see :class:`LayerPolicy`), or None. A global
            selection has one too when something must see each layer's choice (recall measurement).
        fallback_rows: batch rows that attend to every past position this step (the head was not
            confident for them while it was for others); their ``indices`` cover the whole past.
    """

    indices: torch.Tensor | None
    valid: torch.Tensor | None = None
    policy: LayerPolicy | Callable | None = None
    fallback_rows: tuple[int, ...] = ()


def append_current(indices: torch.Tensor, valid: torch.Tensor | None, positions: torch.Tensor):
    """indices [B, G, K] -> [B, G, K + 1] with each row's current position last (always valid)."""
    B, G, _ = indices.shape
    cur = positions[:, :1, None].expand(B, G, 1).to(indices.dtype)
    full = torch.cat([indices, cur], dim=-1)
    if valid is not None:
        valid = torch.cat([valid, valid.new_ones(B, G, 1)], dim=-1)
    return full, valid


@dataclass
class StepPlan:
    """Metadata for one forward step, planned once and passed to every layer.

    Attributes:
        positions: [B, T] int64 on the compute device; absolute position of each new token.
        input_lens: number of real (non-padding) new tokens per row, host ints.
        write_start: the common start position when every row writes all T tokens at the same
            offset (the fast path: one slice assignment); None otherwise.
        kv_len: number of cache positions the step attends over (max over rows).
        attn_mask: [B, 1, T, kv_len] bool (True = attend) or None when every query may see every
            key in range (decode of equal-length rows without a sliding window).
        valid_index: ([N] batch index, [N] position) of the real tokens when rows differ.
        cos, sin: [B, T, D] rotary tables, filled in by the model.
        selection: a :class:`Selection` for sparse decode steps, else None.
        focus: a ``retrieval.focus.QueryFocus`` on prefill chunks holding a row's focus window
            (attention layers report their window attention to it), else None.
    """

    positions: torch.Tensor
    input_lens: list[int]
    write_start: int | None
    kv_len: int
    attn_mask: torch.Tensor | None
    valid_index: tuple[torch.Tensor, torch.Tensor] | None = None
    cos: torch.Tensor | None = None
    sin: torch.Tensor | None = None
    selection: Selection | None = None
    focus: object | None = None
    _grouped: dict = field(default_factory=dict, repr=False)

    def grouped_mask(self, mask: torch.Tensor, num_queries_per_kv: int) -> torch.Tensor:
        """``mask`` [B, 1, T, S] repeated to [B, 1, R*T, S] for queries folded per KV head.

        Built once per step and mask, not once per layer: every layer of a dense step gets the
        same mask object from the cache.
        """
        key = (id(mask), num_queries_per_kv)
        if key not in self._grouped:
            self._grouped[key] = (mask, mask.repeat(1, 1, num_queries_per_kv, 1))
        return self._grouped[key][1]
