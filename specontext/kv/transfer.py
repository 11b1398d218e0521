"""Where offloaded KV's copies run, and what they moved.

The copy engine is a CUDA copy stream with one event per layer, or, on a machine with no GPU,
one worker thread between host buffers running the same copies (the native host path), so CI
exercises the same pipeline; the base class runs each copy inline, where it is needed (for
measuring what the overlap hides).

Lifetimes: the copy stream writes the device slots and staging buffers and reads tensors the
compute stream made, so each of them is marked with ``record_stream`` for the copy stream: the
caching allocator then does not reuse their memory before the copies queued so far have run, even
when a failed step frees them without a ``drain()``.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Sequence

import torch


class CopyEngine:
    """Where offload copies run; the prefetch choreography of STYLE.md lives in ``submit``/``wait``.

    Subclasses: :class:`CudaCopyEngine` (copy stream + events), :class:`ThreadCopyEngine` (one
    worker thread), and this base, which runs every copy inline (no overlap).
    """

    copy_s = 0.0  # host time spent inside copy jobs (CPU engines; the CUDA engine's copies are async)

    def submit(self, key, fn: Callable[[], None], keep: Sequence[torch.Tensor] = ()) -> None:
        """Run ``fn`` (copies only) after all compute queued so far; ``wait(key)`` then orders
        compute after it. ``keep``: this step's tensors the copy reads that compute allocated."""
        self._timed(fn)

    def share(self, buffer: torch.Tensor) -> torch.Tensor:
        """Mark a long-lived device ``buffer`` (made on the compute stream) that copies will write
        or read, so freeing it never hands its memory to new work while a copy may still use it."""
        return buffer

    def _timed(self, fn: Callable[[], None]) -> None:
        t0 = time.perf_counter()
        try:
            fn()
        finally:
            self.copy_s += time.perf_counter() - t0

    def wait(self, key) -> None:
        """Make the compute that follows wait for the copy submitted under ``key`` (no-op if none)."""

    def drain(self) -> None:
        """Wait for every copy submitted so far (the cache is then consistent in host memory)."""


def _in_inference_mode(fn: Callable[[], None]) -> None:
    with torch.inference_mode():
        fn()


class ThreadCopyEngine(CopyEngine):
    """One worker thread runs copies in submission order, so a write-back always lands before a
    later fetch of the same rows. On CPU, compute queued before ``submit`` has already run
    (torch is synchronous there), which is the "wait on compute" step; native copies and torch
    kernels release the GIL, so the worker overlaps with the layers that follow."""

    def __init__(self):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="specontext-copy")
        self._pending: dict = {}
        self._all: list[Future] = []

    def submit(self, key, fn, keep=()):
        future = self._pool.submit(_in_inference_mode, partial(self._timed, fn))  # the mode is thread-local
        self._all.append(future)
        if key is not None:
            self._pending[key] = future

    def wait(self, key):
        future = self._pending.pop(key, None)
        if future is not None:
            future.result()  # re-raises a failed copy here, in the caller's thread
        # write-backs have no key: a failed one surfaces at the next wait instead of being lost
        done = [f for f in self._all if f.done()]
        self._all = [f for f in self._all if not f.done()]
        for f in done:
            f.result()

    def drain(self):
        for future in self._all:
            future.result()
        self._all.clear()
        self._pending.clear()

    def __del__(self):
        # may run on the worker itself (a job held the last reference), which cannot join itself;
        # queued copies still finish
        self._pool.shutdown(wait=False)


class CudaCopyEngine(CopyEngine):
    """A dedicated copy stream. ``submit``: (1) the copy stream waits on the compute stream,
    (2) the copies are issued on it, (3) an event is recorded; ``wait``: (4) the compute stream
    waits on that event, so a layer's attention waits for its own layer's copy only."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device)
        self._events: dict = {}

    def submit(self, key, fn, keep=()):
        compute = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(compute)
        for t in keep:  # the allocator must not reuse these before the copy has read them
            t.record_stream(self.stream)
        try:
            with torch.cuda.stream(self.stream):
                fn()
        finally:  # a job that failed part-way may have queued copies: compute still waits for them
            if key is not None:
                event = torch.cuda.Event()
                event.record(self.stream)
                self._events[key] = event

    def share(self, buffer):
        # record_stream holds for the buffer's whole life: when it is freed the allocator records
        # an event on the copy stream and reuses the memory only once that event has passed
        buffer.record_stream(self.stream)
        return buffer

    def wait(self, key):
        event = self._events.pop(key, None)
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)

    def drain(self):
        self.stream.synchronize()
        self._events.clear()


@dataclass
class TransferStats:
    """Tokens moved host -> device for offloaded layers, against a full reload of the selection.

    Counters are device tensors (no sync per step); :meth:`to_dict` reads them once.
    ``bytes_per_token``: K and V of one token of one KV head over all offloaded layers.
    """

    bytes_per_token: int
    elastic_steps: int = 0
    staged_steps: int = 0  # steps that streamed whole offloaded layers (prefill, dense, fallback)
    staged_tokens: int = 0  # positions loaded per KV head by staged steps, summed over layers' loads
    _fetched: list = field(default_factory=list)
    _selected: list = field(default_factory=list)

    def add(self, fetched: torch.Tensor, selected: torch.Tensor) -> None:
        self.elastic_steps += 1
        self._fetched.append(fetched)
        self._selected.append(selected)

    def to_dict(self) -> dict:
        fetched = int(torch.stack(self._fetched).sum()) if self._fetched else 0
        selected = int(torch.stack(self._selected).sum()) if self._selected else 0
        self._fetched, self._selected = [torch.tensor(fetched)], [torch.tensor(selected)]
        steps = max(self.elastic_steps, 1)
        return {
            "elastic_steps": self.elastic_steps,
            "fetched_tokens": fetched,  # summed over steps and KV heads (rows), per offloaded layer set
            "full_reload_tokens": selected,
            "fetched_bytes": fetched * self.bytes_per_token,
            "full_reload_bytes": selected * self.bytes_per_token,
            "fetched_bytes_per_step": round(fetched * self.bytes_per_token / steps, 1),
            "full_reload_bytes_per_step": round(selected * self.bytes_per_token / steps, 1),
            "reduction_vs_full_reload": round(selected / fetched, 3) if fetched else None,
            "staged_steps": self.staged_steps,
        }
