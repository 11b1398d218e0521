"""Batched generation: every request's output equals running it alone with the same settings.

Requests of different prompt lengths, lengths to generate, sampling seeds and stop conditions
decode together in one cache; each keeps its own selection (per batch row), so its tokens and its
sparse/dense/fallback step counts must equal a run of that request alone, for every sparsity
method, with the KV resident or offloaded.
"""

from __future__ import annotations

import json

import pytest
import torch

import specontext
from specontext.errors import ContextLengthError, InputError
from specontext.settings import GenerationConfig

from conftest import make_hf_model, make_random_head

LENGTHS = (70, 41, 93)  # prompt tokens per request
NEW = (24, 40, 9)  # tokens each request generates


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("batch")
    make_hf_model("llama", str(root / "m"), max_position_embeddings=256)
    llm = specontext.load(str(root / "m"), device="cpu", prefill_chunk_tokens=32)
    make_random_head(llm.target, str(root / "head" / "tiny"))
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 96, (n,), generator=g).tolist() for n in LENGTHS]
    return {"llm": llm, "head": str(root / "head" / "tiny"), "prompts": prompts, "root": root}


def _alone_and_batched(llm, prompts, gens):
    alone = []
    for ids, gen in zip(prompts, gens):
        g = llm.engine.generate(ids, gen)
        for _ in g:
            pass
        alone.append(g.result())
    batch = llm.engine.generate_batch(prompts, gens)
    pieces = [""] * len(prompts)
    for i, piece in batch:
        pieces[i] += piece
    results = batch.results()
    assert [r.text for r in results] == pieces  # streamed pieces add up to each result
    return alone, results, batch


def _steps(result):
    return {k: result.stats.sparsity.get(k) for k in ("sparse_steps", "dense_steps", "fallback_steps")}


@pytest.mark.parametrize("method", ["dense", "specontext", "oracle", "quest", "streaming", "snapkv"])
def test_each_request_equals_running_it_alone(tiny, method):
    llm = tiny["llm"]
    llm.set_sparsity(sparsity=method, budget_tokens=40, sink_tokens=2, window_tokens=6, retrieval_head=tiny["head"])
    gens = [GenerationConfig(max_new_tokens=n, ignore_eos=True) for n in NEW]
    alone, batched, batch = _alone_and_batched(llm, tiny["prompts"], gens)
    for a, b in zip(alone, batched):
        assert b.token_ids == a.token_ids and b.stop_reason == a.stop_reason == "length"
        if method != "dense":
            assert _steps(b) == _steps(a)
    if method != "dense":
        assert sum(r.stats.sparsity["sparse_steps"] for r in batched) > 0  # the budget is exceeded
    assert batch.stats.generated_tokens == sum(NEW)
    assert batch.stats.decode_steps == max(NEW) - 1


@pytest.mark.parametrize("method", ["specontext", "streaming"])
def test_offloaded_batch_equals_resident_requests_alone(tiny, method):
    llm = tiny["llm"]
    llm.set_sparsity(sparsity=method, budget_tokens=40, sink_tokens=2, window_tokens=6, retrieval_head=tiny["head"])
    gens = [GenerationConfig(max_new_tokens=n, ignore_eos=True) for n in NEW]
    alone = [llm.generate(ids, chat=False, max_new_tokens=n, ignore_eos=True) for ids, n in zip(tiny["prompts"], NEW)]
    off = specontext.load(str(tiny["root"] / "m"), device="cpu", prefill_chunk_tokens=32, offload_layers=2,
                          slot_pool=1.25, sparsity=method, budget_tokens=40, sink_tokens=2, window_tokens=6,
                          retrieval_head=tiny["head"])
    batch = off.engine.generate_batch(tiny["prompts"], gens)
    for _ in batch:
        pass
    for a, b in zip(alone, batch.results()):
        assert b.token_ids == a.token_ids
        assert b.stats.offload["fetched_tokens"] > 0


def test_sampling_stops_and_eos_are_per_request(tiny):
    llm = tiny["llm"]
    llm.set_sparsity(sparsity="specontext", budget_tokens=40, sink_tokens=2, window_tokens=6,
                     retrieval_head=tiny["head"])
    probe = llm.generate(tiny["prompts"][0], chat=False, max_new_tokens=12, ignore_eos=True)
    stop_word = llm.tokenizer.decode(probe.token_ids[5:6]).strip()
    gens = [GenerationConfig(max_new_tokens=12, stop=(stop_word,)),
            GenerationConfig(max_new_tokens=30, temperature=0.9, top_p=0.9, seed=7, ignore_eos=True),
            GenerationConfig(max_new_tokens=30, temperature=1.2, top_k=20, seed=3, ignore_eos=True)]
    alone, batched, _ = _alone_and_batched(llm, tiny["prompts"], gens)
    assert batched[0].stop_reason == "stop_string"
    for a, b in zip(alone, batched):
        assert (b.text, b.token_ids, b.stop_reason) == (a.text, a.token_ids, a.stop_reason)
    assert batched[1].token_ids != batched[2].token_ids


def test_per_row_fallback_equals_alone(tiny):
    """A confidence threshold under which some requests fall back and others do not."""
    llm = tiny["llm"]
    llm.set_sparsity(sparsity="specontext", budget_tokens=40, sink_tokens=2, window_tokens=6,
                     retrieval_head=tiny["head"], fallback_threshold=0.0)
    confidences = []
    for ids in tiny["prompts"]:
        llm.set_sparsity(fallback_threshold=1e-9)
        r = llm.generate(ids, chat=False, max_new_tokens=30, ignore_eos=True)
        confidences.append(r.stats.sparsity["mean_head_confidence"])
    # between the least and the most confident request's mean: some steps fall back, some do not
    llm.set_sparsity(fallback_threshold=sorted(confidences)[1])
    gens = [GenerationConfig(max_new_tokens=30, ignore_eos=True)] * 3
    alone, batched, _ = _alone_and_batched(llm, tiny["prompts"], gens)
    for a, b in zip(alone, batched):
        assert b.token_ids == a.token_ids and _steps(b) == _steps(a)
    fallbacks = [r.stats.sparsity["fallback_steps"] for r in batched]
    sparse = [r.stats.sparsity["sparse_steps"] for r in batched]
    assert sum(fallbacks) > 0 and sum(sparse) > 0
    llm.set_sparsity(fallback_threshold=0.0)


def test_api_takes_a_list_of_prompts(tiny):
    llm = tiny["llm"]
    llm.set_sparsity(sparsity="streaming", budget_tokens=40, sink_tokens=2)
    texts = [" ".join(f"w{i % 90 + 3}" for i in range(n)) for n in (60, 45)]
    results = llm.generate_batch(texts, chat=False, max_new_tokens=8, ignore_eos=True,
                                 per_request=[{}, {"max_new_tokens": 3}])
    assert [len(r.token_ids) for r in results] == [8, 3]
    assert results[0].token_ids == llm.generate(texts[0], chat=False, max_new_tokens=8, ignore_eos=True).token_ids
    with pytest.raises(InputError, match="non-empty list"):
        llm.generate_batch("one string", max_new_tokens=2)
    with pytest.raises(InputError, match="per_request has 1 entries for 2 prompts"):
        llm.generate_batch(texts, per_request=[{}])
    with pytest.raises(ContextLengthError, match="request 1"):
        llm.generate_batch([texts[0], list(range(3, 96)) * 3], chat=False, max_new_tokens=2)


def test_interrupting_a_batch_keeps_every_request_so_far(tiny):
    llm = tiny["llm"]
    llm.set_sparsity(sparsity="dense")
    batch = llm.engine.generate_batch(tiny["prompts"], [GenerationConfig(max_new_tokens=20, ignore_eos=True)] * 3)
    seen = 0
    for _ in batch:
        seen += 1
        if seen == 7:
            batch.interrupt()
            break
    results = batch.results()
    assert all(r.stop_reason == "interrupted" for r in results)
    assert sum(len(r.token_ids) for r in results) >= 6


def test_cli_batch_file_and_repeated_documents(tiny, tmp_path, capsys):
    from specontext.cli import main

    words = [" ".join(f"w{(i * k) % 90 + 3}" for i in range(n)) for k, n in ((1, 50), (7, 30))]
    docs = []
    for k, text in enumerate(words):
        path = tmp_path / f"doc{k}.txt"
        path.write_text(text)
        docs.append(str(path))
    common = ["--model", str(tiny["root"] / "m"), "--no-chat-template", "--quiet", "--ignore-eos", "--json",
              "--sparsity", "streaming", "--budget", "40", "--sink-tokens", "2"]
    requests = tmp_path / "requests.jsonl"
    requests.write_text("\n".join([
        '{"id": "a", "document": "%s", "max_new_tokens": 6}' % docs[0],
        '',
        '{"id": "b", "text": "%s", "question": "w5 w6", "seed": 3, "temperature": 0.8}' % words[1],
        '{"prompt": "w7 w8 w9", "max_new_tokens": 2}']) + "\n")
    out = tmp_path / "results.jsonl"
    assert main([*common, "--batch", str(requests), "--max-new-tokens", "10", "--output", str(out)]) == 0
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    printed = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert sorted(r["index"] for r in lines) == [0, 1, 2] and printed == lines
    by_id = {r["id"]: r for r in lines}
    assert by_id["a"]["generated_tokens"] == 6 and by_id["b"]["generated_tokens"] == 10
    assert by_id[2]["generated_tokens"] == 2
    llm = specontext.load(str(tiny["root"] / "m"), device="cpu", sparsity="streaming", budget_tokens=40, sink_tokens=2)
    alone = llm.ask(words[1], "w5 w6", chat=False, max_new_tokens=10, ignore_eos=True, seed=3, temperature=0.8)
    assert by_id["b"]["answer"] == alone.text
    # the same question about two documents: two requests
    assert main([*common, "-d", docs[0], "-d", docs[1], "-q", "w4", "--max-new-tokens", "3"]) == 0
    printed = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert sorted(r["id"] for r in printed) == sorted(docs)


@pytest.mark.parametrize("line, needle", [
    ("{not json", "line 1 is not valid JSON"),
    ('["a"]', "line 1 must be a JSON object"),
    ('{"question": "w3", "colour": 1}', "unknown field 'colour'"),
    ('{"prompt": "w3", "question": "w4"}', 'give "prompt" alone'),
    ('{"id": 1}', 'needs "question"'),
    ('{"question": "w3", "max_new_tokens": 0}', "max_new_tokens must be >= 1"),
    ('{"document": "/nonexistent/x.txt"}', "document not found"),
])
def test_cli_batch_bad_input_is_one_line(tiny, tmp_path, capsys, line, needle):
    from specontext.cli import main

    requests = tmp_path / "r.jsonl"
    requests.write_text(line + "\n")
    out = tmp_path / "out.jsonl"
    assert main(["--model", str(tiny["root"] / "m"), "--batch", str(requests), "--output", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not out.exists() and not (tmp_path / "out.jsonl.partial").exists()
