"""Offloaded KV: per-layer placement, elastic loading into device slots, asynchronous prefetch.

Shape letters: B batch, T new tokens this step, G KV heads, S cached positions per row, D head
dim, K budget (past tokens attended per KV head), P slots per KV head (the pool, P >= K),
R = B * G rows (one slot pool each), N offloaded layers, W a stored row's width (below).

Placement is per layer. A device-resident layer keeps its full K/V on the compute device (the
:class:`DenseKVCache` part). An offloaded layer keeps its full K/V in host memory (pinned when
the compute device is CUDA, so copies are asynchronous and kernels can read it directly) and,
on the device, P slots per KV head plus one for the current token.

A decode step with a global selection (``specontext`` or ``streaming``) runs like this:

1. :meth:`OffloadedKVCache.begin_step` (the engine calls it once the plan is final): the slot pool
   maps the step's selected positions to slots (shared by every offloaded layer, since the
   selection is global) and the copy engine issues, per offloaded layer, one native copy of the
   positions not already resident (elastic loading: S_now - S_last, fewer with P > K).
   It returns the step's :class:`~specontext.kv.plan.FetchPlan`, which the engine puts in the plan.
2. ``update(layer)`` of an offloaded layer waits for that layer's copy only, writes the new
   token's K/V into the layer's current-token slot (used directly this step) and queues its
   write-back to host memory, then gathers the K selected slots plus the current one.

Steps with no selection (prefill chunks, confidence fallbacks, dense decoding) attend to the
whole layer: offloaded layers stream through two device staging buffers, the next offloaded
layer loading into one while the current one computes in the other; their new tokens go to host
memory. A decode step whose past fits in the pool is run through the slots instead (every past
position selected, in order), so decoding starts elastic from the first step.

Each layer of the cache is one storage object in ``layers``: a
:class:`~specontext.kv.cache.ResidentLayer` (8-bit: ``Int8ResidentLayer``), or a :class:`HostLayer`
(its plane of the host KV and its device slots); moving a layer to host memory replaces its element. Copies run on a copy
engine (``kv/transfer.py``); host memory is page-locked where the device allows (``kv/host.py``).

Host memory, slots and staging hold stored rows of width W (``self.rows``, ``kv/int8.py``): for
float KV a row is the D values; for 8-bit KV it is the D bytes and their float32 scale packed
together (W = D + 4), upcast only where a step reads them (the gathered rows, a staged layer).
"""

from __future__ import annotations

import weakref
from functools import partial
from typing import Sequence

import torch

from .. import native
from ..errors import InputError
from .cache import DenseKVCache
from .host import _synchronize, allocate_host, pinned_host_bytes
from .int8 import row_codec
from .plan import FetchPlan, StepPlan, to_device
from .rows import store_rows
from .slots import SlotPool, whole_blocks
from .transfer import CopyEngine, CudaCopyEngine, ThreadCopyEngine, TransferStats


class HostLayer:
    """One layer's full K and V in host memory, with device slots for the positions a step selects.

    Attributes:
        index: its plane of the cache's host KV (fixed per layer: consecutive offloaded layers have
            consecutive indices, so the staging double buffer alternates by index).
        host: [2 (K, V), B, G, S, W], that plane (W: the stored row, see the module docstring).
        slots: [2, B, G, P + N, W] on the device; slot P holds the current token.
    """

    def __init__(self, index: int, host: torch.Tensor, slots: torch.Tensor):
        self.index, self.host, self.slots = index, host, slots

    def nbytes(self) -> int:
        """Device bytes (the host plane is counted with the host KV)."""
        return self.slots.numel() * self.slots.element_size()


class OffloadedKVCache(DenseKVCache):
    """Resident layers on the device, offloaded layers in host memory with device slots.

    Args:
        num_layers, batch_size, num_kv_heads, head_dim, capacity_tokens, dtype, device, kv_format:
            as :class:`DenseKVCache` (8-bit KV is moved and held 8-bit in host memory and slots).
        offloaded: per layer, True to keep its KV in host memory.
        pool_tokens: P, slots per KV head for each offloaded layer (0: none; every decode step
            then streams whole layers). Must be >= the budget of every sparse step.
        async_prefetch: issue copies right after selection on the copy engine; False runs each
            copy at once on the compute stream (no overlap).
        block_tokens: N > 1 moves whole blocks of N consecutive positions (selections must come in
            whole, aligned blocks, as ``specontext`` with ``block_tokens`` makes them): the slot
            pool then holds blocks, and each fetch is one N * W row.
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
                 offload_from_tokens: Sequence[int] | None = None, grow_tokens: int = 0,
                 kv_format: str = "float"):
        if len(offloaded) != num_layers:
            raise ValueError(f"offloaded has {len(offloaded)} entries for {num_layers} layers")
        host_layers = [layer for layer, o in enumerate(offloaded) if o]
        if offload_from_tokens is None:
            offload_from_tokens = [0] * num_layers
        # layer -> cache length from which it lives in host memory (absent: always resident)
        self.offload_from = {layer: int(offload_from_tokens[layer]) for layer in host_layers}
        self._index = {layer: i for i, layer in enumerate(host_layers)}  # layer -> its host plane
        self.moves: list[dict] = []  # layers the manager moved to host memory, and when
        self.block_tokens = Nb = block_tokens
        # whole blocks on both sides: host rows and the pool round up to a multiple of N
        self.pool_tokens = P = whole_blocks(pool_tokens, Nb)
        self.host_threads = host_threads
        N, B, G = len(host_layers), batch_size, num_kv_heads
        S = whole_blocks(capacity_tokens, Nb)
        self.rows = row_codec(kv_format, head_dim, dtype)  # the stored row: W values of its storage dtype
        W, stored = self.rows.width, self.rows.storage_dtype
        self.num_rows = B * G
        device = torch.device(device)
        cuda = device.type == "cuda"
        # [N, 2 (K, V), B, G, S, W]: each (layer, K|V) is a plane of R*S rows of W (R*S/N rows of
        # N*W in block mode), the layout the native plane copy moves one diff through
        # the host KV: "registered" (pinned bytes = logical bytes), "pin_memory" (torch rounds the
        # pinned block up to a power of two) or "pageable"; see allocate_host and pinned_host_bytes
        self.kv_host, self.host_memory = allocate_host((N, 2, B, G, S, W), stored, pin=cuda, device=device)
        self.host_pinned = self.host_memory != "pageable"
        if self.host_memory == "pin_memory":
            # torch's host allocator may give the freed block to a new pinned tensor while native
            # kernels (which it does not track) still use it: wait for them when the cache goes
            weakref.finalize(self, _synchronize, device).atexit = False
        if not async_prefetch:
            self.copier: CopyEngine = CopyEngine()
        elif cuda:
            self.copier = CudaCopyEngine(device)
        else:
            self.copier = ThreadCopyEngine()
        self._slot_shape = (2, B, G, P + Nb, W)  # the extra block's first slot, P, holds the current token
        # layers offloaded from the start are never allocated on the device (_initial_layer)
        super().__init__(num_layers, batch_size, num_kv_heads, head_dim, capacity_tokens, dtype, device,
                         grow_tokens=grow_tokens, kv_format=kv_format)
        self.kv_staging_device: torch.Tensor | None = None  # [2 buffers, 2, B, G, S, W], made on first use
        # made when the first layer is offloaded (the memory manager may move none)
        self._make_pool = partial(SlotPool, self.num_rows, S // Nb, P // Nb, self.device, row_pitch=P // Nb + 1)
        self.slot_pool = self._make_pool() if P and self.offloaded_layers else None
        self.transfer = TransferStats(bytes_per_token=2 * N * W * torch.empty(0, dtype=stored).element_size())

    def _initial_layer(self, layer: int):
        if self.offload_from.get(layer) == 0:  # offloaded from the start
            i = self._index[layer]
            return HostLayer(i, self.kv_host[i], self._new_slots())
        return super()._initial_layer(layer)

    # ---- bookkeeping -------------------------------------------------------------------------

    @property
    def offloaded_layers(self) -> list[int]:
        """The layers in host memory now."""
        return [layer for layer, store in enumerate(self.layers) if isinstance(store, HostLayer)]

    def allocated_bytes(self) -> int:
        return self.device_bytes() + self.host_bytes()

    def device_bytes(self) -> int:
        """Bytes on the compute device: resident layers, slots, staging, gathered rows, slot maps."""
        pool = self.slot_pool.allocated_bytes() if self.slot_pool is not None else 0
        staging = self.kv_staging_device
        return super().allocated_bytes() + pool + (staging.numel() * staging.element_size() if staging is not None else 0)

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
        out = {"offloaded_layers": self.offloaded_layers, "moves": list(self.moves),
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
            if not isinstance(self.layers[layer], HostLayer) and reach >= self.offload_from[layer]:
                self._move_to_host(layer)
        return super().reserve(input_lens)

    def _move_to_host(self, layer: int) -> None:
        """Replace a resident layer by a :class:`HostLayer`: its cached positions go to host
        memory, and its slots are filled with the positions the slot pool holds now, so the next
        elastic step fetches only its diff. K, then V: an 8-bit layer packs one of them at a time
        (the transient is one [B, G, length, W] plane)."""
        self.copier.drain()
        i, length = self._index[layer], max(self.seq_lens)
        resident, host, slots = self.layers[layer], self.kv_host[i], self._new_slots()  # host: [2, B, G, S, W]
        src = None
        if self.slot_pool is None and self.pool_tokens:
            self.slot_pool = self._make_pool()
        elif self.slot_pool is not None and length:
            # token t of slot block s holds position pos_of_slot[r, s] * N + t (empty blocks: -1)
            Nb, R, W = self.block_tokens, self.num_rows, self.rows.width
            blocks = self.slot_pool.pos_of_slot  # [R, P/N + 1]
            tokens = (blocks[:, :, None] * Nb + torch.arange(Nb, device=self.device)).reshape(R, -1)  # [R, P + N]
            ok = (blocks[:, :, None] >= 0).expand(-1, -1, Nb).reshape(R, -1) & (tokens < length)
            src = tokens.clamp(0, length - 1)[..., None].expand(R, -1, W)
        for kv in range(2):
            rows = resident.host_rows(kv, length)  # [B, G, length, W]
            host[kv, :, :, :length].copy_(rows)
            if src is not None:
                picked = rows.reshape(R, length, W).gather(1, src)  # [R, P + N, W]
                slots[kv].view(R, -1, W).copy_(picked * ok[..., None].to(picked.dtype))
            del rows
        self.layers[layer] = HostLayer(i, host, slots)  # the resident buffers are freed here
        self.moves.append({"layer": layer, "seq_tokens": length})

    # ---- the step ------------------------------------------------------------------------------

    def begin_step(self, plan: StepPlan) -> FetchPlan | None:
        offloaded = self.offloaded_layers
        if not offloaded:
            return None
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
            return self._plan_slots(wanted, None if wanted.shape[-1] == past else wanted < past, plan, offloaded)
        if sel is None:
            self.transfer.staged_steps += 1
            self._staging()  # allocated on the compute stream, before any copy uses it
            first = self.layers[offloaded[0]]
            self.copier.submit(("stage", offloaded[0]), partial(self._stage_load, first.index, past))
            return FetchPlan("staged")
        return self._plan_slots(sel.indices[..., :-1], None if sel.valid is None else sel.valid[..., :-1], plan,
                                offloaded)

    def _plan_slots(self, wanted: torch.Tensor, valid: torch.Tensor | None, plan: StepPlan,
                    offloaded: list[int]) -> FetchPlan:
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
        D = self.rows.head_dim
        # flat row numbers into a layer's [B, G, P + N, W] slots: a row copy per index (see
        # DenseKVCache.gather)
        base = torch.arange(B * G, device=self.device).view(B, G, 1) * self._slot_shape[3]
        gather_valid = None
        if valid is not None:
            gather_valid = torch.cat([valid, valid.new_ones(B, G, 1)], dim=-1)[:, :, None, :]
        src, dst = step.src_rows, step.dst_rows
        if self.device.type != "cuda":  # the host copy validates indices; -1 marks "no fetch"
            keep = src >= 0
            src, dst = src[keep], dst[keep]
        for layer in offloaded:
            self.copier.submit(("fetch", layer), partial(self._fetch, self.layers[layer], src, dst), keep=(src, dst))
        return FetchPlan("slots", (index + base).reshape(-1), (B, G, K + 1, D), gather_valid)

    def _fetch(self, store: HostLayer, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy the step's missing rows of an offloaded layer (its K and V planes) into its slots."""
        if src.numel() == 0:
            return
        row = self.rows.width * self.block_tokens  # one token, or one whole block
        host, slots = store.host.view(2, -1, row), store.slots.view(2, -1, row)
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

    def _write_back(self, store: HostLayer, k: torch.Tensor, v: torch.Tensor, plan: StepPlan) -> None:
        """Queue the step's new K/V of an offloaded layer, stored rows [B, G, T, W], for host memory."""
        B, G, T, W = k.shape
        rows = self._host_rows(plan, T).reshape(-1)
        k, v = k.contiguous().view(B * G * T, W), v.contiguous().view(B * G * T, W)
        if self.device.type != "cuda":
            keep = rows >= 0
            if not bool(keep.all()):
                rows, k, v = rows[keep], k[keep], v[keep]
        host = store.host.view(2, -1, W)
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
        """Load the first ``past`` positions of host plane ``i`` into staging buffer i % 2."""
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

    def _new_slots(self) -> torch.Tensor:
        """One offloaded layer's device slots [2, B, G, P + N, W], which the copy engine writes."""
        return self.copier.share(torch.zeros(self._slot_shape, dtype=self.rows.storage_dtype, device=self.device))

    def _staging(self) -> torch.Tensor:
        if self.kv_staging_device is None:
            _, _, B, G, S, W = self.kv_host.shape
            self.kv_staging_device = self.copier.share(
                torch.zeros(2, 2, B, G, S, W, dtype=self.kv_host.dtype, device=self.device))
        return self.kv_staging_device

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor, plan: StepPlan) -> None:
        store = self.layers[layer]
        if not isinstance(store, HostLayer):
            return store.store(k, v, plan)
        T = k.shape[2]
        k, v = self.rows.encode(k), self.rows.encode(v)  # stored rows [B, G, T, W], quantized once
        if plan.fetch.kind == "slots":
            self.copier.wait(("fetch", layer))
            store.slots[0, :, :, self.pool_tokens] = k[:, :, 0]
            store.slots[1, :, :, self.pool_tokens] = v[:, :, 0]
            self._write_back(store, k, v, plan)
            return
        # staged: the whole layer, streamed through a double buffer
        self.copier.wait(("stage", layer))
        buf = self._staging()[store.index % 2]
        store_rows(buf[0], buf[1], k, v, plan)
        self._write_back(store, k, v, plan)
        if store.index + 1 < self.kv_host.shape[0]:  # the other buffer: its layer's attention is queued
            nxt = layer + 1  # offloaded layers are a suffix: the next layer is offloaded too
            self.copier.submit(("stage", nxt), partial(self._stage_load, store.index + 1, plan.kv_len - T))

    def past(self, layer: int, plan: StepPlan):
        if not isinstance(self.layers[layer], HostLayer):
            return super().past(layer, plan)
        return None, None  # in host memory: a policy here can only be the step's global selection

    def gather(self, layer: int, plan: StepPlan, indices: torch.Tensor, valid: torch.Tensor | None):
        """For an offloaded layer, the step's global selection (``indices``), from its slots."""
        store = self.layers[layer]
        if not isinstance(store, HostLayer):
            return super().gather(layer, plan, indices, valid)
        fetch = plan.fetch
        if fetch.kind != "slots":
            raise InputError("an offloaded layer serves only a global selection (specontext, streaming) from its slots")
        out_k, out_v = self._gathered(fetch.gather_shape[:3])
        D, W = fetch.gather_shape[-1], self.rows.width
        self.rows.gather(store.slots[0].reshape(-1, W), fetch.gather_rows, out_k.view(-1, D))
        self.rows.gather(store.slots[1].reshape(-1, W), fetch.gather_rows, out_v.view(-1, D))
        return out_k, out_v, fetch.gather_valid

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, plan: StepPlan):
        store = self.layers[layer]
        if not isinstance(store, HostLayer):
            return super().update(layer, k, v, plan)
        self.store(layer, k, v, plan)
        if plan.fetch.kind == "slots":
            return self.gather(layer, plan, None, None)
        buf = self._staging()[store.index % 2]
        return self.rows.decode(buf[0, :, :, :plan.kv_len]), self.rows.decode(buf[1, :, :, :plan.kv_len]), plan.attn_mask
