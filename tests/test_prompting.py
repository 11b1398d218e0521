"""How a document and a question are framed (specontext/prompting.py), and that the CLI, the
batch file, the API and the needle benchmarks all use that one framing."""

from __future__ import annotations

import json
import os
import sys

import pytest

import specontext
from conftest import make_tiny_chat_model
from specontext.cli import main
from specontext.errors import InputError
from specontext.prompting import document_messages, document_text

FRANCE = ("France is a country in Europe.", "What is the capital of France?")


def test_document_and_question_are_labelled_parts_in_one_user_message():
    assert document_messages("  France is a country in Europe.\n\n", " What is the capital of France?\n") == [
        {"role": "user", "content": "Document:\nFrance is a country in Europe.\n\n"
                                    "Question: What is the capital of France?\n\nAnswer briefly."}]
    assert document_text(*FRANCE) == ("Document:\nFrance is a country in Europe.\n\n"
                                      "Question: What is the capital of France?\nAnswer:")


def test_a_part_given_alone_is_used_as_it_is():
    assert document_messages(None, "Name three colours.") == [{"role": "user", "content": "Name three colours."}]
    assert document_messages(" a prompt file\n", None) == [{"role": "user", "content": " a prompt file\n"}]
    assert document_messages("the document", "  ") == [{"role": "user", "content": "the document"}]
    assert document_text(None, "Name three colours.") == "Name three colours."
    assert document_text(" the the", None) == " the the"
    with pytest.raises(InputError, match="give a document, a question, or both"):
        document_messages(" \n", None)
    with pytest.raises(InputError, match="give a document, a question, or both"):
        document_text(None, "")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    paths = make_tiny_chat_model(tmp_path_factory.mktemp("framing"), max_position_embeddings=4096)
    return {"gguf": paths["gguf"], "llm": specontext.load(paths["gguf"], device="cpu")}


@pytest.mark.parametrize("chat", [True, False])
def test_cli_single_and_batch_requests_frame_as_the_api_does(tiny, tmp_path, capsys, chat):
    llm = tiny["llm"]
    doc = tmp_path / "doc.txt"
    doc.write_text("the the in a\n", encoding="utf-8")
    flags = ["--model", tiny["gguf"], "--json", "--quiet", "--max-new-tokens", "4", "--ignore-eos"]
    flags += [] if chat else ["--no-chat-template"]
    expected = llm.encode_document("the the in a\n", "in a", chat=chat)
    if chat:
        assert expected == llm.tokenizer.encode(llm.tokenizer.render_chat(document_messages("the the in a\n", "in a")),
                                                add_bos=False)
    else:
        assert expected == llm.tokenizer.encode(document_text("the the in a\n", "in a"))
    assert main([*flags, "--document", str(doc), "-q", "in a"]) == 0
    single = json.loads(capsys.readouterr().out)
    assert single["prompt_tokens"] == len(expected)
    assert single["answer"] == llm.ask("the the in a\n", "in a", chat=chat, max_new_tokens=4, ignore_eos=True).text
    requests = tmp_path / "requests.jsonl"
    requests.write_text(json.dumps({"id": "file", "document": str(doc), "question": "in a"}) + "\n"
                        + json.dumps({"id": "text", "text": "the the in a\n", "question": "in a"}) + "\n")
    assert main([*flags, "--batch", str(requests)]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [r["prompt_tokens"] for r in lines] == [len(expected)] * 2
    assert all(r["answer"] == single["answer"] for r in lines)


def test_needle_benchmark_prompts_are_framed_as_the_cli_frames_them(tiny):
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench_edge"))
    from haystack import TokenSource, needle_prompt_ids

    llm = tiny["llm"]
    source = TokenSource(llm.tokenizer, " ".join(["the in a"] * 200) + ". ")
    ids = needle_prompt_ids(llm, source, "a the in.", "in a the?", 300, 0.5)
    assert 290 <= len(ids) <= 300
    text = llm.tokenizer.decode(ids, skip_special=False)
    assert "Document:\n" in text and text.endswith("Question: in a the?\n\nAnswer briefly.<|im_end|>\n"
                                                   "<|im_start|>assistant\n")


@pytest.mark.slow
def test_default_model_answers_paris_about_a_one_line_document(default_llm, tmp_path):
    """Issue 13: the document and question joined by a blank line made the default model ramble in
    French; the measured framing makes it answer."""
    assert "Paris" in default_llm.ask(*FRANCE, max_new_tokens=24).text
    doc = tmp_path / "france.txt"
    doc.write_text(FRANCE[0] + "\n", encoding="utf-8")
    out = tmp_path / "answer.txt"
    assert main(["--document", str(doc), "--question", FRANCE[1], "--max-new-tokens", "24", "--output", str(out),
                 "--quiet", "--device", "cpu"]) == 0
    assert "Paris" in out.read_text(encoding="utf-8")
