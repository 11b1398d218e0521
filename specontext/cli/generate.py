"""``specontext-run`` answering: one request streamed to standard output, or several as a batch.

Tokens go to the output as they arrive (see specontext/output.py): a regular ``--output FILE``
through FILE.partial, which replaces FILE when the run ends or is interrupted (Ctrl-C, SIGTERM).
An interruption, a closed standard output or running out of memory mid-answer keeps what was
generated and ends with one line saying so.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from dataclasses import fields

from ..errors import SpecontextError
from ..output import answer_output
from ..settings import RuntimeSettings
from .common import EXIT_ERROR, discard_stdout, interruption, is_oom
from .inputs import request_ids
from .plan import what_fits


class PrefillBar:
    """A progress bar on stderr for a prefill long enough to wait for: opened at the first report
    (``bar(done_tokens, total_tokens)``, the engine's ``progress`` callback), closed at the first
    generated token, and never shown when ``show`` is false."""

    def __init__(self, show: bool, desc: str):
        self.show, self.desc, self._bar = show, desc, None

    def __call__(self, done: int, total: int) -> None:
        if not self.show:
            return
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=self.desc, unit="tok", file=sys.stderr, leave=False)
        self._bar.update(done - self._bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def run_single(args: argparse.Namespace, settings: RuntimeSettings, request: dict) -> int:
    """One request: the answer streams to standard output (or prints as one JSON object with
    --json), a summary line goes to stderr, and the exit status says how it ended."""
    from ..api import load

    gen = request["generation"]
    llm = load(args.model, settings=settings)
    ids = request_ids(llm, request, chat=not args.no_chat_template)
    llm.engine.check_prompt_fits(len(ids))
    bar = PrefillBar(not args.quiet and len(ids) > settings.prefill_chunk_tokens, "prefill")
    generation = llm.engine.generate(ids, gen, progress=bar)
    interrupted: BaseException | None = None
    try:
        with answer_output(args.output) as out_file:
            try:
                for piece in generation:
                    bar.close()
                    if not args.json:
                        sys.stdout.write(piece)
                        sys.stdout.flush()
                    if out_file:
                        out_file.write(piece)
            except (KeyboardInterrupt, BrokenPipeError) as exc:
                interrupted = exc
                generation.interrupt()
                if isinstance(exc, BrokenPipeError):  # the reader went away (e.g. piped into head)
                    discard_stdout()
            except Exception as exc:  # out of memory mid-answer: keep what was generated, then say so
                if not is_oom(exc):
                    raise
                interrupted = exc
                generation.interrupt()
    finally:
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
    if interrupted is not None and is_oom(interrupted):
        kept = f", kept in {args.output}" if args.output else ""
        # the plan needs a little memory: free the cache first (the traceback's frames hold it too)
        interrupted.__traceback__ = None
        del generation
        gc.collect()
        fits = what_fits(llm.config, settings, reached=len(ids) + result.stats.generated_tokens)
        print(f"specontext-run: error: out of memory after {result.stats.generated_tokens} tokens (the answer so far "
              f"was printed{kept}); {fits}", file=sys.stderr)
        return EXIT_ERROR
    if interrupted is not None:
        kept = f" (kept in {args.output})" if args.output else ""
        why, status = interruption(interrupted)
        print(f"specontext-run: {why} after {result.stats.generated_tokens} tokens{kept}", file=sys.stderr)
        return status
    return 0


def run_batch(args: argparse.Namespace, settings: RuntimeSettings, requests: list[dict]) -> int:
    """Several requests decoding together; one JSON line per request, written as each finishes.

    Lines go to standard output (with --json; otherwise a readable block per answer) and, with
    --output FILE, to FILE.partial, renamed to FILE at the end; on Ctrl-C the unfinished requests
    are written with what they generated so far and stop reason ``interrupted``.
    """
    from ..api import load

    llm = load(args.model, settings=settings)
    prompts = []
    for i, req in enumerate(requests):
        ids = request_ids(llm, req, chat=not args.no_chat_template)
        try:
            llm.engine.check_prompt_fits(len(ids))
        except SpecontextError as exc:
            raise type(exc)(f"request {req['id']!r}: {exc}") from None
        prompts.append(ids)
    total = sum(len(p) for p in prompts)
    bar = PrefillBar(not args.quiet and total > settings.prefill_chunk_tokens, f"prefill ({len(prompts)} requests)")
    batch = llm.engine.generate_batch(prompts, [r["generation"] for r in requests], progress=bar)
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
                    bar.close()
                    if batch.finished(i) and i not in written:
                        emit(i)
            except (KeyboardInterrupt, BrokenPipeError) as exc:
                interrupted = exc
                batch.interrupt()
                if isinstance(exc, BrokenPipeError):  # stdout's reader went away: --output keeps every line
                    discard_stdout()
                for i in range(len(requests)):
                    if i not in written:
                        emit(i)
    finally:
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
        why, status = interruption(interrupted)
        print(f"specontext-run: {why}; {len(requests)} requests kept with what they generated"
              + (f" (in {args.output})" if args.output else ""), file=sys.stderr)
        return status
    return 0
