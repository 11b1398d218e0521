"""Offloaded KV: per-layer placement, elastic loading into device slots, asynchronous prefetch.

Shape letters: B batch, T new tokens this step, G KV heads, S cached positions per row, D head
dim, K budget (past tokens attended per KV head), P slots per KV head (the pool, P >= K),
R = B * G rows (one slot pool each), N offloaded layers.

Placement is per layer. A device-resident layer keeps its full K/V on the compute device (the
:class:`DenseKVCache` part). An offloaded layer keeps its full K/V in host memory (pinned when
the compute device is CUDA, so copies are asynchronous and kernels can read it directly) and,
on the device, P slots per KV head plus one for the current token.

A decode step with a global selection (``specontext`` or ``streaming``) runs like this:

1. :meth:`OffloadedKVCache.begin_step` (the model calls it once the plan is final): the slot pool
   maps the step's selected positions to slots (shared by every offloaded layer, since the
   selection is global) and the copy engine issues, per offloaded layer, one native copy of the
   positions not already resident (elastic loading: S_now - S_last, fewer with P > K).
2. ``update(layer)`` of an offloaded layer waits for that layer's copy only, writes the new
   token's K/V into the layer's current-token slot (used directly this step) and queues its
   write-back to host memory, then gathers the K selected slots plus the current one.

Steps with no selection (prefill chunks, confidence fallbacks, dense decoding) attend to the
whole layer: offloaded layers stream through two device staging buffers, the next offloaded
layer loading into one while the current one computes in the other; their new tokens go to host
memory. A decode step whose past fits in the pool is run through the slots instead (every past
position selected, in order), so decoding starts elastic from the first step.

The copy engine is a CUDA copy stream with one event per layer, or, on a machine with no GPU,
one worker thread between host buffers running the same copies (the native host path), so CI
exercises the same pipeline. ``async_prefetch=False`` runs each copy where it is needed (for
measuring what the overlap hides).

Host memory (see :func:`allocate_host`; ``OffloadedKVCache.host_memory`` says which was used):
on CUDA the host KV is one anonymous mapping page-locked with cudaHostRegister, so the pinned
bytes equal its logical bytes. Failing that it comes from torch's pinned allocator, which rounds
every block up to a power of two (17 GiB takes 32 GiB); failing that it falls back to pageable
memory with a warning: the copies then go through torch and block the host (no kernel can read
pageable memory, and copies from it are staged synchronously).

Lifetimes: the copy stream writes the device slots and staging buffers and reads tensors the
compute stream made, so each of them is marked with ``record_stream`` for the copy stream: the
caching allocator then does not reuse their memory before the copies queued so far have run, even
when a failed step frees them without a ``drain()``. Host memory has no such mark for the native
kernels, so it is released only after a device synchronisation (the finalizers below).
"""

from __future__ import annotations

import math
import mmap
import time
import warnings
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Sequence

import torch

from .. import native
from ..errors import InputError
from ..planner.memory import pinned_block_bytes
from .cache import DenseKVCache
from .plan import StepPlan, to_device
from .slots import SlotPool


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


def _synchronize(device: torch.device) -> None:
    try:
        torch.cuda.synchronize(device)
    except RuntimeError:  # a failed CUDA context: nothing more runs on it
        pass


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


# How the host KV is held (``OffloadedKVCache.host_memory``):
#   "registered"  one anonymous mapping page-locked with cudaHostRegister: pinned bytes = logical
#                 bytes (rounded up to whole pages only);
#   "pin_memory"  torch's caching host allocator (``pin_memory=True``), which rounds each block up
#                 to a power of two: pinned bytes = 2 ** ceil(log2(logical bytes));
#   "pageable"    not pinned (no GPU, or pinning failed).
# The memory planner counts the pinned bytes from this; ``pinned_host_bytes`` is the one formula.
HOST_MEMORY_KINDS = ("registered", "pin_memory", "pageable")


def pinned_host_bytes(num_bytes: int, host_memory: str) -> int:
    """Page-locked bytes that holding ``num_bytes`` of host KV as ``host_memory`` takes (0 if pageable);
    the memory planner's ``pinned_block_bytes`` is the one formula."""
    return 0 if host_memory == "pageable" else pinned_block_bytes(num_bytes, host_memory)


def _release_registered(address: int, device: torch.device) -> None:
    """Unpin a registered range once no queued copy can touch it (its mapping is unmapped next)."""
    _synchronize(device)  # native kernels on any stream may still read or write it
    torch.cuda.cudart().cudaHostUnregister(address)  # a failure leaves nothing to undo


class _RegisteredPages(mmap.mmap):
    """An anonymous private mapping that unregisters itself from CUDA while it is still mapped.

    ``__del__`` runs before mmap's own deallocation unmaps the range (a ``weakref.finalize`` would
    run after it, on an unmapped range). Private anonymous memory can use transparent huge pages,
    which makes registering tens of GB much faster than 4 KiB pages of a shared mapping."""

    registered_on: torch.device | None = None
    address = 0

    def __del__(self):
        if self.registered_on is not None:
            device, self.registered_on = self.registered_on, None
            _release_registered(self.address, device)


def _registered_zeros(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Zeroed host memory page-locked with cudaHostRegister, for exactly the storage's lifetime.

    The bytes come from an anonymous mapping (page-aligned, zero-filled by the kernel, nothing
    rounded beyond the last page). ``torch.frombuffer`` keeps the mapping alive as long as the
    tensor's storage (views included); when the last view goes, the mapping synchronises the
    device and unregisters itself, then is unmapped.
    """
    num_bytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
    pages = _RegisteredPages(-1, num_bytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    flat = torch.frombuffer(pages, dtype=torch.uint8)
    address = flat.data_ptr()
    cudart = torch.cuda.cudart()
    # flags 0 (cudaHostRegisterDefault): with unified addressing the range is mapped and portable,
    # so the copy kernels read it through the same pointer, as they do pin_memory tensors
    status = cudart.cudaHostRegister(address, num_bytes, 0)
    if status != cudart.cudaError.success:
        raise RuntimeError(f"cudaHostRegister failed: {cudart.cudaGetErrorString(status)}")
    pages.address, pages.registered_on = address, device
    out = flat.view(dtype).view(tuple(shape))
    if not out.is_pinned():  # the copy kernels check this before reading host memory
        raise RuntimeError("cudaHostRegister succeeded but CUDA does not report the range as pinned")
    return out


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or ["unknown error"])[0]


def allocate_host(shape: Sequence[int], dtype: torch.dtype, pin: bool,
                  device: torch.device | str = "cuda") -> tuple[torch.Tensor, str]:
    """A zeroed host tensor; returns it and how it is held (one of :data:`HOST_MEMORY_KINDS`).

    With ``pin`` it is page-locked for ``device``: registered with cudaHostRegister (pinned bytes
    = logical bytes), else from ``pin_memory=True`` (rounded up to a power of two), else, with a
    :class:`RuntimeWarning` rather than failing the run, pageable.
    """
    if not pin:
        return torch.zeros(shape, dtype=dtype), "pageable"
    size = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
    if size:
        try:
            return _registered_zeros(shape, dtype, torch.device(device)), "registered"
        except (RuntimeError, AssertionError, AttributeError) as exc:  # no CUDA runtime, or it refused
            warnings.warn(f"could not register {size / 2**20:.1f} MiB of host memory with CUDA for the offloaded KV "
                          f"({_first_line(exc)}); using torch's pinned allocator, which pins "
                          f"{pinned_host_bytes(size, 'pin_memory') / 2**20:.1f} MiB for it (a power of two)",
                          RuntimeWarning, stacklevel=3)
    try:
        return torch.zeros(shape, dtype=dtype, pin_memory=True), "pin_memory"
    except RuntimeError as exc:
        reason = _first_line(exc)
        warnings.warn(f"could not pin {size / 2**20:.1f} MiB of host memory for the offloaded KV ({reason}); "
                      f"using pageable memory, so host-device copies are synchronous and slower "
                      f"(raise the locked-memory limit, `ulimit -l`, to get pinned memory)",
                      RuntimeWarning, stacklevel=3)
        return torch.zeros(shape, dtype=dtype), "pageable"


class OffloadedKVCache(DenseKVCache):
    """Resident layers on the device, offloaded layers in host memory with device slots.

    Args:
        num_layers, batch_size, num_kv_heads, head_dim, capacity_tokens, dtype, device: as
            :class:`DenseKVCache`.
        offloaded: per layer, True to keep its KV in host memory.
        pool_tokens: P, slots per KV head for each offloaded layer (0: none; every decode step
            then streams whole layers). Must be >= the budget of every sparse step.
        async_prefetch: issue copies right after selection on the copy engine; False runs each
            copy at once on the compute stream (no overlap).
        block_tokens: N > 1 moves whole blocks of N consecutive positions (selections must come in
            whole, aligned blocks, as ``specontext`` with ``block_tokens`` makes them): the slot
            pool then holds blocks, and each fetch is one N * D row.
        host_threads: threads of the native host copy (<= 0: the library chooses).
        offload_from_tokens: for the memory manager, per layer of ``offloaded``, the cache length
            at which it leaves the device (0: from the start, the default). Until then the layer
            is device-resident (its buffer grows with the length, see ``grow_tokens``); the
            step that would reach that length first moves its KV to host memory and fills its
            slots from the resident copy, so generation goes on with the same results.
        grow_tokens: growth step of the device-resident buffers (see :class:`DenseKVCache`).

    Example::

        cache = OffloadedKVCache(30, 1, 3, 64, 8192, torch.float32, "cpu",
                                 offloaded=[i >= 20 for i in range(30)], pool_tokens=1280)
    """

    def __init__(self, num_layers: int, batch_size: int, num_kv_heads: int, head_dim: int, capacity_tokens: int,
                 dtype: torch.dtype, device: torch.device | str, offloaded: Sequence[bool], pool_tokens: int,
                 async_prefetch: bool = True, host_threads: int = 0, block_tokens: int = 1,
                 offload_from_tokens: Sequence[int] | None = None, grow_tokens: int = 0):
        if len(offloaded) != num_layers:
            raise ValueError(f"offloaded has {len(offloaded)} entries for {num_layers} layers")
        host_layers = [layer for layer, o in enumerate(offloaded) if o]
        if offload_from_tokens is None:
            offload_from_tokens = [0] * num_layers
        # layer -> cache length from which it lives in host memory (absent: always resident)
        self.offload_from = {layer: int(offload_from_tokens[layer]) for layer in host_layers}
        super().__init__(num_layers, batch_size, num_kv_heads, head_dim, capacity_tokens, dtype, device,
                         on_device=[layer not in self.offload_from or self.offload_from[layer] > 0
                                    for layer in range(num_layers)], grow_tokens=grow_tokens)
        # currently offloaded; the host storage index of a layer is fixed (_index) and consecutive
        # layers have consecutive indices, so the staging double buffer alternates by index
        self.offloaded = [layer in self.offload_from and self.offload_from[layer] == 0 for layer in range(num_layers)]
        self.offloaded_layers = [layer for layer, o in enumerate(self.offloaded) if o]
        self._index = {layer: i for i, layer in enumerate(host_layers)}
        self.moves: list[dict] = []  # layers the manager moved to host memory, and when
        self.block_tokens = Nb = block_tokens
        # whole blocks on both sides: host rows and the pool round up to a multiple of N
        self.pool_tokens = P = -(-pool_tokens // Nb) * Nb
        self.host_threads = host_threads
        N, B, G, D = len(host_layers), batch_size, num_kv_heads, head_dim
        S = -(-capacity_tokens // Nb) * Nb
        self.num_rows = B * G
        cuda = self.device.type == "cuda"
        # [N, 2 (K, V), B, G, S, D]: each (layer, K|V) is a plane of R*S rows of D (R*S/N rows of
        # N*D in block mode), the layout the native plane copy moves one diff through
        # the host KV: "registered" (pinned bytes = logical bytes), "pin_memory" (torch rounds the
        # pinned block up to a power of two) or "pageable"; see allocate_host and pinned_host_bytes
        self.kv_host, self.host_memory = allocate_host((N, 2, B, G, S, D), dtype, pin=cuda, device=self.device)
        self.host_pinned = self.host_memory != "pageable"
        if self.host_memory == "pin_memory":
            # torch's host allocator may give the freed block to a new pinned tensor while native
            # kernels (which it does not track) still use it: wait for them when the cache goes
            weakref.finalize(self, _synchronize, self.device).atexit = False
        if not async_prefetch:
            self.copier: CopyEngine = CopyEngine()
        elif cuda:
            self.copier = CudaCopyEngine(self.device)
        else:
            self.copier = ThreadCopyEngine()
        # per host layer [2, B, G, P + N, D] (None while it is resident): the extra block's first
        # slot, P, holds the current token
        self._slot_shape = (2, B, G, P + Nb, D)
        self.kv_slots_device: list[torch.Tensor | None] = [
            self._new_slots(dtype) if self.offloaded[layer] else None for layer in host_layers]
        self.kv_staging_device: torch.Tensor | None = None  # [2 buffers, 2, B, G, S, D], made on first use
        # made when the first layer is offloaded (the memory manager may move none)
        self._make_pool = partial(SlotPool, self.num_rows, S // Nb, P // Nb, self.device, row_pitch=P // Nb + 1)
        self.slot_pool = self._make_pool() if P and self.offloaded_layers else None
        self.transfer = TransferStats(bytes_per_token=2 * N * D * torch.empty(0, dtype=dtype).element_size())
        self._step_kind = None  # "slots" or "staged" for the step in flight
        self._gather_rows = None  # [B * G * (K + 1)] flat slot rows of the step (current slot last)
        self._gather_shape: tuple = ()
        self._gather_valid = None  # [B, G, 1, K + 1] or None

    # ---- bookkeeping -------------------------------------------------------------------------

    def allocated_bytes(self) -> int:
        return self.device_bytes() + self.host_bytes()

    def device_bytes(self) -> int:
        """Bytes on the compute device: resident layers, slots, staging, gathered rows, slot maps."""
        extra = [*self.kv_slots_device, self.kv_staging_device]
        pool = self.slot_pool.allocated_bytes() if self.slot_pool is not None else 0
        return super().allocated_bytes() + pool + sum(t.numel() * t.element_size() for t in extra if t is not None)

    def host_bytes(self) -> int:
        return self.kv_host.numel() * self.kv_host.element_size()

    def host_pinned_bytes(self) -> int:
        """Page-locked bytes the host KV takes (``host_bytes`` rounded as ``host_memory`` rounds)."""
        return pinned_host_bytes(self.host_bytes(), self.host_memory)

    def rewind(self, length: int) -> None:
        self.copier.drain()
        super().rewind(length)
        if self.slot_pool is not None:
            self.slot_pool.forget_from(length // self.block_tokens)

    def transfer_stats(self) -> dict:
        self.copier.drain()
        out = {"offloaded_layers": list(self.offloaded_layers), "moves": list(self.moves),
               "pool_slots": self.pool_tokens, "block_tokens": self.block_tokens, "host_pinned": self.host_pinned,
               "host_memory": self.host_memory, "host_pinned_bytes": self.host_pinned_bytes(),
               **self.transfer.to_dict()}
        if not isinstance(self.copier, CudaCopyEngine):
            out["copy_s"] = round(self.copier.copy_s, 4)
        return out

    # ---- the memory manager's moves -------------------------------------------------------------

    def reserve(self, input_lens: list[int]) -> list[int]:
        reach = max(s + n for s, n in zip(self.seq_lens, input_lens))
        for layer in sorted(self.offload_from, reverse=True):  # the last resident layer leaves first
            if not self.offloaded[layer] and reach >= self.offload_from[layer]:
                self._move_to_host(layer)
        return super().reserve(input_lens)

    def _move_to_host(self, layer: int) -> None:
        """Move a resident layer's cached positions to host memory and give it slots, filled with
        the positions the slot pool holds now, so the next elastic step fetches only its diff."""
        self.copier.drain()
        i, length = self._index[layer], max(self.seq_lens)
        k_dev, v_dev = self.k_device[layer], self.v_device[layer]
        host = self.kv_host[i]  # [2, B, G, S, D]
        host[0, :, :, :length].copy_(k_dev[:, :, :length])
        host[1, :, :, :length].copy_(v_dev[:, :, :length])
        slots = self._new_slots(k_dev.dtype)
        if self.slot_pool is None and self.pool_tokens:
            self.slot_pool = self._make_pool()
        elif self.slot_pool is not None:
            # token t of slot block s holds position pos_of_slot[r, s] * N + t (empty blocks: -1)
            Nb, R, D = self.block_tokens, self.num_rows, k_dev.shape[-1]
            blocks = self.slot_pool.pos_of_slot  # [R, P/N + 1]
            tokens = (blocks[:, :, None] * Nb + torch.arange(Nb, device=self.device)).reshape(R, -1)  # [R, P + N]
            ok = (blocks[:, :, None] >= 0).expand(-1, -1, Nb).reshape(R, -1) & (tokens < length)
            src = tokens.clamp(0, length - 1)[..., None].expand(R, -1, D) if length else None
            if src is not None:
                for kv, buf in enumerate((k_dev, v_dev)):
                    rows = buf.reshape(R, buf.shape[2], D).gather(1, src)  # [R, P + N, D]
                    slots[kv].view(R, -1, D).copy_(rows * ok[..., None].to(rows.dtype))
        self.kv_slots_device[i] = slots
        self.k_device[layer] = self.v_device[layer] = None
        self.offloaded[layer] = True
        self.offloaded_layers = [l for l, o in enumerate(self.offloaded) if o]
        self.moves.append({"layer": layer, "seq_tokens": length})

    # ---- the step ------------------------------------------------------------------------------

    def begin_step(self, plan: StepPlan) -> None:
        if not self.offloaded_layers:
            return
        sel = plan.selection
        if sel is not None and sel.indices is None:
            raise InputError("per-layer selection (oracle, quest) needs every layer's keys on the device; with "
                             "offloaded layers use --sparsity specontext, streaming or dense")
        T = plan.positions.shape[1]
        past = plan.kv_len - T
        if sel is None and T == 1 and self.slot_pool is not None and 0 < past <= self.pool_tokens \
                and plan.write_start is not None:
            # the whole past fits in the slots: select all of it, in order (the same result as dense)
            B, G, Nb = self.batch_size, self.kv_host.shape[3], self.block_tokens
            wanted = torch.arange(-(-past // Nb) * Nb, device=self.device).expand(B, G, -1)
            self._plan_slots(wanted, None if wanted.shape[-1] == past else wanted < past, plan)
        elif sel is None:
            self._step_kind = "staged"
            self.transfer.staged_steps += 1
            self._staging()  # allocated on the compute stream, before any copy uses it
            first = self.offloaded_layers[0]
            self._submit_or_defer(("stage", first), partial(self._stage_load, self._index[first], past))
        else:
            self._plan_slots(sel.indices[..., :-1], None if sel.valid is None else sel.valid[..., :-1], plan)

    def _plan_slots(self, wanted: torch.Tensor, valid: torch.Tensor | None, plan: StepPlan) -> None:
        """Elastic loading: map the selected past positions [B, G, K] to slots; issue the fetches."""
        B, G, K = wanted.shape
        Nb = self.block_tokens
        if K > self.pool_tokens:
            raise InputError(f"the step selects {K} tokens per KV head but offloaded layers have {self.pool_tokens} "
                             "slots; the slot pool must be at least the budget")
        if Nb > 1:
            # whole aligned blocks: each run of N entries is one block; the newest block gained
            # tokens since it was fetched, so it is never taken as resident
            if K % Nb:
                raise InputError(f"block-granular offload needs selections in whole blocks of {Nb} tokens")
            units = wanted.view(B, G, K // Nb, Nb)[..., 0] // Nb
            unit_valid = None if valid is None else valid.view(B, G, K // Nb, Nb).any(-1)
            self.slot_pool.forget_from(max(plan.kv_len - plan.positions.shape[1] - 1, 0) // Nb)
        else:
            units, unit_valid = wanted, valid
        k = units.shape[-1]
        step = self.slot_pool.assign(units.reshape(self.num_rows, k),
                                     None if unit_valid is None else unit_valid.reshape(self.num_rows, k))
        selected = valid.sum() if valid is not None else torch.full((), B * G * K, device=self.device)
        self.transfer.add(step.fetched * Nb, selected)
        slots = step.slots.view(B, G, k)
        if Nb > 1:  # token slot = block slot * N + offset in the block
            slots = slots.repeat_interleave(Nb, dim=-1) * Nb + wanted % Nb
        current = torch.full((B, G, 1), self.pool_tokens, dtype=torch.int64, device=self.device)
        index = torch.cat([slots, current], dim=-1)
        D = self.kv_host.shape[-1]
        self._gather_shape = (B, G, K + 1, D)
        # flat row numbers into a layer's [B, G, P + N, D] slots: a row copy per index (see
        # DenseKVCache._gather_selected)
        base = torch.arange(B * G, device=self.device).view(B, G, 1) * self._slot_shape[3]
        self._gather_rows = (index + base).reshape(-1)
        self._gather_valid = None
        if valid is not None:
            self._gather_valid = torch.cat([valid, valid.new_ones(B, G, 1)], dim=-1)[:, :, None, :]
        src, dst = step.src_rows, step.dst_rows
        if self.device.type != "cuda":  # the host copy validates indices; -1 marks "no fetch"
            keep = src >= 0
            src, dst = src[keep], dst[keep]
        self._step_kind = "slots"
        for layer in self.offloaded_layers:
            self._submit_or_defer(("fetch", layer), partial(self._fetch, self._index[layer], src, dst), keep=(src, dst))

    def _submit_or_defer(self, key, fn, keep=()) -> None:
        self.copier.submit(key, fn, keep)

    def _fetch(self, i: int, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy the step's missing rows of offloaded layer ``i`` (its K and V planes) into its slots."""
        if src.numel() == 0:
            return
        row = self.kv_host.shape[-1] * self.block_tokens  # one token, or one whole block
        host, slots = self.kv_host[i].view(2, -1, row), self.kv_slots_device[i].view(2, -1, row)
        if self._pageable_on_cuda():  # no kernel reads pageable memory: gather on the host, then copy
            keep = src >= 0
            src_cpu, dst = src[keep].cpu(), dst[keep]
            slots.index_copy_(1, dst, host.index_select(1, src_cpu).to(self.device))
            return
        native.copy_rows_planes(host, src, slots, dst, num_threads=self.host_threads)

    def _host_rows(self, plan: StepPlan, T: int) -> torch.Tensor:
        """Host-plane rows [B, G, T] (r * S + position) of this step's new tokens; -1 for padding."""
        B, G, S = self.batch_size, self.kv_host.shape[3], self.kv_host.shape[4]
        rows = (torch.arange(B * G, device=self.device).view(B, G, 1) * S + plan.positions[:, None, :])
        if plan.write_start is None:
            real = torch.arange(T, device=self.device)[None, :] < to_device(plan.input_lens, self.device)[:, None]
            rows = rows.masked_fill(~real[:, None, :], -1)
        return rows

    def _write_back(self, i: int, k: torch.Tensor, v: torch.Tensor, plan: StepPlan) -> None:
        """Queue the step's new K/V [B, G, T, D] of offloaded layer ``i`` for host memory."""
        B, G, T, D = k.shape
        rows = self._host_rows(plan, T).reshape(-1)
        k, v = k.contiguous().view(B * G * T, D), v.contiguous().view(B * G * T, D)
        if self.device.type != "cuda":
            keep = rows >= 0
            if not bool(keep.all()):
                rows, k, v = rows[keep], k[keep], v[keep]
        host = self.kv_host[i].view(2, -1, D)
        if self._pageable_on_cuda():
            def copy():  # torch copies to pageable memory (synchronous), then the host scatter
                rows_cpu = rows.cpu()
                keep = rows_cpu >= 0
                k_cpu, v_cpu = k.cpu()[keep], v.cpu()[keep]
                native.scatter_rows(k_cpu, rows_cpu[keep], host[0], num_threads=self.host_threads)
                native.scatter_rows(v_cpu, rows_cpu[keep], host[1], num_threads=self.host_threads)
            self.copier.submit(None, copy, keep=(k, v, rows))
            return

        def copy():
            native.scatter_rows(k, rows, host[0], num_threads=self.host_threads)
            native.scatter_rows(v, rows, host[1], num_threads=self.host_threads)
        self.copier.submit(None, copy, keep=(k, v, rows))

    def _stage_load(self, i: int, past: int) -> None:
        """Load the first ``past`` positions of offloaded layer ``i`` into staging buffer i % 2."""
        if past == 0:
            return
        buf = self._staging()[i % 2]
        src = self.kv_host[i]
        B, G = src.shape[1], src.shape[2]
        for kv in range(2):  # each (b, g) run of positions is contiguous in both
            for b in range(B):
                for g in range(G):
                    buf[kv, b, g, :past].copy_(src[kv, b, g, :past], non_blocking=True)
        self.transfer.staged_tokens += past

    def _pageable_on_cuda(self) -> bool:
        return self.device.type == "cuda" and not self.host_pinned

    def _new_slots(self, dtype: torch.dtype) -> torch.Tensor:
        """One offloaded layer's device slots [2, B, G, P + N, D], which the copy engine writes."""
        return self.copier.share(torch.zeros(self._slot_shape, dtype=dtype, device=self.device))

    def _staging(self) -> torch.Tensor:
        if self.kv_staging_device is None:
            _, _, B, G, S, D = self.kv_host.shape
            self.kv_staging_device = self.copier.share(
                torch.zeros(2, 2, B, G, S, D, dtype=self.kv_host.dtype, device=self.device))
        return self.kv_staging_device

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor, plan: StepPlan) -> None:
        if not self.offloaded[layer]:
            return super().store(layer, k, v, plan)
        i = self._index[layer]
        if self._step_kind == "slots":
            self.copier.wait(("fetch", layer))
            slots = self.kv_slots_device[i]  # [2, B, G, P + N, D]
            slots[0, :, :, self.pool_tokens] = k[:, :, 0]
            slots[1, :, :, self.pool_tokens] = v[:, :, 0]
            self._write_back(i, k, v, plan)
            return
        # staged: the whole layer, streamed through a double buffer
        self.copier.wait(("stage", layer))
        buf = self._staging()[i % 2]
        T = k.shape[2]
        if plan.write_start is not None:
            buf[0, :, :, plan.write_start:plan.write_start + T] = k
            buf[1, :, :, plan.write_start:plan.write_start + T] = v
        else:
            b_idx, pos = plan.valid_index
            t_idx = pos - plan.positions[b_idx, 0]
            buf[0][b_idx, :, pos] = k[b_idx, :, t_idx]
            buf[1][b_idx, :, pos] = v[b_idx, :, t_idx]
        self._write_back(i, k, v, plan)
        if i + 1 < len(self.kv_slots_device):  # the other buffer: its layer's attention is queued
            nxt = layer + 1  # offloaded layers are a suffix: the next layer is offloaded too
            self._submit_or_defer(("stage", nxt), partial(self._stage_load, i + 1, plan.kv_len - T))

    def past(self, layer: int, plan: StepPlan):
        if not self.offloaded[layer]:
            return super().past(layer, plan)
        return None, None  # in host memory: a policy here can only be the step's global selection

    def gather(self, layer: int, plan: StepPlan, indices: torch.Tensor, valid: torch.Tensor | None):
        """For an offloaded layer, the step's global selection (``indices``), from its slots."""
        if not self.offloaded[layer]:
            return super().gather(layer, plan, indices, valid)
        if self._step_kind != "slots":
            raise InputError("an offloaded layer serves only a global selection (specontext, streaming) from its slots")
        slots = self.kv_slots_device[self._index[layer]]
        shape = self._gather_shape
        if self.k_selected_device is None or self.k_selected_device.shape != shape:
            self.k_selected_device = torch.empty(shape, dtype=slots.dtype, device=self.device)
            self.v_selected_device = torch.empty(shape, dtype=slots.dtype, device=self.device)
        D = shape[-1]
        torch.index_select(slots[0].reshape(-1, D), 0, self._gather_rows, out=self.k_selected_device.view(-1, D))
        torch.index_select(slots[1].reshape(-1, D), 0, self._gather_rows, out=self.v_selected_device.view(-1, D))
        return self.k_selected_device, self.v_selected_device, self._gather_valid

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, plan: StepPlan, queries: torch.Tensor | None = None):
        if not self.offloaded[layer]:
            return super().update(layer, k, v, plan)
        self.store(layer, k, v, plan)
        if self._step_kind == "slots":
            return self.gather(layer, plan, None, None)
        buf = self._staging()[self._index[layer] % 2]
        return buf[0, :, :, :plan.kv_len], buf[1, :, :, :plan.kv_len], plan.attn_mask
