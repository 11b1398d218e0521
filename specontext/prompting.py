"""How a document and a question are put to the model: the one framing that ``specontext-run``,
:meth:`LLM.ask` and the needle benchmarks share.

The framing was chosen by measurement (``bench_edge/bench_framing.py``; results in
``bench_edge/results/framing_cpu.json``): the default model, greedy, on a one-line document about
France, ten short paragraphs and 30 needle questions in about 2k tokens of two kinds of text.
Labelled parts ending in "Answer briefly." answered 38 of 41, every answer ending on its own
(18 tokens on average). The document and question simply joined by a blank line, used before,
answered the France question in rambling French. A system instruction with labelled parts
answered one short question more by keyword but ran on to the token limit on half the cases,
and some templates refuse a system message, so the instruction stays in the user's message.
"""

from __future__ import annotations

from .errors import InputError


def _parts(document: str | None, question: str | None) -> tuple[str | None, str | None]:
    """Blank parts as None; a part given alone is used as it is (a prompt read from a file)."""
    document = document if document is not None and document.strip() else None
    question = question if question is not None and question.strip() else None
    if document is None and question is None:
        raise InputError("give a document, a question, or both (both are empty)")
    return document, question


def document_messages(document: str | None, question: str | None) -> list[dict]:
    """Chat messages asking ``question`` about ``document``, for the model's chat template.

    Args:
        document: the document's text, or None (the question is then asked on its own).
        question: the question, or None (the document is then the whole message, e.g. a prompt
            read from a file). A part given alone is used unchanged; given together, both lose
            their leading and trailing whitespace. Blank counts as None.
    Returns:
        ``[{"role": "user", "content": ...}]``; no system message, so the template's own default
        (if any) applies.
    Raises:
        InputError when both are None or blank.

    Example::

        document_messages("France is a country in Europe.", "What is the capital of France?")
        # [{"role": "user", "content": "Document:\\nFrance is a country in Europe.\\n\\n"
        #                              "Question: What is the capital of France?\\n\\nAnswer briefly."}]
    """
    document, question = _parts(document, question)
    if document is None or question is None:
        return [{"role": "user", "content": document or question}]
    return [{"role": "user", "content": f"Document:\n{document.strip()}\n\nQuestion: {question.strip()}\n\n"
                                        "Answer briefly."}]


def document_text(document: str | None, question: str | None) -> str:
    """The same request as raw text, for models without a chat template (``--no-chat-template``).

    The labelled parts end in an ``Answer:`` cue for the model to continue (the best raw framing
    measured; without a template the default model rambles more whatever the framing). Arguments
    and errors as :func:`document_messages`.

    Example::

        document_text("France is a country in Europe.", "What is the capital of France?")
        # "Document:\\nFrance is a country in Europe.\\n\\nQuestion: What is the capital of France?\\nAnswer:"
    """
    document, question = _parts(document, question)
    if document is None or question is None:
        return document or question
    return f"Document:\n{document.strip()}\n\nQuestion: {question.strip()}\nAnswer:"
