"""The upper bound of SpeContext's selection: one index set per KV head for all layers, chosen
from the target's own attention (a perfect retrieval head), measured teacher-forced.

A per-layer oracle (``--sparsity oracle``) may pick a different set in every layer, which a
global selection cannot; this oracle picks, per step and KV head, the top-B positions of the
target's attention averaged over layers and over the group's query heads. That set holds the most
mean attention mass (the recall the harness reports) of any single set, so it bounds what any
retrieval head can reach at that budget. It needs the target's attention before the step runs,
so it works in two passes over a known continuation:

1. :class:`AttentionRecorder` runs every step attending to all past tokens (the dense result)
   and keeps, per step, the layer- and head-mean attention over the past [B, G, P];
2. :class:`ReplayedGlobalOracle` replays those scores as the selection of a second pass, with the
   same always-kept sinks and recent window as the retrieval head.

Only teacher-forced scoring can replay: a free-running generation would leave the recorded path.

Shape letters: B batch (1 here), G target KV heads, R query heads per KV head, P past positions.
"""

from __future__ import annotations

import torch

from specontext.kv.plan import Selection, append_current
from specontext.retrieval.recall import past_attention
from specontext.retrieval.selector import Selector

METHOD = "oracle-global"


class AttentionRecorder(Selector):
    """Pass 1: attend to every past token and record the layer-mean, head-mean attention per step."""

    method = "record-attention"

    def __init__(self, num_layers: int, num_kv_heads: int):
        super().__init__(budget_tokens=0, num_kv_heads=num_kv_heads)
        self.num_layers = num_layers
        self.scores: dict[int, torch.Tensor] = {}  # past length P -> [B, G, P] float32

    def choose(self, ids, plan, past_lens):
        if len(past_lens) != 1:
            raise ValueError("the global-oracle recorder runs one sequence at a time")
        self._past = past_lens[0]
        self.scores[self._past] = torch.zeros(1, self.num_kv_heads, self._past)
        self._positions = plan.positions
        return Selection(indices=None, policy=self._record_layer)

    def _record_layer(self, layer, queries, past_keys, past_valid):
        probs = past_attention(queries, past_keys, past_valid)  # [B, G, R, P]
        self.scores[self._past] += probs.mean(dim=2).cpu() / self.num_layers
        B, G, P, _ = past_keys.shape
        return append_current(torch.arange(P, device=past_keys.device).expand(B, G, P), None, self._positions)


class ReplayedGlobalOracle(Selector):
    """Pass 2: per KV head, the recorded top-B (sinks and the recent window always kept), every layer."""

    method = METHOD

    def __init__(self, scores: dict[int, torch.Tensor], budget_tokens: int, sink_tokens: int, window_tokens: int,
                 num_kv_heads: int, measure_recall: bool = True):
        super().__init__(budget_tokens, sink_tokens, window_tokens, measure_recall, num_kv_heads)
        self.scores = scores

    def choose(self, ids, plan, past_lens):
        P = past_lens[0]
        if len(past_lens) != 1 or P not in self.scores:
            raise ValueError(f"no recorded attention for a step with {P} past tokens")
        device = plan.positions.device
        scores = self.scores[P].to(device)
        pos = torch.arange(P, device=device)
        pinned = (pos < self.sink_tokens) | (pos >= P - self.window_tokens)
        top = scores.masked_fill(pinned, 2.0).topk(self.budget_tokens, dim=-1).indices.sort(dim=-1).values
        indices, valid = append_current(top, None, plan.positions)
        return Selection(indices=indices, valid=valid)
