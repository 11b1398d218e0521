"""Offloaded KV (kv/offload.py, kv/slots.py): elastic loading, the slot pool, and the same answers.

References: a plain-Python LRU slot pool; the device-resident cache (DenseKVCache) running the
same selection, which must give bit-identical logits and tokens.
"""

from __future__ import annotations

import random

import pytest
import torch

import specontext
from specontext.errors import InputError
from specontext.kv.offload import OffloadedKVCache
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
    assert [k is None for k in cache.k_device] == [layer >= L - 2 for layer in range(L)]
    assert cache.kv_host.device.type == "cpu" and cache.kv_host.shape[0] == 2
    llm.engine.prefill(tiny["ids"][:PREFIX], cache)
    cache.copier.drain()
    resident = _load(tiny)
    dense = resident.engine.new_cache(TOTAL)
    resident.engine.prefill(tiny["ids"][:PREFIX], dense)
    for i, layer in enumerate(cache.offloaded_layers):  # the host copy is the layer's KV
        assert torch.equal(cache.kv_host[i, 0, :, :, :PREFIX], dense.k_device[layer][:, :, :PREFIX])
        assert torch.equal(cache.kv_host[i, 1, :, :, :PREFIX], dense.v_device[layer][:, :, :PREFIX])
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
    original = resident.engine.new_selector

    def factory(*a, **k):
        selector = original(*a, **k)
        select = selector.select

        def wrapped(x, plan):
            sel = select(x, plan)
            record.append((sel, int(plan.positions[0, 0])))
            return sel
        selector.select = wrapped
        return selector
    resident.engine.new_selector = factory
    ref_logits, _ = resident.engine.teacher_forced(ids[:PREFIX], ids[PREFIX:])
    resident.engine.new_selector = original
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
    from specontext.kv import offload

    real_zeros = torch.zeros

    def no_pinning(*args, pin_memory=False, **kwargs):
        if pin_memory:
            raise RuntimeError("CUDA error: out of memory\nmore detail")
        return real_zeros(*args, **kwargs)
    monkeypatch.setattr(offload.torch, "zeros", no_pinning)
    with pytest.warns(RuntimeWarning, match=r"could not pin 0\.0 MiB .*\(CUDA error: out of memory\); using pageable"):
        t, pinned = offload.allocate_host((2, 3, 4), torch.float16, pin=True)
    assert not pinned and t.shape == (2, 3, 4) and t.dtype == torch.float16 and not bool(t.any())
    t, pinned = offload.allocate_host((5,), torch.float32, pin=False)  # no pinning asked: no warning
    assert not pinned and t.shape == (5,)


def test_cli_prints_warnings_on_one_line(tiny, tmp_path, monkeypatch, capsys):
    from specontext import cli
    from specontext.kv import offload

    def no_pinning(shape, dtype, pin):
        import warnings
        warnings.warn("could not pin host memory (test)", RuntimeWarning)
        return torch.zeros(shape, dtype=dtype), False
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
def test_cuda_offloaded_equals_device_resident_sparse(tiny, monkeypatch, pinned, async_prefetch):
    """On a GPU: pinned host KV (kernel, copy stream) and the pageable fallback give the resident answer."""
    from specontext.kv import offload

    if not pinned:
        monkeypatch.setattr(offload, "allocate_host",
                            lambda shape, dtype, pin: (torch.zeros(shape, dtype=dtype), False))
    ids, L = tiny["ids"], tiny["num_layers"]
    common = dict(sparsity="specontext", budget_tokens=24, sink_tokens=2, window_tokens=4)
    resident = _load(tiny, device="cuda", **common)
    ref_logits, _ = resident.engine.teacher_forced(ids[:PREFIX], ids[PREFIX:])
    ref_tokens = resident.generate(ids[:PREFIX], max_new_tokens=24, ignore_eos=True).token_ids
    llm = _load(tiny, device="cuda", offload_layers=L - 1, slot_pool=1.25, async_prefetch=async_prefetch, **common)
    cache = llm.engine.new_cache(TOTAL)
    assert cache.host_pinned == pinned and cache.kv_host.is_pinned() == pinned
    logits, _ = llm.engine.teacher_forced(ids[:PREFIX], ids[PREFIX:])
    assert torch.equal(logits, ref_logits)
    result = llm.generate(ids[:PREFIX], max_new_tokens=24, ignore_eos=True)
    assert result.token_ids == ref_tokens
    assert 0 < result.stats.offload["fetched_tokens"] < result.stats.offload["full_reload_tokens"]
    assert result.stats.offload["host_pinned"] == pinned
