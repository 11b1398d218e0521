"""Elastic loading: which selected tokens an offloaded layer must fetch into its device slots.

Shape letters: R rows (batch x KV heads, one independent pool each), K budget (tokens selected
per row this step), P slots per row (the pool, P >= K), S cached positions per row.

Selection is global, so every offloaded layer (K and V alike) shares one slot map: the pool
decides once per step which selected positions are already resident, which slots the missing
ones take, and the copy engine then moves the same (position -> slot) rows for every layer.

* P == K is the paper's elastic loading: a position stays in its slot while it stays selected;
  the step fetches exactly S_now - S_last into the slots freed by S_last - S_now.
* P > K (beyond the paper) keeps recently dropped tokens resident: tokens flicker in and out of
  the selection, and a re-selected token found in the pool costs nothing. A miss takes an empty
  slot first, else the least recently selected one not selected now.

Everything is vectorised torch over all rows, on the device that holds the slots, and never
synchronises with the host: the fetch list keeps a fixed length R*K with -1 marking entries that
need no copy (the CUDA copy kernel skips them; the host path drops them first).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def pool_tokens(slot_pool: float, budget_tokens: int, seq_tokens: int, block_tokens: int = 1) -> int:
    """P, the slots per KV head of an offloaded layer, as the runtime and the planner size it:
    ``slot_pool`` times the budget K (rounded up), at most the context S, in whole blocks of N."""
    return whole_blocks(min(math.ceil(slot_pool * budget_tokens), seq_tokens), block_tokens)


def whole_blocks(num_tokens: int, block_tokens: int) -> int:
    """``num_tokens`` rounded up to a multiple of ``block_tokens``."""
    return -(-num_tokens // block_tokens) * block_tokens


@dataclass
class SlotPlan:
    """One step's result for all rows.

    Attributes:
        slots: [R, K] int64 slot of each selected position (0 where the entry is not valid).
        src_rows: [R*K] int64 row to fetch in a host plane viewed as [R*S, ...] (r * S + position),
            -1 where no fetch is needed.
        dst_rows: [R*K] int64 row to write in a slot plane viewed as [R*pitch, ...]
            (r * pitch + slot), -1 where no fetch is needed.
        fetched: 0-dim int64 tensor, positions fetched this step (summed over rows).
        selected: 0-dim int64 tensor, valid positions selected this step (what a full reload moves).
    """

    slots: torch.Tensor
    src_rows: torch.Tensor
    dst_rows: torch.Tensor
    fetched: torch.Tensor
    selected: torch.Tensor


class SlotPool:
    """Position <-> slot maps of R rows with P slots each, and the step counter for LRU eviction.

    Args:
        rows: R, independent pools (batch x KV heads).
        capacity_tokens: S, positions per row.
        pool_slots: P, slots per row; must be >= the budget of every step.
        device: where the maps live (the slots' device, so planning needs no host sync).
        row_pitch: slots between consecutive rows of the slot buffer (>= P; default P), for
            buffers that keep extra slots per row.
    """

    def __init__(self, rows: int, capacity_tokens: int, pool_slots: int, device: torch.device | str,
                 row_pitch: int | None = None):
        self.rows, self.capacity_tokens, self.pool_slots = rows, capacity_tokens, pool_slots
        self.row_pitch = pool_slots if row_pitch is None else row_pitch
        if self.row_pitch < pool_slots:
            raise ValueError(f"row_pitch {self.row_pitch} < pool_slots {pool_slots}")
        self.device = torch.device(device)
        # one extra column in each map takes the writes of entries that change nothing, so
        # every update is an unconditional scatter (no boolean indexing, no host sync)
        self.slot_of_pos = torch.full((rows, capacity_tokens + 1), -1, dtype=torch.int64, device=self.device)
        self.pos_of_slot = torch.full((rows, pool_slots + 1), -1, dtype=torch.int64, device=self.device)
        self.last_used = torch.full((rows, pool_slots + 1), -1, dtype=torch.int64, device=self.device)
        self.step = 0
        self._row = torch.arange(rows, device=self.device)[:, None]

    def allocated_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.slot_of_pos, self.pos_of_slot, self.last_used))

    def reset(self) -> None:
        """Forget every resident position (the slots' contents become garbage)."""
        self.slot_of_pos.fill_(-1)
        self.pos_of_slot.fill_(-1)
        self.last_used.fill_(-1)
        self.step = 0

    def forget_from(self, position: int) -> None:
        """Drop positions >= ``position`` (the cache was rewound; those rows will be rewritten)."""
        stale = self.pos_of_slot >= position
        self.slot_of_pos[:, position:self.capacity_tokens] = -1
        self.pos_of_slot.masked_fill_(stale, -1)
        self.last_used.masked_fill_(stale, -1)

    def assign(self, wanted: torch.Tensor, valid: torch.Tensor | None = None) -> SlotPlan:
        """Map this step's selected positions to slots, fetching the ones not resident.

        Args:
            wanted: [R, K] int64 positions selected per row (unique within a row where valid).
            valid: [R, K] bool, False for padding entries (rows with fewer than K choices).
        """
        R, K = wanted.shape
        S, P = self.capacity_tokens, self.pool_slots
        if R != self.rows or K > P:
            raise ValueError(f"slot pool has {self.rows} rows of {P} slots; asked for [{R}, {K}]")
        self.step += 1
        if valid is None:
            valid = torch.ones_like(wanted, dtype=torch.bool)
        pos = wanted.masked_fill(~valid, S)  # padding reads the spare column (-1: not resident)
        current = self.slot_of_pos.gather(1, pos)  # [R, K]
        hit = valid & (current >= 0)
        miss = valid & ~hit

        # Slots holding a position selected now may not be evicted; among the rest, empty slots
        # (last_used -1) go first, then the least recently selected.
        in_use = torch.zeros(R, P + 1, dtype=torch.bool, device=self.device)
        in_use.scatter_(1, current.masked_fill(~hit, P), True)
        key = self.last_used[:, :P].masked_fill(in_use[:, :P], torch.iinfo(torch.int64).max)
        order = key.argsort(dim=1, stable=True)  # [R, P]
        rank = (miss.cumsum(dim=1) - 1).clamp(min=0)  # k-th miss of its row takes the k-th victim
        victim = order.gather(1, rank)  # [R, K]
        evicted = self.pos_of_slot.gather(1, victim)

        # Apply: unmap evicted positions, then map the misses (evicted ones are never selected
        # now, since a selected resident position is a hit and its slot is in use).
        self.slot_of_pos.scatter_(1, evicted.masked_fill(~miss | (evicted < 0), S), -1)
        self.slot_of_pos.scatter_(1, wanted.masked_fill(~miss, S), victim)
        self.pos_of_slot.scatter_(1, victim.masked_fill(~miss, P), wanted)
        slots = torch.where(hit, current, victim).masked_fill(~valid, 0)
        self.last_used.scatter_(1, slots.masked_fill(~valid, P), self.step)

        src = (self._row * S + wanted).masked_fill(~miss, -1).reshape(-1)
        dst = (self._row * self.row_pitch + victim).masked_fill(~miss, -1).reshape(-1)
        return SlotPlan(slots=slots, src_rows=src, dst_rows=dst, fetched=miss.sum(), selected=valid.sum())
