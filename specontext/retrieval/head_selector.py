"""SpeContext's selector: the retrieval head chooses, once per decode step, for every layer.

Shape letters: B batch, H head query heads, Gh head KV heads, G target KV heads, D head dim,
P past positions, K budget.
"""

from __future__ import annotations

import torch

from ..kv.plan import Selection, append_current, to_device
from .focus import focus_layer_weights, pinned_mask
from .head import RetrievalHead
from .selector import Selector


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
        # decode steps that ran dense, not keyed yet: (ids [B, 1], positions [B, 1], carried
        # hidden [B, L*E] or None, rows with a token)
        self._pending: list[tuple] = []

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

    def defer(self, ids, plan):
        # While the context fits in the budget, nothing is chosen: the step's inputs are kept
        # (the carried hidden state is a new tensor each step, never written in place) and
        # keyed together at the first sparse step, so a step that fits costs what dense does.
        rows = tuple(b for b, n in enumerate(plan.input_lens) if n > 0)
        self._pending.append((ids, plan.positions, self.carry_hidden if self.capture_layers else None, rows))

    @torch.inference_mode()
    def key_pending(self) -> None:
        """Key every deferred token in one call of the head and store the keys (the first sparse
        step does it; call it to read a complete ``k_device`` before then)."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        ids = torch.cat([p[0] for p in pending], dim=1)  # [B, n]
        positions = torch.cat([p[1] for p in pending], dim=1)
        hidden = None if not self.capture_layers else torch.stack([p[2] for p in pending], dim=1)  # [B, n, L*E]
        embeds = self.embed(ids).to(self.input_dtype)
        if self.onnx:  # keys only: an empty cache to score against
            empty = self.k_device[:, :, :1]
            k = self.head(embeds, hidden, positions, empty,
                          torch.zeros(ids.shape[0], 1, dtype=torch.bool, device=empty.device))[0]
        else:
            _, k = self.head.project(self.head.inputs(embeds, hidden), positions)  # [B, Gh, n, Dh]
        dev = self.k_device.device
        b_idx = to_device([b for p in pending for b in p[3]], dev)
        t_idx = to_device([t for t, p in enumerate(pending) for _ in p[3]], dev)
        self.k_device[b_idx, :, positions[b_idx, t_idx]] = k[b_idx, :, t_idx]

    @torch.inference_mode()
    def prepare(self, ids, plan):
        # The new token's key enters the head's cache on every step (dense ones deferred), so it
        # competes for the budget once the context outgrows it.
        self.key_pending()
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
