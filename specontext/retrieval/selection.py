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

The interface is in ``selector.py``, the baselines in ``baselines.py``, SpeContext's head in
``head_selector.py``; this module holds the user's choice (:class:`SparsityOptions`) and makes the
selector for it. Which methods are global or per layer is in ``specontext/methods.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import InputError
from ..methods import METHODS
from .baselines import OracleSelector, QuestSelector, SnapKVSelector, StreamingSelector
from .focus import parse_layer_list
from .head import RetrievalHead
from .head_selector import HeadSelector
from .selector import Selector

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
