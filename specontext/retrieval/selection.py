"""Which cached tokens each decode step attends to: SpeContext selection and the baselines.

Shape letters: B batch, H target query heads, G target KV heads, R = H / G, D head dim,
P past positions (cached before the current token), K budget (past tokens attended per KV head).

Every method lives behind one interface, :class:`Selector`, so comparisons run in the same engine:

* ``dense``: everything, every step.
* ``specontext``: the retrieval head scores all past positions once per step, before the target
  runs; per KV head the max over its query heads, then the top ``K - sinks - window`` plus the
  always-kept sinks and recent window. One index set [B, G, K] serves every layer.
* ``oracle``: per layer, the top-K of that layer's own attention (group max over its query heads),
  the upper bound of any per-KV-head selection.
* ``quest``: per layer, pages of ``page_tokens`` ranked by the upper bound sum_d max(q_d min_d,
  q_d max_d) of their keys; the current (partial) page is always kept.
* ``streaming``: StreamingLLM, sinks plus the most recent ``K - sinks`` tokens.
* ``snapkv``: SnapKV, per layer: the prompt positions the prefill's focus window attended to most
  in that layer (``focus.py``), plus sinks and the recent window; static for the whole generation.

Query-focused pinning (``pin_fraction`` > 0, specontext): the top ``round(pin_fraction * K)``
prompt positions of the focus window's attention (mean over layers, see ``focus.py``) are kept on
every step, as sinks and the window are; the head chooses the rest of K.

The budget counts every past token attended per KV head; the current token always attends to
itself on top. When every row has at most K past tokens the step runs dense, so a budget at or
above the context gives exactly the dense result. Prefill is always dense.

A selector fills ``plan.selection`` (a :class:`Selection`) for decode steps; the cache gathers the
chosen rows (see ``DenseKVCache.update``), so attention code never branches on the method.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from functools import partial
from typing import Callable

import torch

from ..errors import InputError
from ..kv.plan import Selection, append_current, to_device
from .focus import QueryFocus, focus_layer_weights, parse_layer_list, pinned_mask
from .head import RetrievalHead
from .recall import RecallMeter, SelectionStats, past_attention

METHODS = ("dense", "specontext", "oracle", "quest", "streaming", "snapkv")
# methods that choose inside each layer from all of its keys, so they need every layer on the device
PER_LAYER_METHODS = ("oracle", "quest", "snapkv")


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
        self.prepare(ids, plan)
        past_lens = list(plan.starts)  # the host knows them: nothing is read back
        # rows with no token this step (finished requests of a batch) do not decide anything
        if max(p for p, n in zip(past_lens, plan.input_lens) if n > 0) <= self.budget_tokens:
            self.stats.dense_steps += 1
            self._count_rows(plan, past_lens, None, False)
            return None
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
        """Work every decode step needs, sparse or not (the head caches the new token's key)."""

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


class HeadSelector(Selector):
    """SpeContext: the retrieval head chooses one index set per KV head for every layer.

    Args:
        head: a loaded :class:`RetrievalHead` (its target already checked), run with torch; or an
            ``onnx_head.OnnxHeadRunner``, which runs each step's head work on ONNX Runtime (the
            K cache is then in the runner's ``keys_dtype`` and passed whole, with the past marked
            valid).
        embed: the target's token embedding module.
        batch_size, capacity_tokens: the head's K cache shape.
        fallback_threshold: run the step dense when the head's own attention mass on its chosen
            set, averaged over its query heads and rows, is below this (0 disables).
        block_tokens: N > 1 selects whole blocks of N consecutive positions (block n = positions
            nN..nN+N-1): each block scores the max of its positions, the blocks holding sinks or
            the recent window are always kept, and the top K / N blocks are kept. Positions past
            the end of the cache in the newest (partial) block are padding.
    """

    method = "specontext"

    def __init__(self, head: RetrievalHead, embed: torch.nn.Module, batch_size: int, capacity_tokens: int,
                 budget_tokens: int, sink_tokens: int, window_tokens: int, fallback_threshold: float = 0.0,
                 measure_recall: bool = False, block_tokens: int = 1, pin_tokens: int = 0,
                 focus_window_tokens: int = 0, pool_tokens: int = 1, focus_layers: str = "all",
                 measure_selection_time: bool = False):
        super().__init__(budget_tokens, sink_tokens, window_tokens, measure_recall,
                         num_kv_heads=head.config.target.num_kv_heads, measure_selection_time=measure_selection_time)
        self.block_tokens = block_tokens
        self.pin_tokens, self.pool_tokens = pin_tokens, pool_tokens
        self.focus_window_tokens = focus_window_tokens if pin_tokens else 0
        self.focus_layers = focus_layers
        self.capacity_tokens = capacity_tokens
        self.pin_mask: torch.Tensor | None = None  # [B, G, capacity] bool: pinned prompt positions
        self.head, self.embed = head, embed
        cfg = head.config
        self.capture_layers = tuple(cfg.hidden_layers) if cfg.input_kind == "embedding+hidden" else ()
        self.fallback_threshold = fallback_threshold
        # set by the engine for caches that cannot serve one row's whole past (offloaded layers'
        # slots hold K tokens): any row's fallback then runs the whole step dense
        self.whole_step_fallback = False
        self.onnx = not isinstance(head, RetrievalHead)
        if self.onnx:  # float32 inputs; the K cache in the dtype the graph reads (float16 on CUDA)
            dtype, keys_dtype, device = torch.float32, head.keys_dtype, head.device
        else:
            p = next(head.parameters())
            dtype, keys_dtype, device = p.dtype, p.dtype, p.device
        self.input_dtype = dtype  # of the embeddings and hidden states the head reads
        self.k_device = torch.zeros(batch_size, cfg.num_kv_heads, capacity_tokens, cfg.head_dim,
                                    dtype=keys_dtype, device=device)
        e = cfg.target.hidden_size
        # target outputs at the position before the next one the head will see: [B, L*E]
        self.carry_hidden = torch.zeros(batch_size, len(self.capture_layers) * e, dtype=dtype, device=device)
        self._scores: torch.Tensor | None = None  # [B, G, S] from the ONNX step, for choose()

    def allocated_bytes(self) -> int:
        bufs = (self.k_device, self.carry_hidden, self.pin_mask)
        return sum(t.numel() * t.element_size() for t in bufs if t is not None)

    def set_focus(self, focus):
        weights = focus_layer_weights(self.focus_layers, focus.num_layers, focus.num_kv_heads)
        positions, valid = focus.pins(self.pin_tokens, self.pool_tokens, self.sink_tokens, layer_weights=weights)
        self.pin_mask = pinned_mask(positions, valid, self.capacity_tokens)

    def _hidden(self, captured: dict) -> torch.Tensor | None:
        if not self.capture_layers:
            return None
        return torch.cat([captured[i] for i in self.capture_layers], dim=-1)  # [B, T, L*E]

    @torch.inference_mode()
    def observe(self, ids, plan, captured, is_prefill=False):
        hidden = self._hidden(captured)
        B, T = ids.shape
        if is_prefill:  # keys for every position of the chunk
            if hidden is not None:
                shifted = torch.cat([self.carry_hidden[:, None].to(hidden.dtype), hidden[:, :-1]], dim=1)
            else:
                shifted = None
            embeds = self.embed(ids).to(self.input_dtype)
            shifted = None if shifted is None else shifted.to(self.input_dtype)
            if self.onnx:  # keys only: an empty cache to score against
                empty = self.k_device[:, :, :1]
                k = self.head(embeds, shifted, plan.positions, empty,
                              torch.zeros(B, 1, dtype=torch.bool, device=empty.device))[0]
            else:
                _, k = self.head.project(self.head.inputs(embeds, shifted), plan.positions)  # [B, Gh, T, Dh]
            if plan.write_start is not None:
                self.k_device[:, :, plan.write_start:plan.write_start + T] = k
            else:  # rows of different lengths (batched prompts): only the real tokens
                b_idx, pos = plan.valid_index
                t_idx = pos - plan.positions[b_idx, 0]
                self.k_device[b_idx, :, pos] = k[b_idx, :, t_idx]
        if hidden is not None:
            # A new tensor, never written in place: a prefill state shares its carry with every
            # decode started from it. A row with no tokens this step (finished) keeps its carry.
            if T == 1:
                carry = hidden[:, 0].to(self.input_dtype)
            else:
                last = to_device([max(n - 1, 0) for n in plan.input_lens], hidden.device)
                carry = hidden[torch.arange(B, device=hidden.device), last].to(self.input_dtype)
            if min(plan.input_lens) == 0:
                idle = to_device([n == 0 for n in plan.input_lens], hidden.device).bool()
                carry = torch.where(idle[:, None], self.carry_hidden, carry)
            self.carry_hidden = carry

    @torch.inference_mode()
    def prepare(self, ids, plan):
        # The new token's key enters the head's cache on every step, dense ones included, so
        # it competes for the budget once the context outgrows it.
        hidden = self.carry_hidden[:, None] if self.capture_layers else None
        embeds = self.embed(ids).to(self.input_dtype)
        if self.onnx:  # projection and scores in one call, over the whole cache with the past valid
            past = torch.arange(self.k_device.shape[2], device=self.k_device.device)[None] < plan.positions[:, :1]
            k, self._q, self._scores = self.head(embeds, hidden, plan.positions, self.k_device, past)
        else:
            self._q, k = self.head.project(self.head.inputs(embeds, hidden), plan.positions)  # [B, H, 1, Dh], [B, Gh, 1, Dh]
        if min(plan.input_lens) > 0:
            rows = torch.arange(len(plan.input_lens), device=self.k_device.device)
        else:  # finished requests of a batch keep their keys
            rows = to_device([b for b, n in enumerate(plan.input_lens) if n > 0], self.k_device.device)
        self.k_device[rows, :, plan.positions[rows, 0]] = k[rows, :, 0]

    @torch.inference_mode()
    def choose(self, ids, plan, past_lens):
        dev = self.k_device.device
        q = self._q
        P = max(past_lens)
        lens = to_device(past_lens, dev)
        valid = (torch.arange(P, device=dev)[None, :] < lens[:, None])[:, None]  # [B, 1, P]
        if self.onnx:
            probs = self._scores[:, :, :P]  # positions outside each row's past scored 0
        else:
            probs = self.head.group_probs(q, self.k_device[:, :, :P], valid)[:, :, 0]  # [B, G, P]
        # Sinks and the recent window are always kept: give them a score above any probability.
        pinned = torch.arange(P, device=dev)[None, :]
        pinned = ((pinned < self.sink_tokens) | (pinned >= (lens[:, None] - self.window_tokens)))[:, None]
        scores = probs
        if self.pin_mask is not None:  # the prompt's focus: kept after sinks and window, before the head's choice
            scores = scores.masked_fill(self.pin_mask[:, :, :P], 1.5)
        scores = scores.masked_fill(pinned, 2.0).masked_fill(~valid, -1.0)
        K = self.budget_tokens
        if self.block_tokens > 1:
            indices, chosen_valid = self._choose_blocks(scores, lens, P)
        else:
            top = scores.topk(K, dim=-1)
            indices, chosen_valid = top.indices, None
            if min(past_lens) < K:
                chosen_valid = top.values >= 0
        if chosen_valid is None:
            indices = indices.sort(dim=-1).values
        fallback_rows: tuple[int, ...] = ()
        if self.fallback_threshold > 0:
            confidence = self._confidence(q, P, valid, indices, chosen_valid)  # [B]
            live = torch.tensor([n > 0 for n in plan.input_lens], device=dev)
            self.stats.confidence_sum += float(confidence[live].mean())
            low = (confidence < self.fallback_threshold) & live
            if bool(low[live].all()) or (self.whole_step_fallback and bool(low.any())):
                return None
            if bool(low.any()):  # only some rows: those attend to their whole past this step
                fallback_rows = tuple(low.nonzero()[:, 0].tolist())
                indices, chosen_valid = self._whole_past_rows(indices, chosen_valid, low, lens, P)
        indices, chosen_valid = append_current(indices, chosen_valid, plan.positions)
        return Selection(indices=indices, valid=chosen_valid, fallback_rows=fallback_rows)

    @staticmethod
    def _whole_past_rows(indices, chosen_valid, rows, lens, P):
        """Widen [B, G, K] choices to max(K, P) columns; ``rows`` [B] bool get every past position,
        in order (so their attention reads exactly what a dense step reads)."""
        B, G, K = indices.shape
        W = max(K, P)
        dev = indices.device
        if chosen_valid is None:
            chosen_valid = torch.ones(B, G, K, dtype=torch.bool, device=dev)
        wide = torch.nn.functional.pad(indices, (0, W - K))
        wide_valid = torch.nn.functional.pad(chosen_valid, (0, W - K), value=False)
        every = torch.arange(W, device=dev)
        every_valid = (every[None, :] < lens[:, None])[:, None].expand(B, G, W)
        wide = torch.where(rows[:, None, None], every.clamp_max(P - 1)[None, None].expand(B, G, W), wide)
        wide_valid = torch.where(rows[:, None, None], every_valid, wide_valid)
        return wide, wide_valid

    def _choose_blocks(self, scores: torch.Tensor, lens: torch.Tensor, P: int):
        """Top K / N blocks by their best position's score -> positions [B, G, K] and valid mask."""
        N = self.block_tokens
        B, G, _ = scores.shape
        num_blocks = -(-P // N)
        padded = torch.nn.functional.pad(scores, (0, num_blocks * N - P), value=-1.0)
        block_scores = padded.view(B, G, num_blocks, N).amax(dim=-1)  # pinned positions make their block 2.0
        keep = min(self.budget_tokens // N, num_blocks)
        blocks = block_scores.topk(keep, dim=-1).indices.sort(dim=-1).values  # [B, G, keep]
        positions = (blocks[..., None] * N + torch.arange(N, device=scores.device)).flatten(2)  # [B, G, keep*N]
        chosen_valid = positions < lens[:, None, None]
        pad = self.budget_tokens - positions.shape[-1]
        if pad > 0:
            positions = torch.nn.functional.pad(positions, (0, pad))
            chosen_valid = torch.nn.functional.pad(chosen_valid, (0, pad), value=False)
        return positions.masked_fill(~chosen_valid, 0), chosen_valid

    def _confidence(self, q, P, valid, indices, chosen_valid) -> torch.Tensor:
        """Per row [B], the head's probability mass on the chosen set, mean over its query heads."""
        cfg = self.head.config
        B, H, _, D = q.shape
        Gh = cfg.num_kv_heads
        qf = q.reshape(B, Gh, H // Gh, D).float()
        logits = torch.matmul(qf, self.k_device[:, :, :P].float().transpose(-1, -2)) * D ** -0.5
        probs = logits.view(B, H, P).masked_fill(~valid, float("-inf")).softmax(-1)  # [B, H, P]
        G = cfg.target.num_kv_heads
        idx = indices.repeat_interleave(H // G, dim=1)  # [B, H, K]
        mass = probs.gather(-1, idx)
        if chosen_valid is not None:
            mass = mass * chosen_valid.repeat_interleave(H // G, dim=1)
        return mass.sum(-1).mean(-1)


@dataclass(frozen=True)
class SparsityOptions:
    """The user's sparsity choice, validated (built from RuntimeSettings)."""

    method: str = "dense"
    budget_tokens: int = 1024
    sink_tokens: int = 4
    window_tokens: int = 60
    page_tokens: int = 16
    fallback_threshold: float = 0.0
    measure_recall: bool = False
    # benchmarks: make SelectionStats.selection_s the device's time on CUDA, at the cost of a
    # device synchronisation before and after every selection (off: the step never waits for it)
    measure_selection_time: bool = False
    block_tokens: int = 1
    pin_fraction: float = 0.5
    focus_window_tokens: int = 32
    focus_pool_tokens: int = 15
    focus_layers: str = "late"

    @property
    def pin_tokens(self) -> int:
        """Prompt positions pinned by the focus window (specontext), inside the budget."""
        return round(self.pin_fraction * self.budget_tokens) if self.method == "specontext" else 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise InputError(f"sparsity must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.sink_tokens < 0 or self.window_tokens < 0:
            raise InputError(f"sink and window tokens must be >= 0, got {self.sink_tokens} and {self.window_tokens}")
        if not (math.isfinite(self.pin_fraction) and 0 <= self.pin_fraction < 1):
            raise InputError(f"pin_fraction must be in [0, 1) (0 = no pinning), got {self.pin_fraction}")
        if self.focus_window_tokens < 1:
            raise InputError(f"focus_window_tokens must be >= 1, got {self.focus_window_tokens}")
        if self.focus_layers not in ("all", "late"):
            parse_layer_list(self.focus_layers, 1 << 20)  # the syntax here; the range once the model is known
        if self.focus_pool_tokens < 1 or self.focus_pool_tokens % 2 == 0:
            raise InputError(f"focus_pool_tokens must be an odd number >= 1 (1 = no smoothing), "
                             f"got {self.focus_pool_tokens}")
        if self.method == "specontext":
            fixed = self.sink_tokens + self.window_tokens
            if self.budget_tokens < fixed + self.pin_tokens + 1:
                if not self.pin_tokens:
                    raise InputError(f"budget must be > sinks + window (= {fixed}) so the head chooses at least one "
                                     f"token; got {self.budget_tokens}, use at least {fixed + 1}")
                minimum = next(b for b in range(fixed + 1, 1 << 40)
                               if b >= fixed + round(self.pin_fraction * b) + 1)
                raise InputError(f"budget must leave the head at least one token after sinks + window (= {fixed}) "
                                 f"and pins ({self.pin_fraction:g} of the budget = {self.pin_tokens}); got "
                                 f"{self.budget_tokens}, use at least {minimum} (or pin_fraction=0)")
        if self.method == "snapkv" and self.budget_tokens <= self.sink_tokens + self.window_tokens:
            minimum = self.sink_tokens + self.window_tokens + 1
            raise InputError(f"budget must be > sinks + window (= {minimum - 1}) for snapkv; got {self.budget_tokens}, "
                             f"use at least {minimum}")
        if self.method == "streaming" and self.budget_tokens <= self.sink_tokens:
            raise InputError(f"budget must be > sinks (= {self.sink_tokens}) for streaming; got {self.budget_tokens}, "
                             f"use at least {self.sink_tokens + 1}")
        if self.method == "quest":
            if self.page_tokens < 1:
                raise InputError(f"page_tokens must be >= 1, got {self.page_tokens}")
            if self.budget_tokens < self.page_tokens:
                raise InputError(f"budget must be >= one page ({self.page_tokens} tokens) for quest; "
                                 f"got {self.budget_tokens}")
        if self.block_tokens < 1:
            raise InputError(f"block_tokens must be >= 1 (1 = token-level selection), got {self.block_tokens}")
        if self.block_tokens > 1:
            if self.method != "specontext":
                raise InputError(f"block_tokens applies to --sparsity specontext only, got {self.method!r}")
            if self.budget_tokens % self.block_tokens:
                raise InputError(f"budget must be a multiple of block_tokens ({self.block_tokens}); got "
                                 f"{self.budget_tokens}, use {self.budget_tokens // self.block_tokens * self.block_tokens or self.block_tokens}")
        if self.method != "dense" and self.budget_tokens < 1:
            raise InputError(f"budget must be >= 1, got {self.budget_tokens}")
        if not 0 <= self.fallback_threshold <= 1:
            raise InputError(f"fallback_threshold must be in [0, 1] (0 = off), got {self.fallback_threshold}")


def make_selector(opts: SparsityOptions, num_kv_heads: int, head: RetrievalHead | None = None, embed=None,
                  batch_size: int = 1, capacity_tokens: int = 0) -> Selector:
    """The selector for ``opts``; ``specontext`` needs the loaded ``head`` and the target's ``embed``."""
    common = dict(budget_tokens=opts.budget_tokens, measure_recall=opts.measure_recall, num_kv_heads=num_kv_heads,
                  measure_selection_time=opts.measure_selection_time)
    if opts.method == "dense":
        return Selector()
    if opts.method == "streaming":
        return StreamingSelector(sink_tokens=opts.sink_tokens, **common)
    if opts.method == "oracle":
        return OracleSelector(**common)
    if opts.method == "quest":
        return QuestSelector(page_tokens=opts.page_tokens, **common)
    if opts.method == "snapkv":
        return SnapKVSelector(sink_tokens=opts.sink_tokens, window_tokens=opts.window_tokens,
                              focus_window_tokens=opts.focus_window_tokens, pool_tokens=opts.focus_pool_tokens, **common)
    if head is None:
        raise InputError("sparsity 'specontext' needs a retrieval head (--retrieval-head PATH or auto)")
    return HeadSelector(head, embed, batch_size, capacity_tokens, opts.budget_tokens, opts.sink_tokens,
                        opts.window_tokens, opts.fallback_threshold, opts.measure_recall, opts.block_tokens,
                        pin_tokens=opts.pin_tokens, focus_window_tokens=opts.focus_window_tokens,
                        pool_tokens=opts.focus_pool_tokens, focus_layers=opts.focus_layers,
                        measure_selection_time=opts.measure_selection_time)
