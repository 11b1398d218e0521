"""What ``specontext-run`` reads: documents (a file or standard input) and ``--batch`` JSONL requests.

A request is a dict: ``id``, ``prompt`` (the line's own prompt text, used as it is, or None),
``document`` and ``question`` (either may be None; framed by :mod:`specontext.prompting`), and
``generation`` (a :class:`GenerationConfig` with the line's overrides).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import fields, replace

from ..errors import InputError
from ..settings import GenerationConfig


def read_document(path: str) -> str:
    """Read a UTF-8 document from a file or ``-`` (stdin); raise InputError when unusable."""
    try:
        if path == "-":
            data = sys.stdin.buffer.read()
            where = "standard input"
        else:
            if os.path.isdir(path):
                raise InputError(f"document {path} is a directory, expected a text file")
            with open(path, "rb") as f:
                data = f.read()
            where = path
    except FileNotFoundError:
        raise InputError(f"document not found: {path}") from None
    except PermissionError:
        raise InputError(f"document is not readable (permission denied): {path}") from None
    except OSError as exc:
        raise InputError(f"cannot read document {path}: {exc.strerror or exc}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(
            f"document {where} is not UTF-8 text (invalid byte 0x{data[exc.start]:02x} at offset {exc.start}); "
            "convert it, e.g. iconv -f latin1 -t utf-8"
        ) from None


BATCH_KEYS = {"id", "question", "document", "text", "prompt"}


def read_batch(path: str, gen: GenerationConfig) -> list[dict]:
    """Requests from a JSONL file: [{"id", "prompt", "document", "question", "generation"}].

    ``prompt`` is the line's own prompt text (used as it is) or None, and then ``document`` and
    ``question`` (either may be None) are framed by :mod:`specontext.prompting`.

    Raises InputError naming the file, line and what is wrong.
    """
    gen_fields = {f.name for f in fields(GenerationConfig)}
    requests = []
    for number, line in enumerate(read_document(path).splitlines(), 1):
        if not line.strip():
            continue
        where = f"--batch {path} line {number}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{where} is not valid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(item, dict):
            raise InputError(f"{where} must be a JSON object, got {type(item).__name__}")
        unknown = sorted(set(item) - BATCH_KEYS - gen_fields)
        if unknown:
            raise InputError(f"{where}: unknown field {unknown[0]!r}; valid: {', '.join(sorted(BATCH_KEYS | gen_fields))}")
        for key in ("question", "document", "text", "prompt"):
            if key in item and not isinstance(item[key], str):
                raise InputError(f"{where}: {key!r} must be a string")
        if "prompt" in item and (set(item) & {"question", "document", "text"}):
            raise InputError(f"{where}: give \"prompt\" alone, or \"question\" with \"document\" or \"text\"")
        if "document" in item and "text" in item:
            raise InputError(f"{where}: give \"document\" (a file) or \"text\", not both")
        prompt, document, question = item.get("prompt"), None, None
        if prompt is not None:
            if not prompt.strip():
                raise InputError(f"{where}: the prompt is empty")
        else:
            document = read_document(item["document"]) if "document" in item else item.get("text")
            question = item.get("question") or None
            if document is not None and not document.strip():
                raise InputError(f"{where}: the document is empty")
            if document is None and question is None:
                raise InputError(f"{where}: needs \"question\", \"document\", \"text\" or \"prompt\"")
        overrides = {k: v for k, v in item.items() if k in gen_fields}
        if "stop" in overrides and isinstance(overrides["stop"], str):
            overrides["stop"] = (overrides["stop"],)
        try:
            request_gen = replace(gen, **{k: tuple(v) if k == "stop" else v for k, v in overrides.items()})
        except (InputError, TypeError, ValueError) as exc:
            raise InputError(f"{where}: {exc}") from None
        requests.append({"id": item.get("id", len(requests)), "prompt": prompt, "document": document,
                         "question": question, "generation": request_gen})
    if not requests:
        raise InputError(f"--batch {path} holds no requests (one JSON object per line)")
    return requests


def read_requests(args: argparse.Namespace, gen: GenerationConfig) -> list[dict]:
    """The requests ``specontext-run`` was given: the ``--batch`` file's, or one per ``--document``
    (or one for ``--question`` alone), each with ``gen``.

    Raises InputError when there is nothing to answer, when --batch is mixed with --document or
    --question, or when a document is unreadable or empty.
    """
    documents = args.document or []
    if args.batch:
        if documents or args.question:
            raise InputError("--batch takes the requests from its file; drop --document and --question")
        return read_batch(args.batch, gen)
    if not documents and not args.question:
        raise InputError("give --question TEXT, --document FILE, or both (or --batch FILE.jsonl)")
    if documents.count("-") > 1:
        raise InputError("standard input (-) can be read as one document only")
    requests = []
    for path in documents or [None]:
        document = read_document(path) if path is not None else None
        if document is not None and not document.strip():
            raise InputError(f"document {path} is empty")
        requests.append({"id": path if path is not None else 0, "prompt": None, "document": document,
                         "question": args.question or None, "generation": gen})
    return requests


def request_ids(llm, request: dict, chat: bool) -> list[int]:
    """Prompt ids of a request: its own prompt text, or its document and question framed as the
    API's :meth:`LLM.encode_document` frames them (one framing for CLI, API and benchmarks)."""
    if request["prompt"] is not None:
        return llm.encode_prompt(request["prompt"], chat=chat)
    return llm.encode_document(request["document"], request["question"], chat=chat)
