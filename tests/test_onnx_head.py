"""The retrieval head on ONNX Runtime against the torch head (the independent reference here).

* The exported step graph's keys, queries and group scores equal the torch head's (float32).
* In the engine, the ONNX Runtime backend selects the same tokens as torch: recall of the torch
  set >= 0.99 per step, on a tiny random head and on the shipped default head.
* A file made for another model or another opset, or not a head export at all, is refused in one
  line; a missing onnxruntime names the extra to install.
"""

from __future__ import annotations

import json

import pytest
import torch

import specontext
from specontext.errors import InputError, ModelFileError

from conftest import make_hf_model, make_random_head, recording_selections

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from specontext.retrieval import onnx_head  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("onnx")
    make_hf_model("llama", str(root / "m"), max_position_embeddings=256)
    llm = specontext.load(str(root / "m"), device="cpu", prefill_chunk_tokens=32)
    head = make_random_head(llm.target, str(root / "head" / "tiny"))
    onnx_path = onnx_head.export_onnx(head, str(root / "tiny.onnx"))
    ids = torch.randint(3, 96, (140,), generator=torch.Generator().manual_seed(4)).tolist()
    return {"llm": llm, "head": head, "head_path": str(root / "head" / "tiny"), "onnx": onnx_path, "ids": ids,
            "root": root}


def test_exported_step_equals_the_torch_head(tiny):
    head = tiny["head"]
    runner = onnx_head.OnnxHeadRunner.load(tiny["onnx"], tiny["llm"].target)
    g = torch.Generator().manual_seed(1)
    for B, T, S in ((1, 1, 50), (3, 1, 17), (2, 7, 33)):
        embeds = torch.randn(B, T, 48, generator=g)
        hidden = torch.randn(B, T, 96, generator=g)
        positions = torch.randint(0, 200, (B, T), generator=g)
        keys = torch.randn(B, 2, S, 8, generator=g)
        valid = torch.rand(B, S, generator=g) < 0.8
        k, q, scores = runner(embeds, hidden, positions, keys, valid)
        with torch.no_grad():
            q_ref, k_ref = head.project(head.inputs(embeds, hidden), positions)
            scores_ref = head.group_probs(q_ref[:, :, -1:], keys, valid[:, None])[:, :, 0]
        assert torch.allclose(k, k_ref, atol=1e-5) and torch.allclose(q, q_ref, atol=1e-5)
        assert torch.allclose(scores, scores_ref, atol=1e-6)


def test_float16_keys_graph_computes_what_the_float32_graph_does_on_the_same_keys(tiny):
    """The CUDA default: ``keys`` in and ``new_keys`` out as float16, everything between as exported."""
    runner32 = onnx_head.OnnxHeadRunner.load(tiny["onnx"], tiny["llm"].target)
    runner16 = onnx_head.OnnxHeadRunner.load(tiny["onnx"], tiny["llm"].target, keys_dtype=torch.float16)
    assert (runner32.keys_dtype, runner16.keys_dtype) == (torch.float32, torch.float16)
    types = {i.name: i.type for i in runner16.session.get_inputs() + runner16.session.get_outputs()}
    assert types["keys"] == types["new_keys"] == "tensor(float16)" and types["scores"] == "tensor(float)"
    g = torch.Generator().manual_seed(2)
    B, T, S = 2, 3, 29
    embeds, hidden = torch.randn(B, T, 48, generator=g), torch.randn(B, T, 96, generator=g)
    positions = torch.randint(0, 200, (B, T), generator=g)
    keys = torch.randn(B, 2, S, 8, generator=g).half()
    valid = torch.rand(B, S, generator=g) < 0.8
    k16, q16, scores16 = runner16(embeds, hidden, positions, keys, valid)
    k32, q32, scores32 = runner32(embeds, hidden, positions, keys.float(), valid)
    assert k16.dtype == torch.float16 and torch.equal(k16, k32.half())
    assert torch.allclose(q16, q32, atol=1e-6) and torch.allclose(scores16, scores32, atol=1e-7)
    with pytest.raises(InputError, match="float32 or float16 keys, not torch.bfloat16"):
        onnx_head.OnnxHeadRunner.load(tiny["onnx"], tiny["llm"].target, keys_dtype=torch.bfloat16)


def _selections(llm, prompt, steps):
    """Each decode step's selection (past indices, or None for a dense step) and the result."""
    record, restore = recording_selections(llm)
    try:
        result = llm.generate(prompt, chat=False, max_new_tokens=steps, ignore_eos=True)
    finally:
        restore()
    return [None if sel is None else sel[..., :-1] for sel in record], result


def _recall(ours, reference) -> float:
    """Mean over steps and KV heads of |ours ∩ reference| / |reference|."""
    values = []
    for a, b in zip(ours, reference):
        assert (a is None) == (b is None)
        if a is None:
            continue
        for g in range(b.shape[1]):
            ref = set(b[0, g].tolist())
            values.append(len(ref & set(a[0, g].tolist())) / len(ref))
    assert values, "no sparse step ran"
    return sum(values) / len(values)


def test_engine_selection_matches_torch_on_a_tiny_head(tiny):
    llm = tiny["llm"]
    common = dict(sparsity="specontext", budget_tokens=40, sink_tokens=2, window_tokens=6)
    llm.set_sparsity(retrieval_head=tiny["head_path"], retrieval_backend="torch", **common)
    ref, ref_result = _selections(llm, tiny["ids"][:100], 30)
    for spec in (tiny["head_path"], tiny["onnx"]):  # exported on the fly, or the exported file
        llm.set_sparsity(retrieval_head=spec, retrieval_backend="onnxruntime", **common)
        assert isinstance(llm.retrieval_head, onnx_head.OnnxHeadRunner)
        got, result = _selections(llm, tiny["ids"][:100], 30)
        assert _recall(got, ref) >= 0.99
        assert result.token_ids == ref_result.token_ids
    # batched requests of different lengths on ONNX Runtime equal each request alone on torch
    prompts = [tiny["ids"][:100], tiny["ids"][20:71]]
    batch = llm.generate_batch(prompts, chat=False, max_new_tokens=20, ignore_eos=True)
    llm.set_sparsity(retrieval_head=tiny["head_path"], retrieval_backend="torch")
    for p, r in zip(prompts, batch):
        assert r.token_ids == llm.generate(p, chat=False, max_new_tokens=20, ignore_eos=True).token_ids
    llm.set_sparsity(sparsity="dense", retrieval_backend="torch")


def test_a_float16_k_cache_on_onnx_runtime_selects_what_torch_selects(tiny):
    """The selector keeps the head's K cache in the runner's keys dtype (float16, as on CUDA)."""
    llm = tiny["llm"]
    common = dict(sparsity="specontext", budget_tokens=40, sink_tokens=2, window_tokens=6)
    llm.set_sparsity(retrieval_head=tiny["head_path"], retrieval_backend="torch", **common)
    ref, _ = _selections(llm, tiny["ids"][:100], 30)
    llm.set_sparsity(retrieval_head=tiny["onnx"], retrieval_backend="onnxruntime", **common)
    llm.engine.retrieval_head = onnx_head.OnnxHeadRunner.load(tiny["onnx"], llm.target, keys_dtype=torch.float16)
    try:
        selector = llm.engine.new_selector(128)
        assert selector.k_device.dtype == torch.float16 and selector.carry_hidden.dtype == torch.float32
        got, _ = _selections(llm, tiny["ids"][:100], 30)
    finally:
        llm.set_sparsity(sparsity="dense", retrieval_backend="torch")
    assert _recall(got, ref) >= 0.99


class _FakeStream:
    def __init__(self, log: list, name: str):
        self.log, self.name = log, name

    def wait_stream(self, other):
        self.log.append((self.name, "waits for", other.name))

    def synchronize(self):
        self.log.append(("host", "waits for", self.name))


class _FakeSession:
    def __init__(self, log: list, fail: bool = False):
        self.log, self.fail = log, fail

    def get_providers(self):
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]

    def run_with_iobinding(self, binding, run_options=None):
        synced = None if run_options is None else run_options.get_run_config_entry(
            "disable_synchronize_execution_providers")
        self.log.append(("ort", "runs", "unsynchronised" if synced == "1" else "synchronised"))
        if self.fail:
            raise RuntimeError("injected")


@pytest.mark.parametrize("fail", [False, True])
def test_the_cuda_run_is_ordered_by_streams_not_by_the_host(tiny, monkeypatch, fail):
    """With ONNX Runtime on a stream of ours: its stream waits for compute, the run does not
    synchronise, compute waits for its stream (also when the run fails); without one, the host
    waits for compute as before."""
    log: list = []
    compute = _FakeStream(log, "compute")
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: compute)
    cfg = tiny["head"].config
    runner = onnx_head.OnnxHeadRunner(_FakeSession(log, fail), cfg, "x.onnx", torch.device("cuda", 0),
                                      torch.float16, stream=_FakeStream(log, "ort"))
    if fail:
        with pytest.raises(RuntimeError, match="injected"):
            runner._run(binding=None)
    else:
        runner._run(binding=None)
    assert log == [("ort", "waits for", "compute"), ("ort", "runs", "unsynchronised"), ("compute", "waits for", "ort")]
    log.clear()
    runner = onnx_head.OnnxHeadRunner(_FakeSession(log), cfg, "x.onnx", torch.device("cuda", 0))
    runner._run(binding=None)
    assert log == [("host", "waits for", "compute"), ("ort", "runs", "synchronised")]


@pytest.mark.slow
def test_shipped_head_selects_the_same_tokens_on_onnx_runtime(default_llm):
    from specontext import assets

    llm = default_llm
    ids = llm.tokenizer.encode(assets.essay_text()[:12000], add_bos=False)[:1500]
    llm.set_sparsity(sparsity="specontext", budget_tokens=512, retrieval_head="auto", retrieval_backend="torch")
    ref, _ = _selections(llm, ids, 24)
    llm.set_sparsity(retrieval_backend="onnxruntime")
    got, _ = _selections(llm, ids, 24)
    llm.set_sparsity(sparsity="dense", retrieval_backend="torch")
    assert _recall(got, ref) >= 0.99


def test_a_file_for_another_model_or_opset_is_refused(tiny, tmp_path, capsys):
    import onnx

    from specontext.cli import main

    other = make_hf_model("llama", str(tmp_path / "other"), seed=5, max_position_embeddings=256)
    del other
    other_llm = specontext.load(str(tmp_path / "other"), device="cpu")
    with pytest.raises(InputError, match="was made for m .*not the loaded model"):
        onnx_head.OnnxHeadRunner.load(tiny["onnx"], other_llm.target)
    model = onnx.load(tiny["onnx"])
    model.opset_import[0].version = onnx_head.OPSET - 1
    onnx.save(model, str(tmp_path / "old.onnx"))
    with pytest.raises(ModelFileError, match=f"exported for ONNX opset {onnx_head.OPSET - 1}"):
        onnx_head.read_onnx_metadata(str(tmp_path / "old.onnx"))
    del model.metadata_props[:]
    onnx.save(model, str(tmp_path / "plain.onnx"))
    with pytest.raises(ModelFileError, match="not a specontext retrieval head export"):
        onnx_head.read_onnx_metadata(str(tmp_path / "plain.onnx"))
    # through the CLI: one line, non-zero exit
    capsys.readouterr()  # transformers' progress while writing the other model
    code = main(["--model", str(tmp_path / "other"), "--sparsity", "specontext", "--retrieval-backend", "onnxruntime",
                 "--retrieval-head", tiny["onnx"], "-q", "w3 w4"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and "was made for" in err and len(err.splitlines()) == 1
    code = main(["--model", str(tiny["root"] / "m"), "--sparsity", "specontext", "--retrieval-head", tiny["onnx"],
                 "-q", "w3 w4"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and "--retrieval-backend onnxruntime" in err


def test_missing_onnxruntime_names_the_extra(tiny, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_ort(name, *args, **kwargs):
        if name == "onnxruntime":
            raise ImportError("No module named 'onnxruntime'")
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_ort)
    with pytest.raises(InputError, match=r"pip install 'specontext\[onnx\]'"):
        onnx_head.OnnxHeadRunner.load(tiny["onnx"], tiny["llm"].target)


def test_cli_exports_and_runs_the_onnx_head(tiny, tmp_path, capsys):
    from specontext.cli import main

    out = tmp_path / "exported.onnx"
    model = str(tiny["root"] / "m")
    assert main(["--model", model, "--retrieval-head", tiny["head_path"], "--export-head-onnx", str(out)]) == 0
    assert "exported" in capsys.readouterr().out and out.exists()
    cfg, opset = onnx_head.read_onnx_metadata(str(out))
    assert cfg.target == tiny["llm"].target and opset == onnx_head.OPSET
    assert main(["--model", model, "--sparsity", "specontext", "--budget", "40", "--sink-tokens", "2",
                 "--window-tokens", "6", "--retrieval-backend", "onnxruntime", "--retrieval-head", str(out),
                 "--no-chat-template", "-q", " ".join(f"w{i % 90 + 3}" for i in range(90)), "--max-new-tokens", "12",
                 "--ignore-eos", "--json", "--quiet"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["sparsity"]["sparse_steps"] > 0 and payload["sparsity"]["retrieval_head"] == str(out)
    assert main(["--model", model, "--export-head-onnx", str(tmp_path / "x.txt")]) == 1
    assert "ending in .onnx" in capsys.readouterr().err


def _ort_cuda() -> bool:
    import onnxruntime

    return torch.cuda.is_available() and "CUDAExecutionProvider" in onnxruntime.get_available_providers()


@pytest.mark.cuda
@pytest.mark.skipif(not _ort_cuda(), reason="needs a CUDA GPU and onnxruntime-gpu")
def test_cuda_runner_reads_float16_keys_in_place_on_its_own_stream(tiny):
    runner = onnx_head.OnnxHeadRunner.load(tiny["onnx"], tiny["llm"].target, device="cuda")
    reference = onnx_head.OnnxHeadRunner.load(tiny["onnx"], tiny["llm"].target)
    assert runner.keys_dtype == torch.float16
    assert runner.stream is not None, "this onnxruntime ignored user_compute_stream (it needs >= 1.17)"
    g = torch.Generator().manual_seed(3)
    B, T, S = 2, 1, 300
    cpu = (torch.randn(B, T, 48, generator=g), torch.randn(B, T, 96, generator=g),
           torch.randint(0, 400, (B, T), generator=g), torch.randn(B, 2, S, 8, generator=g).half(),
           torch.rand(B, S, generator=g) < 0.8)
    k_ref, q_ref, scores_ref = reference(*cpu[:3], cpu[3].float(), cpu[4])
    embeds, hidden, positions, keys, valid = (t.cuda() for t in cpu)
    for _ in range(3):  # compute-stream work queued right before and after each run
        keys.mul_(1.0)
        k, q, scores = runner(embeds, hidden, positions, keys, valid)
        scores = scores + 0.0
    assert k.dtype == torch.float16 and torch.allclose(k.float().cpu(), k_ref.float(), atol=2e-3)
    assert torch.allclose(q.cpu(), q_ref, atol=1e-3) and torch.allclose(scores.cpu(), scores_ref, atol=1e-3)
