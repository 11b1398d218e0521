"""The engine: one step function, the caches and selectors it runs with, prefill and scoring.

Shape letters: B batch, T tokens, V vocabulary.

Generation (one request or a batch) is in ``generation.py``; sampling, detokenising and stop
strings in ``decoding.py``; counters in ``stats.py``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from functools import partial
from typing import Callable

import torch

from .errors import ContextLengthError, InputError
from .kv.cache import DenseKVCache, KVCache
from .kv.offload import OffloadedKVCache
from .kv.plan import Selection, StepPlan, make_plan, to_device
from .kv.slots import pool_tokens
from .methods import GLOBAL_METHODS
from .model.llama import LlamaForCausalLM
from .retrieval.focus import QueryFocus, focus_layer_weights
from .retrieval.head import RetrievalHead
from .retrieval.head_selector import HeadSelector
from .retrieval.selection import SparsityOptions, make_selector
from .retrieval.selector import Selector
from .generation import BatchGeneration, Generation
from .settings import FLOAT_FORMATS, GenerationConfig, RuntimeSettings
from .tokenizer import Tokenizer


COMPILE_BUCKET_TOKENS = 256  # a compiled decode step's cache capacity is a multiple of this (cache_capacity)
_compile_keys = itertools.count()  # one per engine and per clear_compiled(): see _compiled_decode


def _model_step(model: LlamaForCausalLM, key: int, *args):
    """The compiled decode step: ``model.run(*args)``. ``key`` is the engine's compile key, an int
    that dynamo specializes on, so each engine (and each epoch of it) gets its own graphs."""
    if key < 0:  # reading the key is what makes dynamo guard on it (an unused argument is not)
        raise ValueError(f"compile key must be >= 0, got {key}")
    return model.run(*args)


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
        # called on every decode step with (selection or None, plan), once chosen and before the
        # model runs: for tools and tests that record what was selected
        self.on_select: Callable[[Selection | None, StepPlan], None] | None = None
        self._compiled: tuple[str, Callable] | None = None  # (mode, the model step under torch.compile), on first use
        self._compile_key = next(_compile_keys)
        self._aot = None  # the ahead-of-time decode step (compile_decode aot), on first use
        self.model_path: str | None = None  # the model's file or folder (None: the default), for building it

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
        kv_format = self._kv_format()
        if self.settings.adaptive_offload:
            return self._managed_cache(capacity_tokens, batch_size, kv_format)
        if offload:
            if offload > cfg.num_layers:
                raise InputError(f"offload_layers is {offload} but the model has {cfg.num_layers} layers; "
                                 f"use 1 to {cfg.num_layers}")
            if cfg.sliding_window is not None:
                raise InputError("offloading KV is not supported for sliding-window models")
            opts = self.sparsity
            pool = pool_tokens(self.settings.slot_pool, opts.budget_tokens, capacity_tokens, opts.block_tokens) \
                if opts.method in GLOBAL_METHODS else 0
            return OffloadedKVCache(cfg.num_layers, batch_size, cfg.num_kv_heads, cfg.head_dim, capacity_tokens,
                                    self.model.dtype, self.model.device,
                                    offloaded=[layer >= cfg.num_layers - offload for layer in range(cfg.num_layers)],
                                    pool_tokens=pool, async_prefetch=self.settings.async_prefetch,
                                    block_tokens=opts.block_tokens, kv_format=kv_format)
        return DenseKVCache(cfg.num_layers, batch_size, cfg.num_kv_heads, cfg.head_dim, capacity_tokens,
                            self.model.dtype, self.model.device, sliding_window=cfg.sliding_window,
                            kv_format=kv_format)

    def cache_capacity(self, capacity_tokens: int) -> int:
        """The cache capacity a generation of ``capacity_tokens`` allocates. With compile_decode,
        whole COMPILE_BUCKET_TOKENS (within the context): a compiled step is compiled for its cache's
        shape (the static step attends over the whole buffer), 5 to 25 s each on a CPU, so
        generations of nearby lengths share one, for at most a bucket less one of masked positions.
        The generation still stops at ``capacity_tokens``."""
        if self.settings.compile_decode in ("off", "aot"):  # aot: one library for every capacity
            return capacity_tokens
        bucket = -(-capacity_tokens // COMPILE_BUCKET_TOKENS) * COMPILE_BUCKET_TOKENS
        return max(capacity_tokens, min(bucket, self.context_tokens))

    def _kv_format(self) -> str:
        """``float`` (KV in the compute dtype), ``int8`` or ``fp8``, from ``kv_dtype``; a 16/32-bit
        float KV other than the compute dtype is refused with what works."""
        kv = self.settings.kv_dtype
        if kv in ("auto", "int8", "fp8"):
            return "float" if kv == "auto" else kv
        wanted = getattr(torch, FLOAT_FORMATS[kv])
        if wanted != self.model.dtype:
            raise InputError(f"--kv-dtype {kv} differs from the compute dtype ({self.model.dtype}), which this version "
                             f"needs; use auto, int8 or fp8")
        return "float"

    def _managed_cache(self, capacity_tokens: int, batch_size: int, kv_format: str) -> KVCache:
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
            weights_bytes=self.model.weight_bytes(),
            fused_attention=self.model.device.type == "cuda", pin_tokens=opts.pin_tokens,
            focus_window_tokens=opts.focus_window_tokens, kv_format=kv_format)
        cache = OffloadedKVCache(cfg.num_layers, batch_size, cfg.num_kv_heads, cfg.head_dim, capacity_tokens,
                                 self.model.dtype, self.model.device, offloaded=schedule.host_layers,
                                 pool_tokens=schedule.pool_tokens, async_prefetch=self.settings.async_prefetch,
                                 block_tokens=opts.block_tokens, grow_tokens=schedule.grow_tokens,
                                 offload_from_tokens=[s or 0 for s in schedule.offload_from_tokens],
                                 kv_format=kv_format)
        cache.schedule = schedule
        return cache

    def step(self, ids: torch.Tensor, input_lens: list[int], cache: KVCache, selector: Selector | None,
             decode: bool = False, logits_for: str = "last", focus: QueryFocus | None = None) -> torch.Tensor:
        """One forward step: a prefill chunk or a decode token, for one row or many.

        Every use runs through here: prefill chunks, generation (one request or a batch),
        teacher-forced scoring and the benchmarks. The step is planned before layer 0 (positions
        and mask by the cache; on a decode step, the selection, shown to :attr:`on_select`), then
        the model runs and the selector sees the result (the head keys the new tokens).

        Args:
            ids: [B, T] int64 on the model's device, rows padded on the right.
            input_lens: real tokens per row (0: a finished request riding along).
            selector: chooses decode steps' keys and observes every step (None: dense, unobserved).
            decode: a decode step (one token per row, selection applies) rather than a prefill chunk.
            logits_for, focus: as for the model; ``focus`` sees the chunks holding a row's focus window.
        Returns:
            float32 logits (see :meth:`LlamaForCausalLM.forward`).
        """
        cfg, model = self.model.config, self.model
        compiled = self._compiled_decode(cache, selector) if decode else None
        plan = make_plan(cache.reserve(input_lens), input_lens, model.device, cfg.sliding_window,
                         cfg.num_heads // cfg.num_kv_heads, static_tokens=cache.row_pitch if compiled else 0)
        if compiled is None:  # a compiled step makes its rotary tables inside the graph
            cos, sin = model.rotary(plan.positions, model.dtype)
            plan = replace(plan, cos=cos, sin=sin)
        if decode and selector is not None:
            plan = plan.with_selection(selector.select(ids, plan), cache.row_pitch)
            if self.on_select is not None:
                self.on_select(plan.selection, plan)
        elif focus is not None and focus.begin_chunk(input_lens):
            plan = replace(plan, focus=focus)
        fetch = cache.begin_step(plan)
        if fetch is not None:
            plan = replace(plan, fetch=fetch)
        captured: dict = {}
        capture = selector.capture_layers if selector is not None else ()
        if compiled is not None:
            graphs = self.settings.compile_decode == "cuda-graph"
            if graphs:
                # The cache is written in place by every replay: its buffers are inputs at fixed
                # addresses (without this, torch skips the capture as "mutated inputs"). A new
                # cache's buffers re-record the graphs once; nothing recompiles.
                for t in cache.step_buffers(plan):
                    if getattr(t, "_dynamo_static_input_type", None) is None:
                        torch._dynamo.mark_static_address(t, guard=False)
                torch.compiler.cudagraph_mark_step_begin()
            try:
                with torch.inference_mode():
                    out = compiled(ids, plan, cache, logits_for, capture, captured)
            except torch._dynamo.exc.TorchDynamoException as exc:  # e.g. no C++ compiler for inductor on a CPU
                reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                raise InputError(f"the decode step did not compile ({reason[:200]}); use --compile-decode off") from exc
            if graphs:  # the next replay overwrites a graph's outputs; callers may keep this step's
                out = out.clone()
                captured = {i: h.clone() for i, h in captured.items()}
        else:
            out = model(ids, plan, cache, logits_for=logits_for, capture_layers=capture, captured=captured)
        if selector is not None:
            selector.observe(ids, plan, captured, is_prefill=not decode)
        return out

    def clear_compiled(self, modules_changed: bool = False) -> None:
        """Forget the compiled decode step (the next compiled step compiles again, or reuses
        dynamo's graph of the same shapes). ``modules_changed``: the model's modules were changed
        in place, so no graph compiled before may be used again (a new compile key)."""
        self._compiled = self._aot = None
        if modules_changed:
            self._compile_key = next(_compile_keys)

    def _compiled_decode(self, cache: KVCache, selector: Selector | None) -> Callable | None:
        """The compiled model step for a decode step of ``cache`` and ``selector``, or None to run
        eagerly: compiling is asked for (``compile_decode``), every layer is resident, and the
        selection is one for all layers, made outside the step (dense, specontext, streaming)."""
        mode = self.settings.compile_decode
        if mode == "off" or type(cache) is not DenseKVCache or cache.grow_tokens:
            return None
        if mode == "aot":
            return self._aot_decode(cache, selector)
        if selector is not None and ((selector.method != "dense" and selector.method not in GLOBAL_METHODS)
                                     or selector.measure_recall):
            return None
        if mode == "cuda-graph" and self.model.device.type != "cuda":
            raise InputError("compile_decode cuda-graph needs a CUDA device; on a CPU use on or off")
        if self._compiled is None or self._compiled[0] != mode:
            # CPU ("on"): dynamo's guards re-checked every module and parameter of the model before
            # each call, 0.9 ms of a 10 ms step at 1k on the default model (8.9 ms without). So the
            # step does not guard on the model's modules, only on its other inputs (ids, plan,
            # cache buffers) and on the engine's compile key: dynamo keeps graphs per code object,
            # and the key is what tells one engine's model (or one epoch of it) from another's.
            # A model's modules do not change once it is loaded; anything that changes them must
            # call clear_compiled(modules_changed=True), which takes a new key. cuda-graph keeps torch's
            # reduce-overhead mode (and its guards).
            skip = getattr(torch.compiler, "skip_guard_on_all_nn_modules_unsafe", None)  # torch >= 2.7
            how = {"mode": "reduce-overhead"} if mode == "cuda-graph" else \
                {"options": {"guard_filter_fn": skip}} if skip is not None else {}
            self._compiled = (mode, torch.compile(_model_step, fullgraph=True, dynamic=False, **how))
        return partial(self._compiled[1], self.model, self._compile_key)

    def _aot_decode(self, cache: DenseKVCache, selector: Selector | None) -> Callable | None:
        """The ahead-of-time step (``model/aot_step.py``) for a dense step of one row over float KV
        of at least MIN_TOKENS positions; None (eager) for any other step."""
        from .model.aot_step import MIN_TOKENS
        step = self.aot_step()
        if (selector is not None and selector.method != "dense") or cache.batch_size != 1 \
                or cache.kv_format != "float" or cache.row_pitch < MIN_TOKENS:
            return None
        return step

    def aot_step(self):
        """The ahead-of-time decode step, built (the first time) and loaded now; the load calls it
        for ``compile_decode`` aot, so a build never happens inside a generation."""
        from .model.aot_step import load_or_build
        self._aot = self._aot or load_or_build(self.model, self.model_path, self.settings, torch.get_num_threads())
        return self._aot

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
            x = to_device([p + [0] * (width - len(p)) for p in parts], device)
            out = self.step(x, lens, cache, selector, logits_for=want, focus=focus)
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

    def decoder(self, state: "PrefillState", sparsity: SparsityOptions | None,
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
        cache, selector = self.decoder(state, sparsity, selector)
        rows = [state.logits.float().cpu()]
        for token in continuation_ids[:-1]:
            x = to_device([[token]], self.model.device)
            rows.append(self.step(x, [1], cache, selector, decode=True).float().cpu())
        return torch.cat(rows, dim=0), selector

    def generate(self, prompt_ids: list[int], gen: GenerationConfig,
                 progress: Callable[[int, int], None] | None = None,
                 state: PrefillState | None = None, sparsity: SparsityOptions | None = None) -> Generation:
        """Start generating; with ``state`` (from :meth:`prefill_state` for the same prompt), skip prefill."""
        return Generation(self, list(prompt_ids), gen, progress, state=state, sparsity=sparsity)

    def generate_batch(self, prompts: list[list[int]], gens: list[GenerationConfig],
                       progress: Callable[[int, int], None] | None = None,
                       sparsity: SparsityOptions | None = None) -> BatchGeneration:
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
