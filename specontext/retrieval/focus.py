"""Query-focused pinning: where the prompt's question looks, measured once at the end of prefill.

Shape letters: B batch, L layers, H target query heads, G target KV heads, R = H / G, D head dim,
T new tokens of a prefill chunk, W focus window (the prompt's last W queries), S key positions,
P prompt positions.

Prefill is exact, and a document question puts the question at the end of the prompt. The
attention of the prompt's last W queries over the whole prompt is then the model's own answer
to "which passages matter for this question" (QRHead's query-focused retrieval heads, SnapKV's
observation window). It costs one attention of W queries per layer on top of prefill.

:class:`QueryFocus` accumulates that attention while the prompt is prefilled, in whatever chunks
and batch rows the engine runs: for each layer, each window query's softmax over its causal past
(float32, the model's own scale), reduced over each KV group's R query heads (max by default, as
the retrieval head scores), averaged over the row's W window queries, and summed over layers.
:meth:`QueryFocus.pins` smooths the layer mean over neighbouring positions (a max-pool, so a
needle sentence is kept whole around its sharpest token) and returns the top positions per KV
head. The selectors keep those positions for the whole generation, inside the budget, as they
keep sinks and the recent window (``HeadSelector``); ``snapkv`` keeps only them, per layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..planner.memory import MAX_FOCUS_LOGITS  # one slice of window logits, as the planner counts it


class QueryFocus:
    """Accumulates the focus window's attention over the prompt during prefill.

    Args:
        prompt_lens: P_b, prompt tokens of each batch row (host ints).
        num_layers, num_heads, num_kv_heads: the target's L, H, G.
        capacity_tokens: positions of the score buffers (at least max(prompt_lens)).
        window_tokens: W, the last W prompt tokens of each row are the focus queries.
        device: where the scores live (the compute device).
        keep: ``"total"`` (default) keeps only the sum over layers [B, G, S]; ``"layers"`` also
            keeps each layer's [L, B, G, S] (per-layer pins: ``snapkv``); ``"heads"`` keeps each
            layer's per-query-head window mean [L, B, H, S] (for studies).
        head_reduce: ``"max"`` or ``"mean"`` over each KV group's query heads.
        layer_weights: [L, G] weight of each layer's focus in each KV group's mean (None: every
            layer alike). Layers weighted 0 in every group are not measured at all (unless a
            per-layer ``keep`` needs them). See :func:`focus_layer_weights`.

    Use: for each prefill chunk, ``plan.focus = focus if focus.begin_chunk(input_lens) else None``;
    each attention layer calls :meth:`observe` when ``plan.focus`` is set; then :meth:`pins`.
    """

    def __init__(self, prompt_lens: list[int], num_layers: int, num_heads: int, num_kv_heads: int,
                 capacity_tokens: int, window_tokens: int, device: torch.device | str,
                 keep: str = "total", head_reduce: str = "max", layer_weights: torch.Tensor | None = None):
        if window_tokens < 1:
            raise ValueError(f"window_tokens must be >= 1, got {window_tokens}")
        if keep not in ("total", "layers", "heads"):
            raise ValueError(f"keep must be total, layers or heads, got {keep!r}")
        if head_reduce not in ("max", "mean"):
            raise ValueError(f"head_reduce must be max or mean, got {head_reduce!r}")
        B, S = len(prompt_lens), max(capacity_tokens, max(prompt_lens))
        self.prompt_lens, self.capacity_tokens = list(prompt_lens), S
        self.num_layers, self.num_heads, self.num_kv_heads = num_layers, num_heads, num_kv_heads
        self.window_tokens = window_tokens
        self.keep, self.head_reduce = keep, head_reduce
        self.device = torch.device(device)
        self.total = torch.zeros(B, num_kv_heads, S, dtype=torch.float32, device=self.device)
        if layer_weights is None:
            layer_weights = torch.ones(num_layers, num_kv_heads)
        if tuple(layer_weights.shape) != (num_layers, num_kv_heads) or bool((layer_weights < 0).any()) \
                or bool((layer_weights.sum(0) <= 0).any()):
            raise ValueError(f"layer_weights must be [{num_layers}, {num_kv_heads}], >= 0, with weight in every KV "
                             f"group; got shape {tuple(layer_weights.shape)}")
        self.layer_weights = layer_weights.to(device=self.device, dtype=torch.float32)
        self._measured = [bool(w) for w in (layer_weights.sum(1) > 0).tolist()]
        self.by_layer = None
        if keep != "total":
            per = num_heads if keep == "heads" else num_kv_heads
            self.by_layer = torch.zeros(num_layers, B, per, S, dtype=torch.float32, device=self.device)
        self._done = [0] * B  # prompt tokens of each row already run (host)
        # this chunk's window queries: (row, first column, end column, the row's position before it)
        self._rows: list[tuple[int, int, int, int]] = []

    def allocated_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.total, self.by_layer) if t is not None)

    def begin_chunk(self, input_lens: list[int]) -> bool:
        """Plan the chunk about to run (``input_lens[b]`` new tokens per row); True when it holds
        any row's window queries, so its attention layers must call :meth:`observe`."""
        self._rows = []
        for b, n in enumerate(input_lens):
            start = max(self.prompt_lens[b] - self.window_tokens, self._done[b])
            end = min(self._done[b] + n, self.prompt_lens[b])
            if end > start:
                self._rows.append((b, start - self._done[b], end - self._done[b], self._done[b]))
            self._done[b] += n
        return bool(self._rows)

    @torch.inference_mode()
    def observe(self, layer: int, queries: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor | None) -> None:
        """Add one layer's window attention.

        Each row is scored over its own keys only, so a row's focus is computed exactly as it is
        when the row runs alone (ties among pooled scores then break the same way in a batch).

        Args:
            queries: [B, H, T, D] roped queries of the chunk; keys: [B, G, S, D] every cached key
                the chunk attends over; mask: unused (each window query sees the keys up to its
                own position), kept for the attention layer's call.
        """
        if not self._measured[layer] and self.keep == "total":
            return
        B, H, T, D = queries.shape
        G = keys.shape[1]
        R = H // G
        weight = self.layer_weights[layer][None, :, None]  # [1, G, 1]
        for b, lo, hi, before in self._rows:
            W = min(self.window_tokens, self.prompt_lens[b])
            num_keys = before + hi  # the row's keys up to its last window query in this chunk
            q = queries[b:b + 1, :, lo:hi].float().reshape(1, G, R, hi - lo, D)
            k = keys[b:b + 1, :, :num_keys].float().transpose(-1, -2)[:, :, None]  # [1, G, 1, D, S]
            # query column t of the chunk sits at position before + t and sees keys up to it
            q_pos = torch.arange(lo, hi, device=keys.device) + before
            causal = torch.arange(num_keys, device=keys.device)[None, :] <= q_pos[:, None]  # [t, S]
            group = torch.zeros(1, G, num_keys, dtype=torch.float32, device=keys.device)
            per_head = torch.zeros(1, G, R, num_keys, dtype=torch.float32, device=keys.device) \
                if self.keep == "heads" else None
            step = max(1, MAX_FOCUS_LOGITS // (H * num_keys))
            for s0 in range(0, hi - lo, step):  # slices of window queries bound the logits' size
                s1 = min(s0 + step, hi - lo)
                logits = torch.matmul(q[:, :, :, s0:s1], k) * D ** -0.5  # [1, G, R, t, S]
                probs = logits.masked_fill(~causal[s0:s1], float("-inf")).softmax(dim=-1)
                # per window query, the group's reduction over its heads; then the window mean (a
                # sum, so a window split over prefill chunks adds up to the same)
                reduced = probs.amax(dim=2) if self.head_reduce == "max" else probs.mean(dim=2)  # [1, G, t, S]
                group += reduced.sum(dim=2) / W
                if per_head is not None:
                    per_head += probs.sum(dim=3) / W
            self.total[b:b + 1, :, :num_keys] += group * weight
            if self.keep == "layers":
                self.by_layer[layer, b:b + 1, :, :num_keys] += group
            elif self.keep == "heads":
                self.by_layer[layer, b:b + 1, :, :num_keys] += per_head.reshape(1, H, num_keys)

    def scores(self, layer: int | None = None, layer_weights: torch.Tensor | None = None) -> torch.Tensor:
        """[B, G, P] focus per prompt position (P = max prompt length): the mean over layers
        weighted by ``layer_weights`` [L, G] (default: this focus's own), or one ``layer``'s.
        Other weights and single layers need ``keep="layers"``."""
        P = max(self.prompt_lens)
        if layer is None and (layer_weights is None or torch.equal(layer_weights.to(self.layer_weights),
                                                                    self.layer_weights)):
            return self.total[:, :, :P] / self.layer_weights.sum(0)[None, :, None]
        if self.keep != "layers":
            raise ValueError("per-layer focus (a single layer, or other layer weights) needs keep='layers'")
        if layer is not None:
            return self.by_layer[layer, :, :, :P]
        w = layer_weights.to(device=self.device, dtype=torch.float32)  # [L, G]
        return torch.einsum("lbgp,lg->bgp", self.by_layer[..., :P], w) / w.sum(0)[None, :, None]

    def pins(self, num_pins: int, pool_tokens: int = 1, sink_tokens: int = 0, layer: int | None = None,
             layer_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``num_pins`` most focused prompt positions per row and KV head.

        Scores are max-pooled over ``pool_tokens`` neighbours (odd; 1 = none) first. Sink
        positions, always kept anyway, are not pinned, and neither is anything past a row's prompt.

        Returns:
            (positions [B, G, n] int64 sorted, valid [B, G, n] bool), n = ``num_pins``; a row whose
            prompt holds fewer candidates has its extra entries invalid (position 0).
        """
        return pins_from_scores(self.scores(layer, layer_weights), self.prompt_lens, num_pins, pool_tokens, sink_tokens)


def pins_from_scores(scores: torch.Tensor, prompt_lens: list[int], num_pins: int, pool_tokens: int = 1,
                     sink_tokens: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Top ``num_pins`` of ``scores`` [B, G, P] per row and KV head after smoothing (see :meth:`QueryFocus.pins`)."""
    B, G, P = scores.shape
    if sink_tokens:  # the sinks' large mass would spill onto their neighbours when pooled
        scores = scores.clone()
        scores[:, :, :sink_tokens] = 0.0
    if pool_tokens > 1:
        pad = pool_tokens // 2
        scores = F.max_pool1d(scores.reshape(B * G, 1, P), kernel_size=2 * pad + 1, stride=1,
                              padding=pad).view(B, G, P)
    pos = torch.arange(P, device=scores.device)
    lens = torch.tensor(prompt_lens, device=scores.device)
    candidate = (pos[None, :] >= min(sink_tokens, P)) & (pos[None, :] < lens[:, None])  # [B, P]
    # Rank on a 2^-16 grid, ties to the earlier position: scores a few ulps apart (the same prompt
    # alone or in a batch, where matmul shapes differ) then pin the same positions.
    rank = (scores.clamp(0, 1) * 65536).floor().to(torch.int64) * (P + 1) + (P - pos)
    n = min(num_pins, P)
    top = rank.masked_fill(~candidate[:, None], -1).topk(n, dim=-1)
    valid = top.values >= 0
    positions = top.indices.masked_fill(~valid, 0)
    order = positions.masked_fill(~valid, P).sort(dim=-1).indices  # valid ones first, ascending
    positions, valid = positions.gather(-1, order), valid.gather(-1, order)
    if n < num_pins:
        positions = F.pad(positions, (0, num_pins - n))
        valid = F.pad(valid, (0, num_pins - n), value=False)
    return positions, valid


def pinned_mask(positions: torch.Tensor, valid: torch.Tensor, capacity_tokens: int) -> torch.Tensor:
    """[B, G, capacity] bool, True at each valid pinned position (invalid entries mark nothing)."""
    B, G, _ = positions.shape
    hits = torch.zeros(B, G, capacity_tokens, dtype=torch.int32, device=positions.device)
    return hits.scatter_add_(-1, positions, valid.to(torch.int32)) > 0


def focus_layer_weights(spec: str, num_layers: int, num_kv_heads: int) -> torch.Tensor:
    """[L, G] layer weights from a user's ``focus_layers`` setting.

    ``all``: every layer; ``late``: the second half (layers L/2 .. L-1), where the question's
    attention lands on the passage it asks about (measured: bench_edge/focus_study.py); or a
    comma-separated list of layers and ranges, e.g. ``14-22,25``.
    """
    L, G = num_layers, num_kv_heads
    if spec == "all":
        return torch.ones(L, G)
    if spec == "late":
        return (torch.arange(L) >= L // 2).float()[:, None].expand(L, G).clone()
    chosen = parse_layer_list(spec, L)
    weights = torch.zeros(L, G)
    weights[chosen] = 1.0
    return weights


def parse_layer_list(spec: str, num_layers: int) -> list[int]:
    """``"14-22,25"`` -> [14, ..., 22, 25]; raises InputError naming what is wrong."""
    from ..errors import InputError

    layers: set[int] = set()
    for part in spec.replace(" ", "").split(","):
        lo, sep, hi = part.partition("-")
        try:
            first, last = int(lo), int(hi) if sep else int(lo)
        except ValueError:
            raise InputError(f"focus layers must be all, late, or layers and ranges like 14-22,25; got {spec!r}") \
                from None
        if not 0 <= first <= last < num_layers:
            raise InputError(f"focus layers must lie in 0..{num_layers - 1} (first <= last); got {part!r}")
        layers.update(range(first, last + 1))
    return sorted(layers)

