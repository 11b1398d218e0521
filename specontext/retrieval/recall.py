"""Recall: how much of the dense attention on the past a selection keeps, measured per layer.

Shape letters: B batch, H query heads, G KV heads, R = H / G, P past positions, K budget, D head dim.

Measuring needs each layer's queries and past keys, so it runs inside attention: the selector
hands the step's selection to a :class:`RecallMeter`, which attention calls as the step's
per-layer policy (``kv/plan.py``); the meter returns the same choice and adds its recall to the
selector's :class:`SelectionStats`. Nothing in the cache or the step knows it is being measured.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kv.plan import Selection


@dataclass
class SelectionStats:
    """Counters a selector keeps over one generation."""

    sparse_steps: int = 0
    dense_steps: int = 0  # decode steps that ran dense because the context fit in the budget
    fallback_steps: int = 0  # decode steps that ran dense because the head was not confident
    # time spent scoring and choosing, host clock; on CUDA the device's time only with
    # ``measure_selection_time`` (which synchronises), otherwise the time to queue the work
    selection_s: float = 0.0
    recall_sum: float = 0.0
    recall_count: int = 0
    confidence_sum: float = 0.0

    @property
    def recall(self) -> float | None:
        return self.recall_sum / self.recall_count if self.recall_count else None

    def to_dict(self) -> dict:
        out = {"sparse_steps": self.sparse_steps, "dense_steps": self.dense_steps,
               "fallback_steps": self.fallback_steps, "selection_s": round(self.selection_s, 4)}
        if self.recall is not None:
            out["recall"] = round(self.recall, 4)
        if self.sparse_steps + self.fallback_steps and self.confidence_sum:
            out["mean_head_confidence"] = round(self.confidence_sum / (self.sparse_steps + self.fallback_steps), 4)
        return out


def past_attention(queries: torch.Tensor, past_keys: torch.Tensor,
                   past_valid: torch.Tensor | None = None) -> torch.Tensor:
    """Dense attention probabilities of the current token over past positions only.

    Args:
        queries: [B, H, 1, D] roped queries of the current token; past_keys: [B, G, P, D];
        past_valid: [B, P] bool, False past a shorter row's end (None: all real).
    Returns:
        [B, G, R, P] float32, softmax over the P past positions (the current token excluded, so
        recall measures how much of the mass on the past the chosen set holds).
    """
    B, H, _, D = queries.shape
    G = past_keys.shape[1]
    q = queries.reshape(B, G, H // G, D).float()
    logits = torch.matmul(q, past_keys.float().transpose(-1, -2)) * D ** -0.5
    if past_valid is not None:
        logits = logits.masked_fill(~past_valid[:, None, None, :], float("-inf"))
    return logits.softmax(dim=-1)


def record_recall(stats: SelectionStats, probs: torch.Tensor, indices: torch.Tensor,
                  valid: torch.Tensor | None) -> None:
    """Add the mass of ``probs`` [B, G, R, P] on ``indices`` [B, G, K] (past positions) to ``stats``."""
    R = probs.shape[2]
    idx = indices[:, :, None, :].expand(-1, -1, R, -1)
    mass = probs.gather(-1, idx)
    if valid is not None:
        mass = mass * valid[:, :, None, :]
    stats.recall_sum += float(mass.sum(-1).mean())
    stats.recall_count += 1


class RecallMeter:
    """The step's selection, seen per layer, with recall recorded where the layer's past keys are
    on the device (an offloaded layer's are not; it is served the same choice unmeasured)."""

    def __init__(self, selection: Selection, stats: SelectionStats):
        self.selection, self.stats = selection, stats

    def __call__(self, layer: int, queries: torch.Tensor, past_keys: torch.Tensor | None,
                 past_valid: torch.Tensor | None):
        sel = self.selection
        if sel.policy is not None:
            indices, valid = sel.policy(layer, queries, past_keys, past_valid)
        else:
            indices, valid = sel.indices, sel.valid
        if past_keys is not None:
            probs = past_attention(queries, past_keys, past_valid)
            record_recall(self.stats, probs, indices[..., :-1], None if valid is None else valid[..., :-1])
        return indices, valid
