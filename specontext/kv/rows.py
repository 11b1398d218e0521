"""Writing a step's new rows into [B, G, S, D] buffers at the plan's positions (every KV layer kind)."""

from __future__ import annotations

import torch

from .plan import StepPlan


def store_rows(k_buf: torch.Tensor, v_buf: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: StepPlan) -> None:
    """Write k, v [B, G, T, D] into buffers [B, G, S, D] at the plan's positions."""
    if plan.static:  # one token per row at its position: the same kernel every step
        rows = torch.arange(k.shape[0], device=k.device)
        k_buf[rows, :, plan.positions[:, 0]] = k[:, :, 0]
        v_buf[rows, :, plan.positions[:, 0]] = v[:, :, 0]
    elif plan.write_start is not None:
        end = plan.write_start + k.shape[2]
        k_buf[:, :, plan.write_start:end] = k
        v_buf[:, :, plan.write_start:end] = v
    else:
        b_idx, pos = plan.valid_index
        t_idx = pos - plan.positions[b_idx, 0]
        # Advanced indices around a slice put the selected axis first: [N, G, D].
        k_buf[b_idx, :, pos] = k[b_idx, :, t_idx]
        v_buf[b_idx, :, pos] = v[b_idx, :, t_idx]
