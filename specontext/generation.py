"""Generating: one request or many, every decode step through the engine's one step function.

A single request is a batch of one: :class:`Generation` is a view of a :class:`BatchGeneration`
with one row. Sampling, detokenising and stop strings (``decoding.py``) and the counters
(``stats.py``) stay outside the step.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Callable, Iterator

from .decoding import RequestStream, Sampler, eos_ids
from .errors import ContextLengthError, InputError
from .kv.plan import to_device
from .retrieval.selection import SparsityOptions
from .settings import GenerationConfig
from .stats import (BatchStats, GenerationResult, GenerationStats, offload_info, record_peaks,
                    sparsity_info)

if TYPE_CHECKING:
    from .engine import Engine, PrefillState


class BatchGeneration:
    """Several requests decoding together in one cache: iterate it for ``(request index, text piece)``.

    When a request finishes, one more ``(index, piece)`` is yielded (``piece`` may be ""), so a
    caller can write each result as soon as it is complete (``finished(index)`` is then true).

    Every request has its own prompt length, generation settings (sampling seed, stop strings,
    length), selection (the selector chooses per batch row), slots and stopping; a finished
    request stays in the batch with no token (its row computes nothing new) until all are done.
    Each request's output equals running it alone with the same settings: rows never mix, and
    the same selection is made for each.

    ``state`` (one request only): a :class:`~specontext.engine.PrefillState` for the same prompt,
    whose prefill is reused.

    Example::

        batch = engine.generate_batch([ids_a, ids_b], [GenerationConfig(max_new_tokens=32)] * 2)
        for i, piece in batch:
            print(i, piece)
        results = batch.results()          # [GenerationResult] in request order
        print(batch.stats.to_dict()["tokens_per_s"])
    """

    def __init__(self, engine: Engine, prompts: list[list[int]], gens: list[GenerationConfig],
                 progress: Callable[[int, int], None] | None = None, sparsity: SparsityOptions | None = None,
                 state: PrefillState | None = None):
        if not prompts:
            raise InputError("a batch needs at least one request")
        if len(gens) != len(prompts):
            raise InputError(f"{len(prompts)} prompts but {len(gens)} generation settings")
        if state is not None and (len(prompts) != 1 or state.prompt_ids != list(prompts[0])):
            raise InputError("generate: the prefill state was made for a different prompt")
        for i, ids in enumerate(prompts):
            try:
                engine.check_prompt_fits(len(ids))
            except ContextLengthError as exc:
                raise ContextLengthError(f"request {i}: {exc}" if len(prompts) > 1 else str(exc)) from None
        self.engine, self.prompts, self.gens, self.progress = engine, [list(p) for p in prompts], list(gens), progress
        self.sparsity, self.state = sparsity or engine.sparsity, state
        limit = engine.context_tokens if state is None else min(engine.context_tokens, state.cache.capacity_tokens)
        tok, cfg = engine.tokenizer, engine.model.config
        self._out = [RequestStream(tok, g, len(p), min(len(p) + g.max_new_tokens, limit), eos_ids(tok, cfg, g))
                     for p, g in zip(self.prompts, self.gens)]
        self._stats = [GenerationStats(prompt_tokens=len(p)) for p in self.prompts]
        self.stats = BatchStats(num_requests=len(prompts), prompt_tokens=sum(len(p) for p in self.prompts))
        self._cache = self._selector = None
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
        selector, cache = self._selector, self._cache
        if selector is not None:
            info = sparsity_info(self.sparsity, selector, getattr(self.engine.retrieval_head, "path", None))
            if "sparse_steps" in info:
                info.update(selector.row_stats(index))
                if len(self.prompts) > 1:
                    info["batch_size"] = len(self.prompts)
            stats.sparsity = info
        if cache is not None:  # buffers made on first use (staging, gathered rows) count once they exist
            stats.kv_cache_bytes = cache.allocated_bytes()
            stats.selector_bytes = selector.allocated_bytes()
            stats.offload = offload_info(cache)  # the batch's transfers (one cache)
        record_peaks(stats, self.engine.model.device)
        return GenerationResult(text=out.text, token_ids=list(out.token_ids), stop_reason=out.stop_reason,
                                stats=stats)

    def results(self) -> list[GenerationResult]:
        return [self.result(i) for i in range(len(self.prompts))]

    def _run(self) -> Iterator[tuple[int, str]]:
        engine, model, outs = self.engine, self.engine.model, self._out
        R = len(self.prompts)
        capacity = max(o.capacity_tokens for o in outs)
        if self.state is not None:
            cache, selector = engine.decoder(self.state, self.sparsity)
        else:
            cache = engine.new_cache(engine.cache_capacity(capacity), batch_size=R)
            selector = engine.new_selector(capacity, batch_size=R, sparsity=self.sparsity, cache=cache)
        self._selector, self._cache = selector, cache
        weights = model.weight_bytes()
        for st in self._stats:
            st.weights_bytes = weights
        samplers = [Sampler(g, model.device) for g in self.gens]

        t0 = time.perf_counter()
        if self.state is not None:
            logits = self.state.logits
        else:
            logits = engine.prefill_rows(self.prompts, cache, progress=self.progress, selector=selector)  # [R, V]
        tokens = [int(samplers[b](logits[b:b + 1])[0]) for b in range(R)]  # int() waits for the device
        self.stats.prefill_s = time.perf_counter() - t0
        for st in self._stats:
            st.prefill_s = self.stats.prefill_s

        while True:
            for b, out in enumerate(outs):
                if out.finished:
                    continue
                piece = out.accept(tokens[b])
                self._stats[b].generated_tokens = len(out.token_ids)
                if piece:
                    yield b, piece
                if out.finished:  # always announced, with "" when no text is held back
                    yield b, out.flush()
            active = [not o.finished for o in outs]
            if not any(active):
                break
            t0 = time.perf_counter()
            x = to_device([[t if a else 0] for t, a in zip(tokens, active)], model.device)
            logits = engine.step(x, [int(a) for a in active], cache, selector, decode=True)
            tokens = [int(samplers[b](logits[b:b + 1])[0]) if a else 0 for b, a in enumerate(active)]
            dt = time.perf_counter() - t0
            self.stats.decode_s += dt
            self.stats.decode_steps += 1
            for b, a in enumerate(active):
                if a:
                    self._stats[b].decode_s += dt
                    self._stats[b].decode_steps += 1
        self.stats.generated_tokens = sum(len(o.token_ids) for o in outs)


class Generation:
    """One request: iterate it for text pieces; ``result()`` at any time (after an interruption
    too), with everything generated so far and its timings. A batch of one underneath.

    Example::

        g = engine.generate(ids, GenerationConfig(max_new_tokens=32))
        for piece in g:
            print(piece, end="", flush=True)
        print(g.result().stats.decode_tokens_per_s)
    """

    def __init__(self, engine: Engine, prompt_ids: list[int], gen: GenerationConfig,
                 progress: Callable[[int, int], None] | None = None, state: PrefillState | None = None,
                 sparsity: SparsityOptions | None = None):
        self.prompt_ids, self.gen = list(prompt_ids), gen
        self._batch = BatchGeneration(engine, [self.prompt_ids], [gen], progress, sparsity=sparsity, state=state)

    @property
    def token_ids(self) -> list[int]:
        return self._batch._out[0].token_ids

    @property
    def stop_reason(self) -> str:
        return self._batch._out[0].stop_reason

    @property
    def selector(self):
        """The generation's selector once it has started (None before): its ``stats``, the head's K cache."""
        return self._batch._selector

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        while True:
            _, piece = next(self._batch)
            if piece:
                return piece

    def interrupt(self) -> None:
        """Mark the generation as stopped by the user; what was generated is kept."""
        self._batch.interrupt()

    def result(self) -> GenerationResult:
        return self._batch.result(0)
