"""The step loop: chunked prefill, decode, sampling, streaming text and stopping.

Shape letters: B batch, T tokens, V vocabulary.

A :class:`Generation` is an iterator of text pieces. Its ``result()`` can be taken at any point,
including after an interruption, and holds everything generated so far with timings.
"""

from __future__ import annotations

import math
import resource
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator

import torch

from .errors import ContextLengthError, InputError
from .kv.cache import DenseKVCache, KVCache
from .kv.offload import OffloadedKVCache
from .model.llama import LlamaForCausalLM
from .retrieval.focus import QueryFocus, focus_layer_weights
from .retrieval.head import RetrievalHead
from .retrieval.selection import HeadSelector, Selector, SparsityOptions, make_selector
from .settings import GenerationConfig, RuntimeSettings
from .tokenizer import Tokenizer


class Sampler:
    """Greedy or temperature / top-k / top-p sampling with a seeded generator.

    Example::

        sampler = Sampler(GenerationConfig(temperature=0.7, top_p=0.9, seed=1), device)
        next_ids = sampler(logits)    # logits [B, V] float32 -> [B] int64
    """

    def __init__(self, gen: GenerationConfig, device: torch.device):
        self.gen = gen
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(gen.seed)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        gen = self.gen
        if gen.temperature == 0:
            return logits.argmax(dim=-1)
        logits = logits / gen.temperature
        if gen.top_k > 0 and gen.top_k < logits.shape[-1]:
            kth = torch.topk(logits, gen.top_k, dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if gen.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
            probs = sorted_logits.softmax(dim=-1)
            # drop a token when the tokens ranked above it already reach top_p
            drop = probs.cumsum(dim=-1) - probs >= gen.top_p
            sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
            logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
        probs = logits.softmax(dim=-1)
        return torch.multinomial(probs, 1, generator=self.generator).squeeze(-1)


class IncrementalDetokenizer:
    """Turns a growing list of ids into text pieces without re-decoding everything each step.

    Decodes a short window of recent ids and holds text back while it ends in an incomplete
    UTF-8 sequence (shown by the tokenizer as U+FFFD).
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # ids[prefix:read] decode to text already emitted
        self.read = 0

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self.tokenizer.decode(self.ids[self.prefix:self.read])
        after = self.tokenizer.decode(self.ids[self.prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            piece = after[len(before):]
            self.prefix, self.read = self.read, len(self.ids)
            return piece
        return ""


class StopMatcher:
    """Finds stop strings in streamed text, holding back text that may begin one."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = stops
        self.text = ""
        self.emitted = 0

    def feed(self, piece: str) -> tuple[str, bool]:
        """Add ``piece``; return (text safe to emit now, whether a stop string was hit)."""
        self.text += piece
        if not self.stops:
            out, self.emitted = self.text[self.emitted:], len(self.text)
            return out, False
        window_start = max(0, self.emitted - max(len(s) for s in self.stops))
        hits = [i for i in (self.text.find(s, window_start) for s in self.stops) if i >= 0]
        if hits:
            cut = min(hits)
            out = self.text[self.emitted:cut]
            self.text = self.text[:cut]
            self.emitted = cut
            return out, True
        hold = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.text)), 0, -1):
                if self.text.endswith(s[:n]):
                    hold = max(hold, n)
                    break
        safe = len(self.text) - hold
        out = self.text[self.emitted:safe] if safe > self.emitted else ""
        self.emitted = max(self.emitted, safe)
        return out, False

    def flush(self) -> str:
        out, self.emitted = self.text[self.emitted:], len(self.text)
        return out


class RequestStream:
    """One request's output side: its ids, text (detokenized, stop strings applied) and stop reason.

    ``accept(token)`` takes each sampled token and returns the text now safe to emit; once the
    request is finished (``eos``, ``stop_string``, ``length`` or ``context``), ``stop_reason``
    says why and ``flush()`` returns any text held back.
    """

    def __init__(self, tokenizer: Tokenizer, gen: GenerationConfig, num_prompt_tokens: int, capacity_tokens: int,
                 eos_ids: set[int]):
        self.gen, self.num_prompt_tokens, self.capacity_tokens, self.eos_ids = gen, num_prompt_tokens, capacity_tokens, eos_ids
        self.token_ids: list[int] = []
        self.stop_reason = "running"
        self._detok = IncrementalDetokenizer(tokenizer)
        self._stops = StopMatcher(gen.stop)

    @property
    def text(self) -> str:
        return self._stops.text

    @property
    def finished(self) -> bool:
        return self.stop_reason != "running"

    def accept(self, token: int) -> str:
        if token in self.eos_ids:
            self.stop_reason = "eos"
            return ""
        self.token_ids.append(token)
        piece, hit = self._stops.feed(self._detok.push(token))
        if hit:
            self.stop_reason = "stop_string"
        elif len(self.token_ids) >= self.gen.max_new_tokens:
            self.stop_reason = "length"
        elif self.num_prompt_tokens + len(self.token_ids) >= self.capacity_tokens:
            self.stop_reason = "context"
        return piece

    def flush(self) -> str:
        return self._stops.flush() if self.stop_reason != "stop_string" else ""


def eos_ids(engine: "Engine", gen: GenerationConfig) -> set[int]:
    if gen.ignore_eos:
        return set()
    return set(engine.tokenizer.eos_token_ids) | set(engine.model.config.eos_token_ids)


@dataclass
class GenerationStats:
    """Timings and memory of one generation. Times in seconds, memory in bytes."""

    prompt_tokens: int = 0
    generated_tokens: int = 0
    decode_steps: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    kv_cache_bytes: int = 0
    weights_bytes: int = 0
    peak_host_rss_bytes: int = 0
    peak_device_bytes: int | None = None
    selector_bytes: int = 0
    sparsity: dict = field(default_factory=dict)
    offload: dict = field(default_factory=dict)  # placement, KV bytes per tier, transfers (offloaded caches)

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        # the first token comes from the prefill logits; each decode step makes one more
        return self.decode_steps / self.decode_s if self.decode_s > 0 else 0.0

    def to_dict(self) -> dict:
        out = asdict(self)
        out["prefill_tokens_per_s"] = round(self.prefill_tokens_per_s, 3)
        out["decode_tokens_per_s"] = round(self.decode_tokens_per_s, 3)
        out["total_s"] = round(self.prefill_s + self.decode_s, 4)
        return out


@dataclass
class GenerationResult:
    """Text and ids generated, why generation stopped, and its stats.

    ``stop_reason``: ``eos``, ``stop_string``, ``length`` (max_new_tokens), ``context`` (the
    model's context is full), ``interrupted``, or ``running`` if taken mid-generation.
    """

    text: str
    token_ids: list[int]
    stop_reason: str
    stats: GenerationStats = field(default_factory=GenerationStats)


class Engine:
    """Runs a loaded model: owns the cache and the selector for each generation, and the step loop.

    ``sparsity`` chooses what decode steps attend to (see ``retrieval.selection``); the
    ``specontext`` method needs ``retrieval_head`` (already checked against this model).
    """

    def __init__(self, model: LlamaForCausalLM, tokenizer: Tokenizer, settings: RuntimeSettings,
                 sparsity: SparsityOptions | None = None, retrieval_head: RetrievalHead | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.settings = settings
        self.sparsity = sparsity or SparsityOptions()
        self.retrieval_head = retrieval_head

    @property
    def context_tokens(self) -> int:
        return self.model.config.max_position_embeddings

    def check_prompt_fits(self, num_prompt_tokens: int) -> None:
        limit = self.context_tokens
        if num_prompt_tokens >= limit:
            raise ContextLengthError(
                f"prompt is {num_prompt_tokens} tokens, {num_prompt_tokens - limit + 1} more than the model's "
                f"context of {limit} tokens allows (it must leave room for at least one generated token); "
                "shorten the document"
            )
        if num_prompt_tokens == 0:
            raise ContextLengthError("prompt is empty (0 tokens)")

    def new_cache(self, capacity_tokens: int, batch_size: int = 1) -> KVCache:
        """The cache for one generation: dense, or with the last ``offload_layers`` in host memory."""
        cfg = self.model.config
        offload = self.settings.offload_layers
        if self.settings.adaptive_offload:
            return self._managed_cache(capacity_tokens, batch_size)
        if offload:
            if offload > cfg.num_layers:
                raise InputError(f"offload_layers is {offload} but the model has {cfg.num_layers} layers; "
                                 f"use 1 to {cfg.num_layers}")
            if cfg.sliding_window is not None:
                raise InputError("offloading KV is not supported for sliding-window models")
            opts = self.sparsity
            pool = math.ceil(self.settings.slot_pool * opts.budget_tokens) if opts.method in ("specontext",
                                                                                              "streaming") else 0
            return OffloadedKVCache(cfg.num_layers, batch_size, cfg.num_kv_heads, cfg.head_dim, capacity_tokens,
                                    self.model.dtype, self.model.device,
                                    offloaded=[layer >= cfg.num_layers - offload for layer in range(cfg.num_layers)],
                                    pool_tokens=min(pool, capacity_tokens), async_prefetch=self.settings.async_prefetch,
                                    block_tokens=opts.block_tokens)
        return DenseKVCache(cfg.num_layers, batch_size, cfg.num_kv_heads, cfg.head_dim, capacity_tokens,
                            self.model.dtype, self.model.device, sliding_window=cfg.sliding_window)

    def _managed_cache(self, capacity_tokens: int, batch_size: int) -> KVCache:
        """The memory manager's cache: placement from the plan for the device profile."""
        from .planner.manager import schedule_layers
        from .planner.memory import HeadShape
        from .planner.profiles import load_profile

        cfg, opts = self.model.config, self.sparsity
        if cfg.sliding_window is not None:
            raise InputError("adaptive offload is not supported for sliding-window models")
        head = self.retrieval_head
        schedule = schedule_layers(
            cfg, load_profile(self.settings.device_profile), capacity_tokens=capacity_tokens, batch_size=batch_size,
            dtype=self.model.dtype, sparsity=opts.method, budget_tokens=opts.budget_tokens,
            head=HeadShape.from_config(head.config) if head is not None and opts.method == "specontext" else None,
            slot_pool=self.settings.slot_pool, block_tokens=opts.block_tokens,
            prefill_chunk_tokens=self.settings.prefill_chunk_tokens,
            weights_bytes=sum(p.numel() * p.element_size() for p in self.model.parameters()),
            fused_attention=self.model.device.type == "cuda", pin_tokens=opts.pin_tokens,
            focus_window_tokens=opts.focus_window_tokens)
        cache = OffloadedKVCache(cfg.num_layers, batch_size, cfg.num_kv_heads, cfg.head_dim, capacity_tokens,
                                 self.model.dtype, self.model.device, offloaded=schedule.host_layers,
                                 pool_tokens=schedule.pool_tokens, async_prefetch=self.settings.async_prefetch,
                                 block_tokens=opts.block_tokens, grow_tokens=schedule.grow_tokens,
                                 offload_from_tokens=[s or 0 for s in schedule.offload_from_tokens])
        cache.schedule = schedule
        return cache

    def new_selector(self, capacity_tokens: int, batch_size: int = 1,
                     sparsity: SparsityOptions | None = None, cache: KVCache | None = None) -> Selector:
        """A fresh selector (with its own K cache for ``specontext``) for one generation.

        With an offloaded ``cache`` (whose slots cannot hold one row's whole past), a confidence
        fallback in any batch row runs the whole step dense.
        """
        selector = make_selector(sparsity or self.sparsity, self.model.config.num_kv_heads, self.retrieval_head,
                                 self.model.model.embed_tokens, batch_size, capacity_tokens)
        if isinstance(selector, HeadSelector):
            selector.whole_step_fallback = isinstance(cache, OffloadedKVCache)
        return selector

    def prefill(self, ids: list[int], cache: KVCache, logits_for: str = "last",
                progress: Callable[[int, int], None] | None = None,
                selector: Selector | None = None, focus: QueryFocus | None = None) -> torch.Tensor:
        """Run one prompt through the model in chunks (always dense); returns logits of the last chunk.

        ``selector`` sees every chunk, so a retrieval head builds its K cache from the same inputs.
        ``logits_for="all"`` returns [1, len(ids), V]; otherwise [1, V] at the last token.
        """
        return self.prefill_rows([ids], cache, logits_for=logits_for, progress=progress, selector=selector,
                                 focus=focus)

    def new_focus(self, prompt_lens: list[int], capacity_tokens: int, window_tokens: int,
                  keep: str = "total", layers: str = "all") -> QueryFocus:
        """An empty :class:`QueryFocus` for prompts of ``prompt_lens`` (filled by :meth:`prefill_rows`),
        averaging the ``layers`` named as in the ``focus_layers`` setting."""
        cfg = self.model.config
        return QueryFocus(prompt_lens, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, capacity_tokens,
                          window_tokens, self.model.device, keep=keep,
                          layer_weights=focus_layer_weights(layers, cfg.num_layers, cfg.num_kv_heads))

    def prefill_rows(self, rows: list[list[int]], cache: KVCache, logits_for: str = "last",
                     progress: Callable[[int, int], None] | None = None,
                     selector: Selector | None = None, focus: QueryFocus | None = None) -> torch.Tensor:
        """Prefill one prompt per cache row together, in chunks of ``prefill_chunk_tokens`` per row.

        Each chunk carries every unfinished row's next tokens (rows padded on the right), so rows
        of different lengths share the model calls. When ``selector`` asks for the prompt's focus
        (``focus_window_tokens`` > 0), or a ``focus`` is given, the chunks holding each row's last
        W tokens also score their attention over the prompt (see ``retrieval/focus.py``); the
        selector then gets it through ``set_focus``. Returns [B, V] logits at each row's last
        prompt token (or, for one row and ``logits_for="all"``, [1, T, V]).
        """
        chunk = self.settings.prefill_chunk_tokens
        device = self.model.device
        capture = selector.capture_layers if selector is not None else ()
        if logits_for == "all" and len(rows) != 1:
            raise ValueError("logits_for='all' needs a single row")
        if focus is None and selector is not None and selector.focus_window_tokens:
            focus = self.new_focus([len(r) for r in rows], cache.capacity_tokens, selector.focus_window_tokens,
                                   keep=selector.focus_keep, layers=selector.focus_layers)
        total, done = sum(len(r) for r in rows), 0
        last: list[torch.Tensor | None] = [None] * len(rows)
        pieces = []
        for start in range(0, max(len(r) for r in rows), chunk):
            parts = [r[start:start + chunk] for r in rows]
            lens = [len(p) for p in parts]
            ends = [b for b, r in enumerate(rows) if start < len(r) <= start + chunk]
            want = "all" if logits_for == "all" else ("last" if ends and logits_for != "none" else "none")
            width = max(lens)
            x = torch.tensor([p + [0] * (width - len(p)) for p in parts], dtype=torch.int64, device=device)
            plan = cache.plan_step(lens)
            if focus is not None and focus.begin_chunk(lens):
                plan.focus = focus
            captured: dict = {}
            out = self.model(x, plan, cache, logits_for=want, capture_layers=capture, captured=captured)
            if selector is not None:
                selector.observe(x, plan, captured, is_prefill=True)
            if want == "all":
                pieces.append(out)
            elif want == "last":
                for b in ends:
                    last[b] = out[b:b + 1]
            done += sum(lens)
            if progress is not None:
                progress(done, total)
        if focus is not None and selector is not None and selector.focus_window_tokens:
            selector.set_focus(focus)
        if logits_for == "all":
            return torch.cat(pieces, dim=1)
        if logits_for == "none":
            return torch.empty(0)
        return torch.cat(last, dim=0)

    def prefill_state(self, prompt_ids: list[int], capacity_tokens: int,
                      progress: Callable[[int, int], None] | None = None,
                      focus_window_tokens: int | None = None, focus_keep: str = "layers") -> "PrefillState":
        """Prefill once and keep the state, so several methods can decode from the same prompt.

        Prefill is dense whatever the method, so its KV (and the retrieval head's K cache, when
        the engine has a head) is shared: each later use rewinds the cache to the prompt and
        decode overwrites the positions after it. The prompt's focus (W = ``focus_window_tokens``,
        default the engine's sparsity setting; 0 = none) is kept per layer, so pinned specontext
        and snapkv can decode from the state too (with that W).
        """
        self.check_prompt_fits(len(prompt_ids))
        cache = self.new_cache(capacity_tokens)
        head_opts = SparsityOptions(method="specontext", budget_tokens=capacity_tokens + 1, sink_tokens=0,
                                    window_tokens=0, pin_fraction=0.0)
        selector = self.new_selector(capacity_tokens, sparsity=head_opts) if self.retrieval_head else None
        W = self.sparsity.focus_window_tokens if focus_window_tokens is None else focus_window_tokens
        focus = self.new_focus([len(prompt_ids)], capacity_tokens, W, keep=focus_keep) if W else None
        logits = self.prefill(prompt_ids, cache, progress=progress, selector=selector, focus=focus)
        return PrefillState(list(prompt_ids), cache, logits, selector, focus)

    def _decoder(self, state: "PrefillState", sparsity: SparsityOptions | None,
                 selector: Selector | None = None) -> tuple[KVCache, Selector]:
        """Rewind ``state`` to its prompt and give a fresh selector for ``sparsity`` (or ``selector``) over it."""
        state.cache.rewind(len(state.prompt_ids))
        if selector is None:
            selector = self.new_selector(state.cache.capacity_tokens, sparsity=sparsity, cache=state.cache)
        if isinstance(selector, HeadSelector):
            if state.head_selector is None:
                raise InputError("this prefill state was made without a retrieval head")
            selector.k_device, selector.carry_hidden = state.head_selector.k_device, state.head_selector.carry_hidden
        if selector.focus_window_tokens:
            focus = state.focus
            if focus is None or focus.window_tokens != selector.focus_window_tokens or \
                    (selector.focus_keep != "total" and focus.keep == "total"):
                raise InputError(f"this prefill state holds no focus for a {selector.focus_window_tokens}-token window"
                                 f"{' per layer' if selector.focus_keep != 'total' else ''}; make it with "
                                 f"prefill_state(..., focus_window_tokens={selector.focus_window_tokens})")
            selector.set_focus(focus)
        return state.cache, selector

    @torch.inference_mode()
    def teacher_forced(self, prefix_ids: list[int], continuation_ids: list[int],
                       sparsity: SparsityOptions | None = None,
                       state: "PrefillState | None" = None,
                       selector: Selector | None = None) -> tuple[torch.Tensor, Selector]:
        """Score a known continuation step by step, as decode would, for accuracy measurement.

        The prefix is prefilled (dense), or taken from ``state`` (made by :meth:`prefill_state`
        for the same prefix, with room for the continuation); each continuation token is then fed
        as one decode step under ``sparsity`` (default: the engine's), so selection sees exactly
        what it would during generation. ``selector``, when given, is a fresh selector used instead
        of one made from ``sparsity`` (for measurement tools, e.g. a replayed oracle).

        Returns:
            (logits [N, V] float32 on CPU, where row i predicts ``continuation_ids[i]``; the
            selector, whose ``stats`` hold sparse/dense step counts and recall if measured).
        """
        if state is None:
            opts = sparsity or self.sparsity
            W = selector.focus_window_tokens if selector is not None else opts.focus_window_tokens
            state = self.prefill_state(prefix_ids, len(prefix_ids) + len(continuation_ids), focus_window_tokens=W)
        elif state.prompt_ids != list(prefix_ids):
            raise InputError("teacher_forced: the prefill state was made for a different prefix")
        self.check_prompt_fits(len(prefix_ids) + len(continuation_ids) - 1)
        if len(prefix_ids) + len(continuation_ids) > state.cache.capacity_tokens:
            raise InputError(f"the prefill state holds {state.cache.capacity_tokens} tokens, prefix plus "
                             f"continuation need {len(prefix_ids) + len(continuation_ids)}")
        model = self.model
        cache, selector = self._decoder(state, sparsity, selector)
        rows = [state.logits.float().cpu()]
        for token in continuation_ids[:-1]:
            x = torch.tensor([[token]], dtype=torch.int64, device=model.device)
            plan = cache.plan_step([1])
            plan.selection = selector.select(x, plan)
            captured: dict = {}
            rows.append(model(x, plan, cache, capture_layers=selector.capture_layers, captured=captured).float().cpu())
            selector.observe(x, plan, captured)
        return torch.cat(rows, dim=0), selector

    def generate(self, prompt_ids: list[int], gen: GenerationConfig,
                 progress: Callable[[int, int], None] | None = None,
                 state: "PrefillState | None" = None, sparsity: SparsityOptions | None = None) -> "Generation":
        """Start generating; with ``state`` (from :meth:`prefill_state` for the same prompt), skip prefill."""
        self.check_prompt_fits(len(prompt_ids))
        if state is not None and state.prompt_ids != list(prompt_ids):
            raise InputError("generate: the prefill state was made for a different prompt")
        return Generation(self, list(prompt_ids), gen, progress, state=state, sparsity=sparsity)

    def generate_batch(self, prompts: list[list[int]], gens: list[GenerationConfig],
                       progress: Callable[[int, int], None] | None = None,
                       sparsity: SparsityOptions | None = None) -> "BatchGeneration":
        """Start generating several requests together (see :class:`BatchGeneration`)."""
        return BatchGeneration(self, prompts, gens, progress, sparsity=sparsity)


@dataclass
class PrefillState:
    """A prefilled prompt that several decodes can start from (see :meth:`Engine.prefill_state`)."""

    prompt_ids: list[int]
    cache: KVCache
    logits: torch.Tensor  # [1, V] at the prompt's last token
    head_selector: Selector | None
    focus: QueryFocus | None = None  # the prompt's last W queries' attention (pinning, snapkv)


class Generation:
    """An in-progress generation: iterate it for text pieces; ``result()`` at any time.

    Example::

        g = engine.generate(ids, GenerationConfig(max_new_tokens=32))
        for piece in g:
            print(piece, end="", flush=True)
        print(g.result().stats.decode_tokens_per_s)
    """

    def __init__(self, engine: Engine, prompt_ids: list[int], gen: GenerationConfig,
                 progress: Callable[[int, int], None] | None, state: PrefillState | None = None,
                 sparsity: SparsityOptions | None = None):
        self.engine, self.prompt_ids, self.gen, self.progress = engine, prompt_ids, gen, progress
        self.state, self.sparsity = state, sparsity or engine.sparsity
        self.stop_reason = "running"
        self.stats = GenerationStats(prompt_tokens=len(prompt_ids))
        capacity = min(len(prompt_ids) + gen.max_new_tokens, engine.context_tokens)
        if state is not None:
            capacity = min(capacity, state.cache.capacity_tokens)
        self._out = RequestStream(engine.tokenizer, gen, len(prompt_ids), capacity, eos_ids(engine, gen))
        self._iter = self._run()

    @property
    def token_ids(self) -> list[int]:
        return self._out.token_ids

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        return next(self._iter)

    def interrupt(self) -> None:
        """Mark the generation as stopped by the user; what was generated is kept."""
        if self.stop_reason == "running":
            self.stop_reason = "interrupted"
        self._iter.close()

    def result(self) -> GenerationResult:
        self._record_memory()
        return GenerationResult(text=self._out.text, token_ids=list(self.token_ids),
                                stop_reason=self.stop_reason, stats=self.stats)

    def _record_sparsity(self) -> None:
        selector = getattr(self, "_selector", None)
        if selector is None:
            return
        self.stats.sparsity = self._sparsity_info(self.engine, self.sparsity, selector)

    @staticmethod
    def _sparsity_info(engine: Engine, opts: SparsityOptions, selector: Selector) -> dict:
        info = {"method": opts.method}
        if opts.method != "dense":
            info["budget_tokens"] = opts.budget_tokens
            if opts.method in ("specontext", "streaming", "snapkv"):
                info["sink_tokens"] = opts.sink_tokens
            if opts.method in ("specontext", "snapkv"):
                info["window_tokens"] = opts.window_tokens
            if opts.method == "specontext":
                info["retrieval_head"] = getattr(engine.retrieval_head, "path", None)
                info["fallback_threshold"] = opts.fallback_threshold
                info["pin_tokens"] = opts.pin_tokens
            if selector.focus_window_tokens:
                info["focus_window_tokens"] = opts.focus_window_tokens
                info["focus_pool_tokens"] = opts.focus_pool_tokens
                info["focus_layers"] = opts.focus_layers
            if opts.method == "quest":
                info["page_tokens"] = opts.page_tokens
            info.update(selector.stats.to_dict())
        return info

    def _record_offload(self) -> None:
        self.stats.offload = self._offload_info(getattr(self, "_cache", None))

    @staticmethod
    def _offload_info(cache: KVCache | None) -> dict:
        if not isinstance(cache, OffloadedKVCache):
            return {}
        info = {"kv_device_bytes": cache.device_bytes(), "kv_host_bytes": cache.host_bytes(), **cache.transfer_stats()}
        schedule = getattr(cache, "schedule", None)
        if schedule is not None:
            info["memory_plan"] = schedule.to_dict()
        return info

    def _record_memory(self) -> None:
        self._record_sparsity()
        self._record_offload()
        cache, selector = getattr(self, "_cache", None), getattr(self, "_selector", None)
        if cache is not None:  # buffers made on first use (staging, gathered rows) count once they exist
            self.stats.kv_cache_bytes = cache.allocated_bytes()
            self.stats.selector_bytes = selector.allocated_bytes()
        self.stats.peak_host_rss_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        if self.engine.model.device.type == "cuda":
            self.stats.peak_device_bytes = torch.cuda.max_memory_allocated(self.engine.model.device)

    def _run(self) -> Iterator[str]:
        engine, gen, model, out = self.engine, self.gen, self.engine.model, self._out
        capacity = out.capacity_tokens
        if self.state is not None:
            cache, selector = engine._decoder(self.state, self.sparsity)
        else:
            cache = engine.new_cache(capacity)
            selector = engine.new_selector(capacity, sparsity=self.sparsity, cache=cache)
        self._selector, self._cache = selector, cache
        self.stats.kv_cache_bytes = cache.allocated_bytes()
        self.stats.selector_bytes = selector.allocated_bytes()
        self.stats.weights_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        sampler = Sampler(gen, model.device)

        t0 = time.perf_counter()
        if self.state is not None:
            logits = self.state.logits
        else:
            logits = engine.prefill(self.prompt_ids, cache, progress=self.progress, selector=selector)
        token = int(sampler(logits)[0])  # int() waits for the device
        self.stats.prefill_s = time.perf_counter() - t0

        try:
            while True:
                piece = out.accept(token)
                self.stats.generated_tokens = len(out.token_ids)
                if piece:
                    yield piece
                if out.finished:
                    self.stop_reason = out.stop_reason
                    break
                t0 = time.perf_counter()
                x = torch.tensor([[token]], dtype=torch.int64, device=model.device)
                plan = cache.plan_step([1])
                plan.selection = selector.select(x, plan)
                captured: dict = {}
                logits = model(x, plan, cache, capture_layers=selector.capture_layers, captured=captured)
                selector.observe(x, plan, captured)
                token = int(sampler(logits)[0])
                self.stats.decode_s += time.perf_counter() - t0
                self.stats.decode_steps += 1
            tail = out.flush()
            if tail:
                yield tail
        finally:
            self._record_memory()


@dataclass
class BatchStats:
    """The whole batch's timings: what throughput comparisons use. Times in seconds."""

    num_requests: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    decode_steps: int = 0  # batched model calls after prefill
    prefill_s: float = 0.0
    decode_s: float = 0.0

    def to_dict(self) -> dict:
        out = asdict(self)
        total = self.prefill_s + self.decode_s
        out["total_s"] = round(total, 4)
        # end to end, prefill included: every generated token over the batch's wall time
        out["tokens_per_s"] = round(self.generated_tokens / total, 3) if total > 0 else 0.0
        out["decode_tokens_per_s"] = round((self.generated_tokens - self.num_requests) / self.decode_s, 3) \
            if self.decode_s > 0 else 0.0
        return out


class BatchGeneration:
    """Several requests decoding together in one cache: iterate it for ``(request index, text piece)``.

    When a request finishes, one more ``(index, piece)`` is yielded (``piece`` may be ""), so a
    caller can write each result as soon as it is complete (``finished(index)`` is then true).

    Every request has its own prompt length, generation settings (sampling seed, stop strings,
    length), selection (the selector chooses per batch row), slots and stopping; a finished
    request stays in the batch with no token (its row computes nothing new) until all are done.
    Each request's output equals running it alone with the same settings: rows never mix, and
    the same selection is made for each.

    Example::

        batch = engine.generate_batch([ids_a, ids_b], [GenerationConfig(max_new_tokens=32)] * 2)
        for i, piece in batch:
            print(i, piece)
        results = batch.results()          # [GenerationResult] in request order
        print(batch.stats.to_dict()["tokens_per_s"])
    """

    def __init__(self, engine: Engine, prompts: list[list[int]], gens: list[GenerationConfig],
                 progress: Callable[[int, int], None] | None = None, sparsity: SparsityOptions | None = None):
        if not prompts:
            raise InputError("a batch needs at least one request")
        if len(gens) != len(prompts):
            raise InputError(f"{len(prompts)} prompts but {len(gens)} generation settings")
        for i, ids in enumerate(prompts):
            try:
                engine.check_prompt_fits(len(ids))
            except ContextLengthError as exc:
                raise ContextLengthError(f"request {i}: {exc}") from None
        self.engine, self.prompts, self.gens, self.progress = engine, [list(p) for p in prompts], list(gens), progress
        self.sparsity = sparsity or engine.sparsity
        ctx = engine.context_tokens
        self._out = [RequestStream(engine.tokenizer, g, len(p), min(len(p) + g.max_new_tokens, ctx), eos_ids(engine, g))
                     for p, g in zip(self.prompts, self.gens)]
        self._stats = [GenerationStats(prompt_tokens=len(p)) for p in self.prompts]
        self.stats = BatchStats(num_requests=len(prompts), prompt_tokens=sum(len(p) for p in self.prompts))
        self._iter = self._run()

    def __iter__(self) -> Iterator[tuple[int, str]]:
        return self

    def __next__(self) -> tuple[int, str]:
        return next(self._iter)

    def interrupt(self) -> None:
        """Stop every unfinished request (stop reason ``interrupted``); what was generated is kept."""
        for out in self._out:
            if not out.finished:
                out.stop_reason = "interrupted"
        self._iter.close()

    def finished(self, index: int) -> bool:
        return self._out[index].finished

    def result(self, index: int) -> GenerationResult:
        """Request ``index``'s result so far. ``stats.prefill_s`` is the batch's shared prefill;
        ``decode_s`` the time of the steps it took part in; ``sparsity`` its own step counts
        (``selection_s`` and ``recall`` are the batch's)."""
        out, stats = self._out[index], self._stats[index]
        stats.generated_tokens = len(out.token_ids)
        selector, cache = getattr(self, "_selector", None), getattr(self, "_cache", None)
        if selector is not None:
            info = Generation._sparsity_info(self.engine, self.sparsity, selector)
            if "sparse_steps" in info:
                info.update(selector.row_stats(index))
                info["batch_size"] = len(self.prompts)
            stats.sparsity = info
        if cache is not None:
            stats.kv_cache_bytes = cache.allocated_bytes()
            stats.selector_bytes = selector.allocated_bytes()
            stats.offload = Generation._offload_info(cache)  # the batch's transfers (one cache)
        stats.peak_host_rss_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        if self.engine.model.device.type == "cuda":
            stats.peak_device_bytes = torch.cuda.max_memory_allocated(self.engine.model.device)
        return GenerationResult(text=out.text, token_ids=list(out.token_ids), stop_reason=out.stop_reason,
                                stats=stats)

    def results(self) -> list[GenerationResult]:
        return [self.result(i) for i in range(len(self.prompts))]

    def _run(self) -> Iterator[tuple[int, str]]:
        engine, model, outs = self.engine, self.engine.model, self._out
        R = len(self.prompts)
        capacity = max(o.capacity_tokens for o in outs)
        cache = engine.new_cache(capacity, batch_size=R)
        selector = engine.new_selector(capacity, batch_size=R, sparsity=self.sparsity, cache=cache)
        self._selector, self._cache = selector, cache
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        for st in self._stats:
            st.weights_bytes = weights
        samplers = [Sampler(g, model.device) for g in self.gens]

        t0 = time.perf_counter()
        logits = engine.prefill_rows(self.prompts, cache, progress=self.progress, selector=selector)  # [R, V]
        tokens = [int(samplers[b](logits[b:b + 1])[0]) for b in range(R)]
        self.stats.prefill_s = time.perf_counter() - t0
        for st in self._stats:
            st.prefill_s = self.stats.prefill_s

        while True:
            for b, out in enumerate(outs):
                if out.finished:
                    continue
                piece = out.accept(tokens[b])
                if piece:
                    yield b, piece
                if out.finished:  # always announced, with "" when no text is held back
                    yield b, out.flush()
            active = [not o.finished for o in outs]
            if not any(active):
                break
            t0 = time.perf_counter()
            x = torch.tensor([[t if a else 0] for t, a in zip(tokens, active)], dtype=torch.int64, device=model.device)
            plan = cache.plan_step([int(a) for a in active])
            plan.selection = selector.select(x, plan)
            captured: dict = {}
            logits = model(x, plan, cache, capture_layers=selector.capture_layers, captured=captured)
            selector.observe(x, plan, captured)
            tokens = [int(samplers[b](logits[b:b + 1])[0]) if a else 0 for b, a in enumerate(active)]
            dt = time.perf_counter() - t0
            self.stats.decode_s += dt
            self.stats.decode_steps += 1
            for b, a in enumerate(active):
                if a:
                    self._stats[b].decode_s += dt
                    self._stats[b].decode_steps += 1
        self.stats.generated_tokens = sum(len(o.token_ids) for o in outs)
