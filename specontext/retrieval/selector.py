"""The selector interface every sparsity method implements, and what the methods share.

Shape letters: B batch, H target query heads, G target KV heads, P past positions, K budget.

Lifecycle per generation: ``observe(ids, plan, captured)`` after every target call (prefill
chunks and decode steps); ``select(ids, plan)`` before every decode step, returning a
:class:`~specontext.kv.plan.Selection` or None (dense). The engine puts it in the step's plan;
the cache gathers the chosen rows, so attention code never branches on the method.
"""

from __future__ import annotations

import time
from dataclasses import replace
from functools import partial
from typing import Callable

import torch

from ..kv.plan import Selection, append_current
from .focus import QueryFocus
from .recall import RecallMeter, SelectionStats


class Selector:
    """Base: dense. Subclasses override :meth:`choose` (global) or :meth:`choose_in_layer`.

    Lifecycle per generation: ``observe(ids, plan, captured)`` after every target call (prefill
    chunks and decode steps); ``select(ids, plan)`` before every decode step, returning a
    :class:`Selection` or None (dense).
    """

    method = "dense"
    capture_layers: tuple[int, ...] = ()
    # W > 0: the engine measures the prompt's last W queries' attention during prefill
    # (a QueryFocus) and hands it to set_focus before the first decode step
    focus_window_tokens: int = 0
    focus_keep: str = "total"
    focus_layers: str = "all"  # which layers' focus the pins average (focus.focus_layer_weights)

    def __init__(self, budget_tokens: int = 0, sink_tokens: int = 0, window_tokens: int = 0,
                 measure_recall: bool = False, num_kv_heads: int = 1, measure_selection_time: bool = False):
        self.num_kv_heads = num_kv_heads
        self.budget_tokens = budget_tokens
        self.sink_tokens = sink_tokens
        self.window_tokens = window_tokens
        self.measure_recall = measure_recall
        # a benchmark's request: synchronise the device around selection so selection_s is its
        # device time; otherwise the step never waits on the host for it
        self.measure_selection_time = measure_selection_time
        self.stats = SelectionStats()
        # per batch row: decode steps that ran sparse / dense (past within the budget) / fallback
        self.row_steps: dict[str, list[int]] = {}

    def allocated_bytes(self) -> int:
        return 0

    def row_stats(self, row: int) -> dict:
        """One batch row's step counts (``sparse_steps``, ``dense_steps``, ``fallback_steps``)."""
        return {k: (v[row] if row < len(v) else 0) for k, v in self.row_steps.items()}

    def _count_rows(self, plan, past_lens: list[int], sel: "Selection | None", fallback: bool) -> None:
        B = len(plan.input_lens)
        for key in ("sparse_steps", "dense_steps", "fallback_steps"):
            self.row_steps.setdefault(key, [0] * B)
        for b, (n, past) in enumerate(zip(plan.input_lens, past_lens)):
            if n == 0:  # a finished row riding along in the batch
                continue
            if fallback or (sel is not None and b in sel.fallback_rows):
                self.row_steps["fallback_steps"][b] += 1
            elif sel is None or past <= self.budget_tokens:
                self.row_steps["dense_steps"][b] += 1
            else:
                self.row_steps["sparse_steps"][b] += 1

    def set_focus(self, focus: QueryFocus) -> None:
        """The prompt's focus, measured by prefill (only called when ``focus_window_tokens`` > 0)."""

    def observe(self, ids: torch.Tensor, plan, captured: dict, is_prefill: bool = False) -> None:
        """Called after the target ran ``ids`` [B, T]; ``captured`` holds ``capture_layers`` outputs.

        ``is_prefill`` marks prompt chunks (whose keys the head must still compute, even for a
        one-token chunk); decode tokens were keyed in :meth:`prepare`.
        """

    def select(self, ids: torch.Tensor, plan) -> Selection | None:
        """Choose for the decode step about to run ``ids`` [B, 1] at ``plan.positions``."""
        if self.method == "dense":
            return None
        self._sync_for_timing(plan)
        t0 = time.perf_counter()
        past_lens = list(plan.starts)  # the host knows them: nothing is read back
        # rows with no token this step (finished requests of a batch) do not decide anything
        if max(p for p, n in zip(past_lens, plan.input_lens) if n > 0) <= self.budget_tokens:
            self.defer(ids, plan)
            self.stats.dense_steps += 1
            self._count_rows(plan, past_lens, None, False)
            return None
        self.prepare(ids, plan)
        sel = self.choose(ids, plan, past_lens)
        self._sync_for_timing(plan)
        self.stats.selection_s += time.perf_counter() - t0
        self._count_rows(plan, past_lens, sel, sel is None)
        if sel is None:
            self.stats.fallback_steps += 1
            return None
        self.stats.sparse_steps += 1
        if self.measure_recall:  # every layer's choice goes through the meter
            sel = replace(sel, policy=RecallMeter(sel, self.stats))
        return sel

    def _sync_for_timing(self, plan) -> None:
        if self.measure_selection_time and plan.positions.device.type == "cuda":
            torch.cuda.synchronize(plan.positions.device)

    def prepare(self, ids: torch.Tensor, plan) -> None:
        """Work a sparse decode step needs before choosing (the head keys the new token)."""

    def defer(self, ids: torch.Tensor, plan) -> None:
        """A decode step that runs dense (the past fits in the budget): work :meth:`prepare` would
        do may wait until the first sparse step, so a step that fits costs no more than dense."""
        self.prepare(ids, plan)

    def choose(self, ids: torch.Tensor, plan, past_lens: list[int]) -> Selection | None:
        return Selection(indices=None, policy=partial(_in_layer, self.choose_in_layer, plan.positions))

    def choose_in_layer(self, layer: int, queries: torch.Tensor, past_keys: torch.Tensor,
                        past_valid: torch.Tensor | None):
        raise NotImplementedError(f"{type(self).__name__} chooses globally")


def _in_layer(choose_in_layer: Callable, positions: torch.Tensor, layer: int, queries: torch.Tensor,
              past_keys: torch.Tensor, past_valid: torch.Tensor | None):
    """A per-layer method's :class:`~specontext.kv.plan.LayerPolicy`: its choice plus the current token."""
    chosen, chosen_valid = choose_in_layer(layer, queries, past_keys, past_valid)
    return append_current(chosen, chosen_valid, positions)


def _pad_rows(per_row: list[torch.Tensor], budget: int, device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Stack per-row [G, k_b] index sets (k_b <= budget) into [B, G, budget] plus a valid mask."""
    if all(r.shape[-1] == budget for r in per_row):
        return torch.stack(per_row), None
    G = per_row[0].shape[0]
    out = torch.zeros(len(per_row), G, budget, dtype=torch.int64, device=device)
    valid = torch.zeros(len(per_row), G, budget, dtype=torch.bool, device=device)
    for b, r in enumerate(per_row):
        out[b, :, :r.shape[-1]] = r
        valid[b, :, :r.shape[-1]] = True
    return out, valid
