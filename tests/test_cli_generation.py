"""Generation behaviour (sampling, stopping, streaming) and the CLI's outputs, on a tiny model."""

from __future__ import annotations

import json
import signal
import subprocess
import time

import pytest
import torch

import specontext
from specontext.cli import main
from specontext.decoding import Sampler, StopMatcher
from specontext.settings import GenerationConfig

from conftest import cli_command, make_tiny_chat_model, signal_and_wait, start_long_answer


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    return make_tiny_chat_model(tmp_path_factory.mktemp("gen"), max_position_embeddings=200_000)["gguf"]


@pytest.fixture(scope="module")
def tiny_llm(tiny_gguf):
    return specontext.load(tiny_gguf, device="cpu")


def test_greedy_is_argmax_and_sampling_reproduces_with_seed():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    assert torch.equal(Sampler(GenerationConfig(), torch.device("cpu"))(logits), logits.argmax(-1))
    cfg = GenerationConfig(temperature=0.8, top_p=0.9, top_k=20, seed=7)
    a = [Sampler(cfg, torch.device("cpu"))(logits) for _ in range(2)]
    assert torch.equal(a[0], a[1])


def test_top_k_and_top_p_restrict_the_support():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    seen_k = {int(Sampler(GenerationConfig(temperature=5.0, top_k=2, seed=s), torch.device("cpu"))(logits))
              for s in range(60)}
    assert seen_k == {0, 1}
    # softmax: 0.636, 0.234, 0.086, ...; top_p 0.8 keeps the first two (0.636 < 0.8 <= 0.870)
    seen_p = {int(Sampler(GenerationConfig(temperature=1.0, top_p=0.8, seed=s), torch.device("cpu"))(logits))
              for s in range(200)}
    assert seen_p == {0, 1}


def test_stop_matcher_holds_back_partial_stop_strings():
    m = StopMatcher(("END",))
    assert m.feed("hello E") == ("hello ", False)
    assert m.feed("N") == ("", False)
    assert m.feed("Dless") == ("", True)
    assert m.text == "hello "
    m = StopMatcher(("END",))
    assert m.feed("hello E") == ("hello ", False)
    assert m.feed("Xtra") == ("EXtra", False)


def test_stream_equals_blocking_and_stop_string_truncates(tiny_llm):
    full = tiny_llm.generate("w", max_new_tokens=40, ignore_eos=True)
    streamed = "".join(tiny_llm.stream("w", max_new_tokens=40, ignore_eos=True))
    assert streamed == full.text and full.stop_reason == "length" and len(full.token_ids) == 40
    stop = full.text[len(full.text) // 2: len(full.text) // 2 + 3]
    assert stop
    cut = tiny_llm.generate("w", max_new_tokens=40, ignore_eos=True, stop=[stop])
    assert cut.stop_reason == "stop_string"
    assert cut.text == full.text[: full.text.index(stop)]


def test_eos_stops_generation(tiny_llm):
    ids = tiny_llm.generate("w", max_new_tokens=30, ignore_eos=True).token_ids
    eos_tok = ids[3]
    tiny_llm.tokenizer.eos_token_ids = (eos_tok,)
    try:
        res = tiny_llm.generate("w", max_new_tokens=30)
    finally:
        tiny_llm.tokenizer.eos_token_ids = (2,)
    assert res.stop_reason == "eos"
    assert res.token_ids == ids[: ids.index(eos_tok)]


def test_cli_output_file_and_json(capsys, tmp_path, tiny_gguf):
    doc = tmp_path / "doc.txt"
    doc.write_text("the the the")
    out = tmp_path / "answer.txt"
    code = main(["--model", tiny_gguf, "--document", str(doc), "-q", "in a", "--max-new-tokens", "12",
                 "--ignore-eos", "--output", str(out), "--json", "--quiet", "--device", "cpu"])
    assert code == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["answer"] == out.read_text(encoding="utf-8")
    assert payload["generated_tokens"] == 12 and payload["stop_reason"] == "length"
    assert payload["prompt_tokens"] > 0 and payload["decode_tokens_per_s"] > 0 and payload["prefill_tokens_per_s"] > 0
    assert payload["peak_host_rss_bytes"] > 0 and payload["kv_cache_bytes"] > 0


def test_cli_reads_document_from_stdin(tiny_gguf, tmp_path):
    cmd = cli_command()
    proc = subprocess.run([*cmd, "--model", tiny_gguf, "--document", "-", "-q", "the", "--max-new-tokens", "5",
                           "--ignore-eos", "--json", "--quiet", "--device", "cpu"],
                          input="on the er in", capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["generated_tokens"] == 5


def test_ctrl_c_keeps_the_partial_answer(tiny_gguf, tmp_path):
    """SIGINT mid-generation: exit 130, a one-line notice, and the output file keeps what was generated."""
    out = tmp_path / "partial.txt"
    proc, stdout_file = start_long_answer(tiny_gguf, tmp_path, out)
    stderr = signal_and_wait(proc, stdout_file, signal.SIGINT)
    stdout = (tmp_path / "stdout.txt").read_text(encoding="utf-8")
    assert proc.returncode == 130
    assert "Traceback" not in stderr and "interrupted after" in stderr
    kept = out.read_text(encoding="utf-8")
    assert len(kept) >= 20 and stdout.startswith(kept[:20])


def test_ctrl_c_in_a_batch_keeps_every_request(tiny_gguf, tmp_path):
    """SIGINT while a batch decodes: the finished request's line and the unfinished one's text so far."""
    requests = tmp_path / "requests.jsonl"
    requests.write_text('{"id": "short", "question": "the", "max_new_tokens": 3}\n'
                        '{"id": "long", "question": "in a", "max_new_tokens": 150000}\n')
    out = tmp_path / "results.jsonl"
    cmd = cli_command()
    stdout_file = open(tmp_path / "stdout.txt", "w+", encoding="utf-8")
    proc = subprocess.Popen([*cmd, "--model", tiny_gguf, "--batch", str(requests), "--ignore-eos", "--json",
                             "--output", str(out), "--quiet", "--device", "cpu"],
                            stdout=stdout_file, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    partial = tmp_path / "results.jsonl.partial"
    deadline = time.time() + 240
    while time.time() < deadline and (not partial.exists() or not partial.read_text().strip()):
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    time.sleep(1.0)  # the long request generates some more
    assert proc.poll() is None, proc.stderr.read()
    stderr = signal_and_wait(proc, stdout_file, signal.SIGINT)
    assert proc.returncode == 130 and "Traceback" not in stderr and "interrupted" in stderr
    lines = {r["id"]: r for r in map(json.loads, out.read_text(encoding="utf-8").splitlines())}
    assert lines["short"]["stop_reason"] == "length" and lines["short"]["generated_tokens"] == 3
    assert lines["long"]["stop_reason"] == "interrupted" and lines["long"]["generated_tokens"] > 3
