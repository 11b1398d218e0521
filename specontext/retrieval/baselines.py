"""The baselines, in the same engine as SpeContext: StreamingLLM, the per-layer oracle, SnapKV, Quest.

Shape letters: B batch, H target query heads, G target KV heads, R = H / G, D head dim,
P past positions, K budget.
"""

from __future__ import annotations

import torch

from ..errors import InputError
from ..kv.plan import Selection, append_current
from .focus import pinned_mask
from .recall import past_attention
from .selector import Selector, _pad_rows


class StreamingSelector(Selector):
    """StreamingLLM: the first ``sink_tokens`` plus the most recent ``budget - sinks`` tokens."""

    method = "streaming"

    def choose(self, ids, plan, past_lens):
        G = self.num_kv_heads
        rows = []
        for p in past_lens:
            sinks = torch.arange(min(self.sink_tokens, p), device=plan.positions.device)
            recent_from = max(p - (self.budget_tokens - self.sink_tokens), len(sinks))
            recent = torch.arange(recent_from, p, device=plan.positions.device)
            rows.append(torch.cat([sinks, recent])[None].expand(G, -1))
        indices, valid = _pad_rows(rows, self.budget_tokens, plan.positions.device)
        indices, valid = append_current(indices, valid, plan.positions)
        return Selection(indices=indices, valid=valid)


class OracleSelector(Selector):
    """Per layer, the top-K positions of the target's own attention (max over each group's heads)."""

    method = "oracle"

    def choose_in_layer(self, layer, queries, past_keys, past_valid):
        scores = past_attention(queries, past_keys, past_valid).amax(dim=2)  # [B, G, P]
        if past_valid is None:
            return scores.topk(self.budget_tokens, dim=-1).indices, None
        top = scores.masked_fill(~past_valid[:, None], -1.0).topk(self.budget_tokens, dim=-1)
        return top.indices, top.values >= 0


class SnapKVSelector(Selector):
    """SnapKV: per layer and KV head, the prompt positions that layer's focus window attended to
    most (``K - sinks - window`` of them, max-pooled over ``pool_tokens``), plus the sinks and the
    most recent ``window_tokens``. The prompt choice is made once, after prefill."""

    method = "snapkv"
    focus_keep = "layers"

    def __init__(self, *args, focus_window_tokens: int = 32, pool_tokens: int = 15, **kwargs):
        super().__init__(*args, **kwargs)
        self.focus_window_tokens, self.pool_tokens = focus_window_tokens, pool_tokens
        self.pin_masks: list[torch.Tensor] | None = None  # per layer [B, G, P] bool

    def allocated_bytes(self) -> int:
        return sum(m.numel() for m in self.pin_masks or [])

    def set_focus(self, focus):
        n = self.budget_tokens - self.sink_tokens - self.window_tokens
        S = focus.capacity_tokens
        self.pin_masks = [pinned_mask(*focus.pins(n, self.pool_tokens, self.sink_tokens, layer=layer), S)
                          for layer in range(focus.num_layers)]

    def choose_in_layer(self, layer, queries, past_keys, past_valid):
        if self.pin_masks is None:
            raise InputError("snapkv needs the prompt's focus from prefill; prefill with this selector "
                             "(or a prefill state made with a focus window)")
        B, G, P, _ = past_keys.shape
        dev = past_keys.device
        pins = self.pin_masks[layer]
        scores = torch.zeros(B, G, P, device=dev)
        n = min(P, pins.shape[-1])
        scores[:, :, :n] = pins[:, :, :n].float()
        pos = torch.arange(P, device=dev)[None, :]
        lens = past_valid.sum(-1, keepdim=True) if past_valid is not None else torch.full((B, 1), P, device=dev)
        kept = (pos < self.sink_tokens) | (pos >= lens - self.window_tokens)
        scores = scores.masked_fill(kept[:, None], 2.0)
        if past_valid is not None:
            scores = scores.masked_fill(~past_valid[:, None], -1.0)
        top = scores.topk(min(self.budget_tokens, P), dim=-1)
        valid = top.values > 0.5  # neither pinned nor kept: not part of SnapKV's set
        indices = top.indices.masked_fill(~valid, 0)
        if top.indices.shape[-1] < self.budget_tokens:
            pad = self.budget_tokens - top.indices.shape[-1]
            indices = torch.nn.functional.pad(indices, (0, pad))
            valid = torch.nn.functional.pad(valid, (0, pad), value=False)
        return indices, valid


class QuestSelector(Selector):
    """Quest-style pages: per layer, rank ``page_tokens`` pages by their key bound; keep the last page."""

    method = "quest"

    def __init__(self, *args, page_tokens: int = 16, **kwargs):
        super().__init__(*args, **kwargs)
        self.page_tokens = page_tokens

    def choose_in_layer(self, layer, queries, past_keys, past_valid):
        if past_valid is None:
            return self._choose_pages(queries, past_keys)
        # rows of different lengths (a batch): each row's pages over its own past
        B, G, _, _ = past_keys.shape
        K = self.budget_tokens
        indices = past_keys.new_zeros(B, G, K, dtype=torch.int64)
        valid = torch.zeros(B, G, K, dtype=torch.bool, device=past_keys.device)
        for b, n in enumerate(past_valid.sum(-1).tolist()):
            if n <= K:
                indices[b, :, :n] = torch.arange(n, device=past_keys.device)
                valid[b, :, :n] = True
                continue
            idx, ok = self._choose_pages(queries[b:b + 1], past_keys[b:b + 1, :, :n])
            indices[b] = idx[0]
            valid[b] = True if ok is None else ok[0]
        return indices, valid

    def _choose_pages(self, queries, past_keys):
        """Rows of equal length: ([B, G, K] positions, valid mask or None)."""
        B, G, P, D = past_keys.shape
        H = queries.shape[1]
        page = self.page_tokens
        num_full = P // page
        last_len = P - num_full * page
        if last_len == 0:  # the newest full page plays the part of the current page
            num_full, last_len = num_full - 1, page
        full = past_keys[:, :, :num_full * page].reshape(B, G, num_full, page, D).float()
        kmin, kmax = full.amin(dim=3), full.amax(dim=3)  # [B, G, N, D]
        q = queries.reshape(B, G, H // G, 1, D).float()
        bound = torch.maximum(q * kmin[:, :, None], q * kmax[:, :, None]).sum(-1)  # [B, G, R, N]
        bound = bound.amax(dim=2)
        num_pages = min(max((self.budget_tokens - last_len) // page, 0), num_full)
        top = bound.topk(num_pages, dim=-1).indices  # [B, G, n]
        tokens = (top[..., None] * page + torch.arange(page, device=past_keys.device)).flatten(2)
        last = torch.arange(P - last_len, P, device=past_keys.device).expand(B, G, last_len)
        indices = torch.cat([tokens, last], dim=-1)
        pad = self.budget_tokens - indices.shape[-1]
        if pad <= 0:
            return indices[..., :self.budget_tokens], None
        valid = torch.cat([torch.ones_like(indices, dtype=torch.bool),
                           torch.zeros(B, G, pad, dtype=torch.bool, device=indices.device)], dim=-1)
        return torch.cat([indices, indices.new_zeros(B, G, pad)], dim=-1), valid
