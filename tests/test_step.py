"""The decode step: one function, planned on the host, with nothing read back from the device.

A read back (``.item()``, ``.tolist()``, ``bool(tensor)``, a copy to the CPU, ``nonzero``) makes
the host wait for the device on CUDA, which stalls the pipeline and rules out graph capture. On a
CPU-only machine the same calls are counted instead: each is a sync on CUDA.
"""

from __future__ import annotations

import contextlib
import os
import shutil

import pytest
import torch

from specontext.kv.plan import to_device
from specontext.retrieval.selection import SparsityOptions

from conftest import tiny_sparse_setup

READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "cpu", "numpy")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_sparse_setup(tmp_path_factory.mktemp("step"), 120)


@contextlib.contextmanager
def counting_device_reads():
    """Count every call that reads a tensor's value back to the host."""
    calls: list[str] = []
    originals = {name: getattr(torch.Tensor, name) for name in READS}

    def counted(name, fn):
        def call(self, *args, **kwargs):
            calls.append(name)
            return fn(self, *args, **kwargs)
        return call
    for name, fn in originals.items():
        setattr(torch.Tensor, name, counted(name, fn))
    try:
        yield calls
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)


def test_the_read_counter_sees_a_read():
    with counting_device_reads() as calls:
        torch.ones(2).sum().item()
    assert calls == ["item"]


@pytest.mark.parametrize("opts", [
    dict(method="dense"),
    dict(method="specontext", budget_tokens=40, sink_tokens=2, window_tokens=4, pin_fraction=0.0),
    dict(method="specontext", budget_tokens=30, sink_tokens=2, window_tokens=4, pin_fraction=0.25,
         focus_window_tokens=8),
    dict(method="specontext", budget_tokens=500, sink_tokens=2, window_tokens=4, pin_fraction=0.0),
    dict(method="streaming", budget_tokens=40, sink_tokens=2),
], ids=["dense", "specontext", "specontext-pinned", "specontext-fits", "streaming"])
@pytest.mark.parametrize("rows", [1, 2])
def test_a_decode_step_reads_nothing_back(tiny, opts, rows):
    llm, ids = tiny["llm"], tiny["ids"]
    llm.set_sparsity(sparsity="specontext", retrieval_head=tiny["head_path"])
    engine = llm.engine
    sparsity = SparsityOptions(**opts)
    cache = engine.new_cache(100, batch_size=rows)
    selector = engine.new_selector(100, batch_size=rows, sparsity=sparsity, cache=cache)
    engine.prefill_rows([ids[:80 - 3 * b] for b in range(rows)], cache, selector=selector)
    for step in range(3):
        x = to_device([[ids[80 + step]]] * rows, llm.model.device)
        with counting_device_reads() as calls:
            engine.step(x, [1] * rows, cache, selector, decode=True)
        assert calls == [], calls
    if opts["method"] == "specontext" and opts["budget_tokens"] < 80:
        assert selector.stats.sparse_steps == 3
    llm.set_sparsity(sparsity="dense")


def _greedy(llm, ids, n, **opts):
    llm.set_sparsity(**opts)
    try:
        return llm.generate(ids, chat=False, max_new_tokens=n, ignore_eos=True).token_ids
    finally:
        llm.set_sparsity(sparsity="dense", compile_decode="off")


@pytest.mark.parametrize("sparsity", ["dense", "specontext"])
def test_the_decode_step_compiles_as_one_graph(tiny, sparsity, monkeypatch):
    """fullgraph=True: a graph break anywhere in the decode step fails here. Traced with the eager
    backend (no code generation, seconds), which is where graph breaks are found."""
    llm, ids = tiny["llm"], tiny["ids"]
    opts = dict(sparsity=sparsity, retrieval_head=tiny["head_path"], budget_tokens=40, sink_tokens=2,
                window_tokens=4, pin_fraction=0.25, focus_window_tokens=8)
    eager = _greedy(llm, ids[:80], 12, **opts)
    real_compile = torch.compile
    calls = []

    def tracing_compile(fn, **kwargs):
        calls.append(kwargs)
        return real_compile(fn, **{**kwargs, "backend": "eager"})
    monkeypatch.setattr(torch, "compile", tracing_compile)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=False):
        compiled = _greedy(llm, ids[:80], 12, compile_decode="on", **opts)
    assert calls and calls[0]["fullgraph"] is True
    assert compiled == eager


def test_compiled_generations_of_nearby_lengths_share_one_graph(tiny, monkeypatch):
    """A compiled step is compiled for its cache's capacity, which new_cache rounds up to whole
    buckets: generations of different lengths in one bucket compile once."""
    from specontext.engine import COMPILE_BUCKET_TOKENS

    llm, ids = tiny["llm"], tiny["ids"]
    graphs = []

    def counting_backend(gm, example_inputs, **kwargs):
        graphs.append(gm)
        return gm.forward
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, **{**kw, "backend": counting_backend}))
    torch._dynamo.reset()
    first = _greedy(llm, ids[:80], 12, compile_decode="on")
    _greedy(llm, ids[:60], 30, compile_decode="on")
    assert len(graphs) == 1
    assert first == _greedy(llm, ids[:80], 12)
    llm.set_sparsity(compile_decode="on")
    try:
        assert llm.engine.new_cache(92).capacity_tokens == min(COMPILE_BUCKET_TOKENS, llm.engine.context_tokens)
    finally:
        llm.set_sparsity(compile_decode="off")
    assert llm.engine.new_cache(92).capacity_tokens == 92


@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None,
                    reason="inductor compiles C++ on a CPU; no C++ compiler here")
def test_compiled_decode_gives_the_eager_tokens(tiny):
    """The real compiler (inductor, C++ on a CPU): the same greedy tokens as eager."""
    llm, ids = tiny["llm"], tiny["ids"]
    opts = dict(sparsity="specontext", retrieval_head=tiny["head_path"], budget_tokens=40, sink_tokens=2,
                window_tokens=4, pin_fraction=0.0)
    eager = _greedy(llm, ids[:80], 10, **opts)
    torch._dynamo.reset()
    assert _greedy(llm, ids[:80], 10, compile_decode="on", **opts) == eager


def test_step_buffers_are_every_tensor_a_cache_layer_holds(tiny):
    """A CUDA-graph capture keeps ``step_buffers`` at fixed addresses: a layer tensor missing from
    them would make torch skip the capture ("mutated inputs")."""
    from specontext.kv.cache import DenseKVCache

    for kv_format in ("float", "int8"):
        cache = DenseKVCache(2, 1, 2, 8, 64, torch.float32, "cpu", kv_format=kv_format)
        plan = cache.plan_step([5])
        held = [t for layer in cache.layers for t in vars(layer).values() if isinstance(t, torch.Tensor)]
        assert {id(t) for t in cache.step_buffers(plan)} == {id(t) for t in held}, kv_format


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("sparsity", ["dense", "specontext"])
def test_cuda_graph_steps_are_captured_and_give_the_eager_tokens(tiny, sparsity):
    """--compile-decode cuda-graph: every decode step is replayed from a captured graph (torch
    declines none) and the greedy tokens equal eager's, over two generations (a new cache each:
    the graphs re-record; nothing recompiles)."""
    import specontext
    from torch._dynamo.utils import counters

    opts = dict(sparsity=sparsity, retrieval_head=tiny["head_path"], budget_tokens=40, sink_tokens=2,
                window_tokens=4, pin_fraction=0.0)
    llm = specontext.load(tiny["path"], device="cuda", dtype="float32", prefill_chunk_tokens=32)
    ids = tiny["ids"][:80]
    eager = _greedy(llm, ids, 10, **opts)
    torch._dynamo.reset()
    skips = counters["inductor"]["cudagraph_skips"]
    assert _greedy(llm, ids, 10, compile_decode="cuda-graph", **opts) == eager
    assert _greedy(llm, ids, 10, compile_decode="cuda-graph", **opts) == eager
    assert counters["inductor"]["cudagraph_skips"] == skips
