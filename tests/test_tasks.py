"""Retrieval task generators: deterministic, answers where they should be, no benchmark needle."""

from __future__ import annotations

import itertools
import json
import os
import random
import re
import sys

import pytest

from specontext.retrieval import tasks

HAYSTACK = " ".join(f"Sentence number {i} talks about nothing in particular, at some length." +
                    ("\n\n" if i % 7 == 6 else "") for i in range(300))


def _needles_module():
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "bench_edge"))
    import needles

    return needles


@pytest.mark.parametrize("kind", list(tasks.KINDS))
def test_each_generator_is_deterministic_for_a_seed(kind):
    gen = tasks.KINDS[kind]
    examples = [gen(random.Random(seed), HAYSTACK) for seed in range(12)]
    assert examples == [gen(random.Random(seed), HAYSTACK) for seed in range(12)]
    assert all(e.kind == kind for e in examples)
    assert len({(e.question, e.answer) for e in examples}) >= 10  # seeds give different instances
    for e in examples:  # the document keeps about the haystack's length (distill sizes prompts by it)
        assert 0.8 * len(HAYSTACK) <= len(e.document) <= 1.05 * len(HAYSTACK)


def _proper_nouns(question: str) -> list[str]:
    return [w for w in re.findall(r"[A-Z][a-z]+", question)[1:] if w not in ("I",)]


def test_needle_answer_is_in_the_fact_about_the_questions_subject():
    for seed in range(60):
        e = tasks.needle(random.Random(seed), HAYSTACK)
        assert all(fact in e.document for fact in e.inserts)
        holding = [f for f in e.inserts if e.answer in f and all(w in f for w in _proper_nouns(e.question))]
        assert holding, (e.question, e.answer, e.inserts)


def _parse_kv(block: str) -> dict[str, str]:
    lines = block.strip().split("\n")
    if len(lines) > 1 and lines[0].endswith((".", ":")):  # an embedded block's intro sentence
        lines = lines[1:]
    body = "\n".join(lines)
    if body.startswith("{"):
        return json.loads(body)
    if body.startswith("|"):
        return dict(re.findall(r"^\| (\S+) \| (\S+) \|$", body, flags=re.M)[1:])
    return dict(re.findall(r"^(\S+?)(?:: | = )(\S+)$", body, flags=re.M))


def test_kv_answer_is_the_value_of_the_asked_key():
    layouts = set()
    for seed in range(60):
        e = tasks.kv(random.Random(seed), HAYSTACK)
        (block,) = e.inserts
        assert block.strip() in e.document
        table = _parse_kv(block)
        asked = [k for k in table if re.search(rf"(?<![\w-]){re.escape(k)}(?![\w-])", e.question)]
        assert len(asked) == 1 and table[asked[0]] == e.answer, (e.question, e.answer)
        layouts.add(block.strip()[0])
    assert len(layouts) >= 3


def _run_assignments(document: str) -> dict[str, str]:
    """An independent interpreter of the four statement forms, in document order."""
    values: dict[str, str] = {}
    patterns = (r"let (\w+) = (\w+);", r"(\w+) := (\w+)", r"Set (\w+) to (?:the value of )?(\w+)\.",
                r"The variable (\w+) is given the value (?:of )?(\w+)\.")
    found = sorted((m.start(), m.group(1), m.group(2)) for p in patterns for m in re.finditer(p, document))
    for _, name, source in found:
        values[name] = source if source.isdigit() else values[source]
    return values


def test_vt_answer_is_every_variable_that_ends_up_holding_the_value():
    hops = set()
    for seed in range(60):
        e = tasks.vt(random.Random(seed), HAYSTACK)
        value = re.search(r"\d{5}", e.question).group()
        values = _run_assignments(e.document)
        expected = {name for name, v in values.items() if v == value}
        assert set(e.answer.split(", ")) == expected, (e.question, e.answer, e.inserts)
        hops.add(len(expected))
    assert hops >= {2, 5}


def test_passage_answer_is_in_the_passage_or_follows_the_quote():
    quotes = 0
    for seed in range(80):
        e = tasks.passage(random.Random(seed), HAYSTACK)
        if e.inserts:
            (text,) = e.inserts
            assert text in e.document and e.answer in text
            assert all(w in text for w in _proper_nouns(e.question))
        else:
            quotes += 1
            quoted = re.search(r'"(.+)"', e.question).group(1)
            assert f"{quoted} {e.answer}" in e.document
    assert 0 < quotes < 80


def test_no_benchmark_needle_can_be_generated():
    """Every needle of bench_edge/needles.py (evaluation and tuning) has answer keywords; none of
    them is in any template or vocabulary entry or any made-up name, and no number format can
    spell the numeric ones, so no generated instance states a needle or its answer."""
    needles = _needles_module()
    keywords = {k.lower() for n in needles.EVAL_NEEDLES + needles.DEV_NEEDLES for k in n.keywords}
    words = {k for k in keywords if not k.isdigit()}
    numbers = {int(k) for k in keywords if k.isdigit()}
    strings = [t for fact, qs, _ in tasks.NEEDLE_TEMPLATES for t in (fact, *(q for q, _ in qs))]
    strings += [t for intro, sents, qs in tasks.PASSAGE_SCHEMAS for t in (intro, *sents, *(q for q, _ in qs))]
    strings += [t for form in tasks.VT_FORMS for t in form] + list(tasks.KV_INTROS) + list(tasks.NEEDLE_INSTRUCTIONS)
    for vocab in (tasks.FIRST_NAMES, tasks.LAST_NAMES, tasks.VEHICLES, tasks.FOODS, tasks.INSTRUMENTS,
                  tasks.BUILDINGS, tasks.DEVICES, tasks.ANIMALS, tasks.GAMES, tasks.PROFESSIONS, tasks.PRODUCTS,
                  tasks.EVENTS, tasks.MONTHS):
        strings += list(vocab)
    strings += ["".join(p) for n in (2, 3) for p in itertools.product(tasks.SYLLABLES, repeat=n)]
    hits = [(w, s) for s in strings for w in words if w in s.lower()]
    assert not hits
    # numbers: 5-7 digits (values, codes), 12-99 (counts), 2-19 (platforms), 1720-1990 (years), H:MM times
    assert all(len(str(n)) < 5 and not 12 <= n <= 99 and not 2 <= n <= 19 and not 1720 <= n <= 1990
               for n in numbers)
    # and, belt and braces, over generated instances
    sentences = [n.sentence.lower() for n in needles.EVAL_NEEDLES + needles.DEV_NEEDLES]
    for kind, gen in tasks.KINDS.items():
        for seed in range(100):
            e = gen(random.Random(seed), HAYSTACK)
            material = " ".join(e.inserts + (e.question, e.answer)).lower()
            assert not any(s in material for s in sentences)
            assert not any(w in material for w in words)
            assert not any(re.search(rf"\b{n}\b", material) for n in numbers)


def test_pydoc_text_is_the_benchmarks_pydoc_haystack():
    assert tasks.pydoc_text() == _needles_module().haystack_text("pydoc")[0]


def test_chat_messages_frame_document_and_question():
    e = tasks.needle(random.Random(1), HAYSTACK)
    for framing in tasks.FRAMINGS:
        messages = tasks.chat_messages(e, framing)
        assert messages[-1]["role"] == "user"
        assert e.document in messages[-1]["content"] and e.question in messages[-1]["content"]
    with pytest.raises(ValueError, match="framing"):
        tasks.chat_messages(e, "bogus")
