"""run_main, the wrapper every command line ends through: each way a run ends is one line and a status.

Hand-written bodies stand in for the commands (their own messages are tested with them:
test_errors.py, test_output.py, test_distill.py, test_eagle3.py); here only the wrapper's part.
"""

from __future__ import annotations

import argparse
import os
import signal
import warnings

import pytest

from specontext.cli import common
from specontext.cli.common import (EXIT_ERROR, EXIT_INTERRUPTED, EXIT_TERMINATED, EXIT_USAGE, OneLineParser,
                                   Terminated, run_main)
from specontext.errors import InputError

from test_structure import import_graph


def parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="tool")
    p.add_argument("--debug", action="store_true")
    p.add_argument("--count", type=int, default=1)
    return p


def run(body, argv=(), **notes) -> int:
    return run_main("tool", parser().parse_args, body, list(argv), **notes)


def raises(exc: BaseException):
    def body(args):
        raise exc
    return body


@pytest.mark.parametrize("exc, status, line", [
    (InputError("--count must be >= 1,\n got 0"), EXIT_ERROR, "tool: error: --count must be >= 1, got 0"),
    (KeyboardInterrupt(), EXIT_INTERRUPTED, "tool: interrupted; resume with the same command"),
    (Terminated(), EXIT_TERMINATED, "tool: terminated; resume with the same command"),
    (MemoryError(), EXIT_ERROR, "tool: error: out of memory; use --count 1"),
    (RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried"), EXIT_ERROR,
     "tool: error: out of memory; use --count 1"),
    (ZeroDivisionError("division by zero\nsecond line"), EXIT_ERROR,
     "tool: internal error: ZeroDivisionError: division by zero (rerun with --debug for the traceback)"),
    (BrokenPipeError(), EXIT_INTERRUPTED,
     "tool: standard output was closed (broken pipe) before everything was printed (kept in out.txt)"),
])
def test_every_ending_is_one_line_and_its_status(exc, status, line, capsys, monkeypatch):
    discarded = []  # pytest's captured stdout has no file descriptor to point at /dev/null
    monkeypatch.setattr(common, "discard_stdout", lambda: discarded.append(True))
    code = run(raises(exc), interrupted_note="; resume with the same command",
               out_of_memory_advice=lambda args: f"use --count {args.count}",
               broken_pipe_note=lambda args: " (kept in out.txt)")
    assert (code, capsys.readouterr().err) == (status, line + "\n")
    assert discarded == ([True] if isinstance(exc, BrokenPipeError) else [])


def test_the_body_status_and_warnings_as_one_line(capsys):
    def body(args):
        warnings.warn("pinned memory refused (test)", RuntimeWarning)
        return 3

    assert run(body) == 3
    assert capsys.readouterr().err == "tool: warning: pinned memory refused (test)\n"


def test_errors_names_what_counts_as_bad_input(capsys):
    assert run(raises(ValueError("bad value")), errors=(ValueError,)) == EXIT_ERROR
    assert capsys.readouterr().err == "tool: error: bad value\n"
    assert run(raises(ValueError("bad value"))) == EXIT_ERROR  # by default a ValueError is a bug
    assert "internal error: ValueError: bad value" in capsys.readouterr().err


def test_debug_reraises_and_usage_errors_are_one_line(capsys):
    with pytest.raises(ZeroDivisionError):
        run(raises(ZeroDivisionError()), ["--debug"])
    with pytest.raises(SystemExit) as exit_info:
        run(lambda args: 0, ["--count", "x"])
    assert exit_info.value.code == EXIT_USAGE
    assert capsys.readouterr().err == "tool: error: argument --count: invalid int value: 'x' (see --help)\n"


def test_sigterm_is_terminated_while_the_body_runs_and_restored_after(capsys):
    before = signal.getsignal(signal.SIGTERM)

    def body(args):
        os.kill(os.getpid(), signal.SIGTERM)
        return 0

    assert run(body) == EXIT_TERMINATED
    assert capsys.readouterr().err == "tool: terminated\n"
    assert signal.getsignal(signal.SIGTERM) == before


def test_the_runtime_imports_nothing_from_the_offline_tools():
    graph = import_graph()
    users = {m: sorted(t for t in ts if t.startswith("specontext.tools")) for m, ts in graph.items()
             if not m.startswith("specontext.tools")}
    assert {m: ts for m, ts in users.items() if ts} == {}
