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


def _counting_compile(monkeypatch) -> list:
    """torch.compile on a backend that only records each graph it is given (one per compile)."""
    graphs = []

    def counting_backend(gm, example_inputs, **kwargs):
        graphs.append(gm)
        return gm.forward
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, **{**kw, "backend": counting_backend}))
    torch._dynamo.reset()
    return graphs


def test_compiled_generations_of_nearby_lengths_share_one_graph(tiny, tmp_path, monkeypatch):
    """A compiled step is compiled for its cache's capacity, which a generation rounds up to whole
    buckets (within the context): generations of different lengths in one bucket compile once,
    and each still stops at its own length; a prefilled state keeps its exact capacity."""
    import specontext
    from specontext.engine import COMPILE_BUCKET_TOKENS

    from conftest import make_hf_model

    llm, ids = tiny["llm"], tiny["ids"]
    graphs = _counting_compile(monkeypatch)
    first = _greedy(llm, ids[:80], 12, compile_decode="on")
    assert len(_greedy(llm, ids[:60], 30, compile_decode="on")) == 30
    assert len(graphs) == 1
    assert first == _greedy(llm, ids[:80], 12)
    assert llm.engine.cache_capacity(92) == 92  # compile off
    make_hf_model("llama", str(tmp_path / "m300"), max_position_embeddings=COMPILE_BUCKET_TOKENS + 44)
    other = specontext.load(str(tmp_path / "m300"), device="cpu", compile_decode="on")
    assert [other.engine.cache_capacity(n) for n in (92, COMPILE_BUCKET_TOKENS, COMPILE_BUCKET_TOKENS + 1)] == \
        [COMPILE_BUCKET_TOKENS, COMPILE_BUCKET_TOKENS, COMPILE_BUCKET_TOKENS + 44]  # the last capped at the context
    llm.set_sparsity(compile_decode="on")
    try:
        state = llm.engine.prefill_state(ids[:40], 60)
        assert state.cache.capacity_tokens == 60
        gen = llm.engine.generate(ids[:40], specontext.GenerationConfig(max_new_tokens=100, ignore_eos=True),
                                  state=state)
        for _ in gen:
            pass
        assert len(gen.result().token_ids) == 20  # stops at the state's 60 tokens
    finally:
        llm.set_sparsity(compile_decode="off")


def test_compiled_steps_of_two_models_in_one_process_stay_apart(tmp_path, monkeypatch):
    """Dynamo keeps graphs per code object and the compiled step does not guard on the model's
    modules (engine.py, _compiled_decode): each engine's compile key keeps its graphs its own.
    Models of other structures (fp32, int8, int8 with int8 activations calibrated at load while
    compiling is on) compiled one after another in one process give their eager tokens."""
    import specontext

    from conftest import make_hf_model

    make_hf_model("llama", str(tmp_path / "a"), max_position_embeddings=256)
    make_hf_model("llama", str(tmp_path / "b"), seed=1, max_position_embeddings=256, num_hidden_layers=2)
    ids = torch.randint(3, 96, (40,), generator=torch.Generator().manual_seed(3)).tolist()
    graphs = _counting_compile(monkeypatch)
    loads = [("a", {}), ("b", {}), ("a", {"weights": "int8"}), ("a", {"weights": "int8", "activations": "int8"})]
    for name, opts in loads:
        llm = specontext.load(str(tmp_path / name), device="cpu", prefill_chunk_tokens=32, compile_decode="on", **opts)
        compiled = llm.generate(ids, chat=False, max_new_tokens=10, ignore_eos=True).token_ids
        llm.set_sparsity(compile_decode="off")
        assert compiled == llm.generate(ids, chat=False, max_new_tokens=10, ignore_eos=True).token_ids, (name, opts)
    assert len(graphs) == len(loads)


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
