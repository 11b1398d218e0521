"""Offloaded KV (kv/offload.py, kv/slots.py): elastic loading, the slot pool, and the same answers.

References: a plain-Python LRU slot pool; the device-resident cache (DenseKVCache) running the
same selection, which must give bit-identical logits and tokens.
"""

from __future__ import annotations

import gc
import random
import re

import pytest
import torch

import specontext
from specontext.errors import InputError
from specontext.kv.offload import HostLayer, OffloadedKVCache
from specontext.kv.slots import SlotPool

from conftest import make_hf_model, make_random_head

PREFIX, TOTAL = 80, 120


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny 3-layer GQA llama and a random retrieval head for it."""
    root = tmp_path_factory.mktemp("offload")
    make_hf_model("llama", str(root / "m"), max_position_embeddings=256)
    llm = specontext.load(str(root / "m"), device="cpu", prefill_chunk_tokens=32)
    make_random_head(llm.target, str(root / "head" / "tiny"))
    ids = torch.randint(3, 96, (TOTAL,), generator=torch.Generator().manual_seed(3)).tolist()
    return {"path": str(root / "m"), "head": str(root / "head" / "tiny"), "ids": ids,
            "num_layers": llm.model.config.num_layers}


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _load(tiny, device="cpu", **options):
    if options.get("sparsity") == "specontext":
        options.setdefault("retrieval_head", tiny["head"])
    return specontext.load(tiny["path"], device=device, prefill_chunk_tokens=32, **options)


def _reference_lru(sets: list[list[list[int]]], pool_slots: int) -> list[list[list[int]]]:
    """Plain-Python slot pool: per row, misses take empty slots, then least recently selected."""
    rows = len(sets[0])
    where = [dict() for _ in range(rows)]
    last = [[-1] * pool_slots for _ in range(rows)]
    out = []
    for step, chosen in enumerate(sets, start=1):
        step_slots = []
        for r, want in enumerate(chosen):
            held = where[r]
            busy = {held[p] for p in want if p in held}
            free = sorted((s for s in range(pool_slots) if s not in busy), key=lambda s: (last[r][s], s))
            for p, s in zip([p for p in want if p not in held], free):
                for q in [q for q, t in held.items() if t == s]:
                    del held[q]
                held[p] = s
            for p in want:
                last[r][held[p]] = step
            step_slots.append([held[p] for p in want])
        out.append(step_slots)
    return out


@pytest.mark.parametrize("pool_slots", [16, 20, 27])
def test_slot_pool_matches_a_plain_lru_and_fetches_only_the_diff(pool_slots):
    rows, capacity, budget = 3, 150, 16
    rng = random.Random(pool_slots)
    sets, current = [], [sorted(rng.sample(range(100), budget)) for _ in range(rows)]
    for _ in range(40):  # drift: keep most of the last choice, add a few new positions
        nxt = []
        for want in current:
            keep = set(rng.sample(want, budget - 3))
            while len(keep) < budget:
                keep.add(rng.randrange(capacity))
            nxt.append(sorted(keep))
        sets.append(nxt)
        current = nxt
    pool = SlotPool(rows, capacity, pool_slots, "cpu", row_pitch=pool_slots + 1)
    expected = _reference_lru(sets, pool_slots)
    content = torch.full((rows * (pool_slots + 1),), -1)
    previous = [set() for _ in range(rows)]
    for step, chosen in enumerate(sets):
        plan = pool.assign(torch.tensor(chosen))
        assert plan.slots.tolist() == expected[step]
        fetch = plan.src_rows >= 0
        content[plan.dst_rows[fetch]] = plan.src_rows[fetch]
        for r, want in enumerate(chosen):  # every selected position sits in its slot
            assert [int(content[r * (pool_slots + 1) + s]) for s in plan.slots[r]] == [r * capacity + p for p in want]
        diff = sum(len(set(w) - previous[r]) for r, w in enumerate(chosen))
        if pool_slots == budget:  # the paper's elastic loading: exactly S_now - S_last
            assert int(plan.fetched) == diff
        else:
            assert int(plan.fetched) <= diff
        assert int(plan.selected) == rows * budget
        previous = [set(w) for w in chosen]


def test_slot_pool_padding_and_rewind():
    pool = SlotPool(2, 50, 4, "cpu")
    wanted = torch.tensor([[1, 2, 3, 0], [5, 6, 0, 0]])
    valid = torch.tensor([[True, True, True, False], [True, True, False, False]])
    plan = pool.assign(wanted, valid)
    assert int(plan.fetched) == 5 and int(plan.selected) == 5
    assert (plan.src_rows >= 0).sum() == 5
    pool.forget_from(3)  # positions >= 3 of every row are no longer cached
    plan = pool.assign(wanted, valid)
    assert int(plan.fetched) == 3 and plan.src_rows[plan.src_rows >= 0].tolist() == [3, 50 + 5, 50 + 6]


@pytest.mark.parametrize("method", ["specontext", "streaming"])
@pytest.mark.parametrize("slot_pool", [1.0, 1.5])
@pytest.mark.parametrize("async_prefetch", [True, False])
def test_offloaded_equals_device_resident_sparse(tiny, method, slot_pool, async_prefetch):
    ids, L = tiny["ids"], tiny["num_layers"]
    common = dict(sparsity=method, budget_tokens=24, sink_tokens=2, window_tokens=4)
    resident = _load(tiny, **common)
    ref_logits, _ = resident.engine.teacher_forced(ids[:PREFIX], ids[PREFIX:])
    ref_tokens = resident.generate(ids[:PREFIX], max_new_tokens=24, ignore_eos=True).token_ids
    for offload in (1, L):
        llm = _load(tiny, offload_layers=offload, slot_pool=slot_pool, async_prefetch=async_prefetch, **common)
        logits, selector = llm.engine.teacher_forced(ids[:PREFIX], ids[PREFIX:])
        assert selector.stats.sparse_steps == TOTAL - PREFIX - 1
        assert torch.equal(logits, ref_logits)
        result = llm.generate(ids[:PREFIX], max_new_tokens=24, ignore_eos=True)
        assert result.token_ids == ref_tokens
        off = result.stats.offload
        assert off["offloaded_layers"] == list(range(L - offload, L))
        assert 0 < off["fetched_tokens"] < off["full_reload_tokens"]
        assert off["pool_slots"] == int(24 * slot_pool + 0.999)


def test_a_larger_pool_fetches_less(tiny):
    fetched = {}
    for slot_pool in (1.0, 1.5, 2.0):
        llm = _load(tiny, sparsity="specontext", budget_tokens=24, sink_tokens=2, window_tokens=4, offload_layers=2,
                    slot_pool=slot_pool)
        fetched[slot_pool] = llm.generate(tiny["ids"][:PREFIX], max_new_tokens=30, ignore_eos=True).stats.offload["fetched_tokens"]
    assert fetched[1.0] > fetched[1.5] >= fetched[2.0]


@pytest.mark.parametrize("budget", [200, 24])
def test_dense_and_fitting_steps_equal_dense(tiny, budget):
    """Prefill, dense decoding (whole layers streamed) and steps whose past fits in the slots."""
    ids = tiny["ids"]
    ref, _ = _load(tiny).engine.teacher_forced(ids[:PREFIX], ids[PREFIX:])
    method = "streaming" if budget == 200 else "dense"
    llm = _load(tiny, sparsity=method, budget_tokens=budget, sink_tokens=2, offload_layers=2)
    logits, _ = llm.engine.teacher_forced(ids[:PREFIX], ids[PREFIX:])
    assert torch.equal(logits, ref)


def test_offloaded_layers_live_in_host_memory(tiny):
    llm = _load(tiny, sparsity="streaming", budget_tokens=24, sink_tokens=2, offload_layers=2)
    cache = llm.engine.new_cache(TOTAL)
    assert isinstance(cache, OffloadedKVCache)
    L = tiny["num_layers"]
    assert [isinstance(store, HostLayer) for store in cache.layers] == [layer >= L - 2 for layer in range(L)]
    assert cache.kv_host.device.type == "cpu" and cache.kv_host.shape[0] == 2
    llm.engine.prefill(tiny["ids"][:PREFIX], cache)
    cache.copier.drain()
    resident = _load(tiny)
    dense = resident.engine.new_cache(TOTAL)
    resident.engine.prefill(tiny["ids"][:PREFIX], dense)
    for i, layer in enumerate(cache.offloaded_layers):  # the host copy is the layer's KV
        assert torch.equal(cache.kv_host[i, 0, :, :, :PREFIX], dense.layers[layer].k[:, :, :PREFIX])
        assert torch.equal(cache.kv_host[i, 1, :, :, :PREFIX], dense.layers[layer].v[:, :, :PREFIX])
    assert cache.host_bytes() == 2 * 2 * cache.kv_host[0, 0].numel() * cache.kv_host.element_size()


def test_bad_offload_options_are_refused(tiny):
    with pytest.raises(InputError, match="offload_layers is 9 but the model has 3 layers"):
        _load(tiny, offload_layers=9).generate(tiny["ids"][:10], max_new_tokens=2)
    with pytest.raises(InputError, match="needs every layer's keys on the device"):
        _load(tiny, sparsity="oracle", offload_layers=1)
    with pytest.raises(InputError, match="slot_pool must be a number >= 1"):
        _load(tiny, offload_layers=1, slot_pool=0.5)
    with pytest.raises(InputError, match="offload_layers must be >= 0"):
        _load(tiny, offload_layers=-1)


def test_cli_reports_offload_in_json_and_refuses_bad_placement(tiny, tmp_path, capsys):
    import json

    from specontext.cli import main

    doc = tmp_path / "doc.txt"
    doc.write_text(" ".join(f"w{i % 90 + 3}" for i in range(150)))
    common = ["--model", tiny["path"], "--document", str(doc), "--no-chat-template", "--json", "--quiet",
              "--max-new-tokens", "8", "--ignore-eos", "--sparsity", "streaming", "--budget", "40", "--sink-tokens", "2"]
    rc = main(common + ["--offload-layers", "2", "--slot-pool", "1.5", "--no-async-prefetch"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0
    off = out["offload"]
    assert off["pool_slots"] == 60 and off["offloaded_layers"] == [tiny["num_layers"] - 2, tiny["num_layers"] - 1]
    assert off["kv_host_bytes"] > 0 and off["elastic_steps"] == 7
    assert 0 < off["fetched_tokens"] < off["full_reload_tokens"]
    rc = main(common + ["--offload-layers", "7"])
    err = capsys.readouterr().err
    assert rc != 0 and err.count("\n") == 1 and "offload_layers is 7 but the model has 3 layers" in err


@pytest.mark.parametrize("slot_pool", [1.0, 1.5])
def test_block_granular_offload_equals_resident_block_selection(tiny, slot_pool):
    """Whole 8-token blocks: the head keeps aligned blocks (sinks' and window's always), and the
    offloaded cache moves them as single rows with the same answers as the resident cache."""
    ids = tiny["ids"]
    common = dict(sparsity="specontext", budget_tokens=32, sink_tokens=2, window_tokens=4, block_tokens=8)
    resident = _load(tiny, **common)
    record = []
    resident.engine.on_select = lambda sel, plan: record.append((sel, int(plan.positions[0, 0])))
    ref_logits, _ = resident.engine.teacher_forced(ids[:PREFIX], ids[PREFIX:])
    resident.engine.on_select = None
    for sel, past in record:
        chosen = sel.indices[0, :, :-1]
        valid = sel.valid[0, :, :-1]
        for g in range(chosen.shape[0]):
            positions = chosen[g][valid[g]].tolist()
            blocks = sorted({p // 8 for p in positions})
            assert positions == [p for b in blocks for p in range(b * 8, min(b * 8 + 8, past))]
            assert 0 in blocks and (past - 1) // 8 in blocks and len(blocks) <= 4
    ref_tokens = resident.generate(ids[:PREFIX], max_new_tokens=24, ignore_eos=True).token_ids
    llm = _load(tiny, offload_layers=2, slot_pool=slot_pool, **common)
    logits, _ = llm.engine.teacher_forced(ids[:PREFIX], ids[PREFIX:])
    assert torch.equal(logits, ref_logits)
    result = llm.generate(ids[:PREFIX], max_new_tokens=24, ignore_eos=True)
    assert result.token_ids == ref_tokens
    off = result.stats.offload
    assert off["fetched_tokens"] % 8 == 0 and 0 < off["fetched_tokens"] < 2 * off["full_reload_tokens"]


def test_block_tokens_must_divide_the_budget_and_need_specontext(tiny):
    with pytest.raises(InputError, match="multiple of block_tokens \\(16\\); got 40, use 32"):
        _load(tiny, sparsity="specontext", budget_tokens=40, block_tokens=16, sink_tokens=2, window_tokens=4)
    with pytest.raises(InputError, match="specontext only"):
        _load(tiny, sparsity="streaming", budget_tokens=32, block_tokens=16)


@pytest.mark.parametrize("async_prefetch", [True, False])
def test_a_failing_copy_reaches_the_caller(tiny, monkeypatch, async_prefetch):
    """An error in the prefetch path is raised to the caller, never a hang or a wrong answer."""
    from specontext import native

    def broken(*args, **kwargs):
        raise native.NativeError(4, "CUDA error", "injected copy failure")
    llm = _load(tiny, sparsity="streaming", budget_tokens=24, sink_tokens=2, offload_layers=2,
                async_prefetch=async_prefetch)
    monkeypatch.setattr(native, "copy_rows_planes", broken)
    with pytest.raises(native.NativeError, match="injected copy failure"):
        llm.generate(tiny["ids"][:PREFIX], max_new_tokens=8, ignore_eos=True)


def test_a_failed_pinned_allocation_falls_back_to_pageable_with_a_warning(monkeypatch):
    from specontext.kv import host

    real_zeros = torch.zeros

    def no_pinning(*args, pin_memory=False, **kwargs):
        if pin_memory:
            raise RuntimeError("CUDA error: out of memory\nmore detail")
        return real_zeros(*args, **kwargs)
    monkeypatch.setattr(host.torch, "zeros", no_pinning)
    monkeypatch.setattr(host, "_registered_zeros", _refuse_registration)
    with pytest.warns(RuntimeWarning) as caught:
        t, kind = host.allocate_host((2, 3, 4), torch.float16, pin=True)
    messages = [str(w.message) for w in caught]
    registering = r"could not register 0\.0 MiB .*\(cudaHostRegister failed: no device\); using torch's pinned"
    assert any(re.search(registering, m) for m in messages)
    assert any(re.search(r"could not pin 0\.0 MiB .*\(CUDA error: out of memory\); using pageable", m)
               for m in messages)
    assert kind == "pageable" and t.shape == (2, 3, 4) and t.dtype == torch.float16 and not bool(t.any())
    t, kind = host.allocate_host((5,), torch.float32, pin=False)  # no pinning asked: no warning
    assert kind == "pageable" and t.shape == (5,)


def _refuse_registration(shape, dtype, device):
    raise RuntimeError("cudaHostRegister failed: no device")


def _is_mapped(address: int) -> bool:
    with open("/proc/self/maps", encoding="ascii") as f:
        for line in f:
            start, end = (int(x, 16) for x in line.split()[0].split("-"))
            if start <= address < end:
                return True
    return False


class _FakeCudart:
    """The two calls of torch.cuda.cudart() that allocate_host makes, recorded."""

    class cudaError:  # noqa: N801 - the binding's name
        success = 0

    def __init__(self, calls: list, status: int = 0):
        self.calls, self.status = calls, status

    def cudaHostRegister(self, address, num_bytes, flags):  # noqa: N802
        self.calls.append(("register", address, num_bytes, flags))
        return self.status

    def cudaHostUnregister(self, address):  # noqa: N802
        self.calls.append(("unregister", address))
        self.calls.append(("still mapped", _is_mapped(address)))  # the range must be unregistered before munmap
        return 0

    def cudaGetErrorString(self, status):  # noqa: N802
        return "operation not supported"


def _fake_cuda_host(monkeypatch, status: int = 0, pinned: bool = True) -> list:
    calls: list = []
    monkeypatch.setattr(torch.cuda, "cudart", lambda: _FakeCudart(calls, status))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(("synchronize", device)))
    monkeypatch.setattr(torch.Tensor, "is_pinned", lambda self, device=None: pinned)
    return calls


def test_registered_host_kv_pins_its_exact_bytes_for_exactly_its_lifetime(monkeypatch):
    """cudaHostRegister of the tensor's own bytes (no power-of-two block), undone after a device
    synchronisation once the last view of it is gone, never before."""
    import mmap

    from specontext.kv import host

    calls = _fake_cuda_host(monkeypatch)
    t, kind = host.allocate_host((3, 5, 7), torch.float16, pin=True, device="cuda:0")
    assert kind == "registered" and t.shape == (3, 5, 7) and t.dtype == torch.float16 and not bool(t.any())
    address = t.data_ptr()
    assert calls == [("register", address, 3 * 5 * 7 * 2, 0)] and address % mmap.PAGESIZE == 0
    view = t[1]
    del t
    gc.collect()
    assert len(calls) == 1  # a view still holds the memory
    view.fill_(1.0)
    del view
    gc.collect()
    assert calls[1:] == [("synchronize", torch.device("cuda:0")), ("unregister", address), ("still mapped", True)]


def test_a_refused_registration_falls_back_to_torch_pinned_memory(monkeypatch):
    from specontext.kv import host

    calls = _fake_cuda_host(monkeypatch, status=801)
    real_zeros = torch.zeros
    monkeypatch.setattr(host.torch, "zeros", lambda *a, pin_memory=False, **k: real_zeros(*a, **k))
    with pytest.warns(RuntimeWarning, match=r"could not register 3\.0 MiB .*\(cudaHostRegister failed: operation not "
                                            r"supported\); using torch's pinned allocator, which pins 4\.0 MiB"):
        t, kind = host.allocate_host((3, 2**20), torch.uint8, pin=True)
    assert kind == "pin_memory" and t.shape == (3, 2**20) and calls[0][0] == "register"
    # registered, but CUDA does not see it as pinned: unregistered again, then the same fallback
    calls = _fake_cuda_host(monkeypatch, status=0, pinned=False)
    with pytest.warns(RuntimeWarning, match="does not report the range as pinned"):
        t, kind = host.allocate_host((4, 4), torch.float32, pin=True)
    gc.collect()
    assert kind == "pin_memory" and calls[1:] == [("synchronize", torch.device("cuda")), ("unregister", calls[0][1]),
                                                  ("still mapped", True)]


def test_pinned_bytes_follow_how_the_host_kv_is_held():
    import mmap

    from specontext.kv.host import pinned_host_bytes

    GiB = 2**30
    assert pinned_host_bytes(17 * GiB, "pin_memory") == 32 * GiB  # torch's host allocator: a power of two
    assert pinned_host_bytes(17 * GiB, "registered") == 17 * GiB
    assert pinned_host_bytes(17 * GiB + 1, "registered") == 17 * GiB + mmap.PAGESIZE
    assert pinned_host_bytes(17 * GiB, "pageable") == 0 and pinned_host_bytes(0, "pin_memory") == 0
    cache = OffloadedKVCache(2, 1, 2, 4, 16, torch.float32, "cpu", offloaded=[False, True], pool_tokens=8)
    assert cache.host_memory == "pageable" and cache.host_pinned_bytes() == 0


def test_every_device_buffer_the_copy_engine_writes_is_shared_with_it(monkeypatch):
    """Slots (made at start and by the memory manager's move) and staging buffers are marked for
    the copy stream (CudaCopyEngine.share: record_stream), so freeing them early is safe."""
    from specontext.kv import offload

    shared = []
    monkeypatch.setattr(offload.ThreadCopyEngine, "share", lambda self, buf: shared.append(buf) or buf)
    cache = OffloadedKVCache(3, 1, 2, 4, 32, torch.float32, "cpu", offloaded=[False, True, True], pool_tokens=8,
                             offload_from_tokens=[0, 0, 8])
    assert [id(t) for t in shared] == [id(cache.layers[1].slots)] and not isinstance(cache.layers[2], HostLayer)
    cache.plan_step([10])  # layer 2 reaches the length it leaves the device at: it becomes a HostLayer
    staging = cache._staging()
    assert isinstance(cache.layers[2], HostLayer)
    assert {id(t) for t in shared} == {id(cache.layers[1].slots), id(cache.layers[2].slots), id(staging)}


class _FakeStream:
    def __init__(self, log: list, name: str):
        self.log, self.name = log, name

    def wait_stream(self, other):
        self.log.append((self.name, "waits for", other.name))

    def wait_event(self, event):
        self.log.append((self.name, "waits for event of", event.stream.name))


class _FakeEvent:
    def record(self, stream):
        self.stream = stream
        stream.log.append((stream.name, "records an event"))


class _Buffer:
    def __init__(self):
        self.streams = []

    def record_stream(self, stream):
        self.streams.append(stream)


def test_cuda_copy_engine_keeps_buffers_for_its_stream_and_orders_compute_after_a_failed_job(monkeypatch):
    """The choreography with fake streams: every tensor a copy uses is recorded on the copy
    stream, and a job that raises part-way still leaves an event compute waits on."""
    import contextlib

    from specontext.kv import offload

    log: list = []
    compute = _FakeStream(log, "compute")
    monkeypatch.setattr(torch.cuda, "Stream", lambda device: _FakeStream(log, "copy"))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: compute)
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    engine = offload.CudaCopyEngine(torch.device("cuda"))
    slots, src, dst = _Buffer(), _Buffer(), _Buffer()
    assert engine.share(slots) is slots and slots.streams == [engine.stream]

    def fails_after_queueing():
        log.append(("copy", "queues a copy"))
        raise RuntimeError("injected")
    with pytest.raises(RuntimeError, match="injected"):
        engine.submit(("fetch", 3), fails_after_queueing, keep=(src, dst))
    assert src.streams == dst.streams == [engine.stream]
    engine.wait(("fetch", 3))
    assert log == [("copy", "waits for", "compute"), ("copy", "queues a copy"), ("copy", "records an event"),
                   ("compute", "waits for event of", "copy")]


def test_a_cache_on_torch_pinned_memory_synchronises_before_its_memory_is_freed(monkeypatch):
    from specontext.kv import offload

    synced = []
    monkeypatch.setattr(offload, "allocate_host",
                        lambda shape, dtype, pin, device: (torch.zeros(shape, dtype=dtype), "pin_memory"))
    monkeypatch.setattr(offload, "_synchronize", synced.append)
    cache = OffloadedKVCache(2, 1, 2, 4, 16, torch.float32, "cpu", offloaded=[False, True], pool_tokens=8)
    assert cache.host_memory == "pin_memory" and synced == []
    del cache
    gc.collect()
    assert synced == [torch.device("cpu")]


def test_cli_prints_warnings_on_one_line(tiny, tmp_path, monkeypatch, capsys):
    from specontext import cli
    from specontext.kv import offload

    def no_pinning(shape, dtype, pin, device):
        import warnings
        warnings.warn("could not pin host memory (test)", RuntimeWarning)
        return torch.zeros(shape, dtype=dtype), "pageable"
    monkeypatch.setattr(offload, "allocate_host", no_pinning)
    code = cli.main(["--model", tiny["path"], "-q", "x", "--max-new-tokens", "3", "--ignore-eos", "--quiet",
                     "--device", "cpu", "--sparsity", "streaming", "--budget", "24", "--offload-layers", "1"])
    err = capsys.readouterr().err
    assert code == 0
    assert "specontext-run: warning: could not pin host memory (test)\n" in err
    assert "warnings.warn" not in err and "RuntimeWarning" not in err


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("pinned", [True, False])
@pytest.mark.parametrize("async_prefetch", [True, False])
@pytest.mark.parametrize("kv", ["auto", "int8"])
def test_cuda_offloaded_equals_device_resident_sparse(tiny, monkeypatch, pinned, async_prefetch, kv):
    """On a GPU: pinned host KV (kernel, copy stream) and the pageable fallback give the resident
    answer, with float KV and with 8-bit rows packed with their scales."""
    from specontext.kv import offload

    if not pinned:
        monkeypatch.setattr(offload, "allocate_host",
                            lambda shape, dtype, pin, device: (torch.zeros(shape, dtype=dtype), "pageable"))
    ids, L = tiny["ids"], tiny["num_layers"]
    common = dict(sparsity="specontext", budget_tokens=24, sink_tokens=2, window_tokens=4, kv_dtype=kv)
    resident = _load(tiny, device="cuda", **common)
    ref_logits, _ = resident.engine.teacher_forced(ids[:PREFIX], ids[PREFIX:])
    ref_tokens = resident.generate(ids[:PREFIX], max_new_tokens=24, ignore_eos=True).token_ids
    llm = _load(tiny, device="cuda", offload_layers=L - 1, slot_pool=1.25, async_prefetch=async_prefetch, **common)
    cache = llm.engine.new_cache(TOTAL)
    assert cache.host_pinned == pinned and cache.kv_host.is_pinned() == pinned
    assert cache.host_memory == ("registered" if pinned else "pageable")  # pinned bytes = logical bytes
    logits, _ = llm.engine.teacher_forced(ids[:PREFIX], ids[PREFIX:])
    assert torch.equal(logits, ref_logits)
    result = llm.generate(ids[:PREFIX], max_new_tokens=24, ignore_eos=True)
    assert result.token_ids == ref_tokens
    assert 0 < result.stats.offload["fetched_tokens"] < result.stats.offload["full_reload_tokens"]
    assert result.stats.offload["host_pinned"] == pinned


@cuda
@pytest.mark.cuda
def test_cuda_registered_host_kv_feeds_the_copy_kernel_and_is_unregistered_with_it():
    from specontext import native
    from specontext.kv.host import allocate_host

    host, kind = allocate_host((2, 64, 8), torch.float16, pin=True, device="cuda")
    assert kind == "registered" and host.is_pinned()
    host.copy_(torch.randn(2, 64, 8, generator=torch.Generator().manual_seed(0)).half())
    out = torch.zeros(2, 3, 8, dtype=torch.float16, device="cuda")
    native.copy_rows_planes(host, torch.tensor([5, 0, 63], device="cuda"), out, torch.tensor([1, 2, 0], device="cuda"))
    assert torch.equal(out.cpu()[:, [1, 2, 0]], host[:, [5, 0, 63]])
    address = host.data_ptr()
    del host
    gc.collect()
    cudart = torch.cuda.cudart()  # already unregistered: a second unregister is refused
    assert cudart.cudaHostUnregister(address) != cudart.cudaError.success
