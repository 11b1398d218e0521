"""What every command line shares: exit codes, SIGTERM, and one wrapper around the command's body.

``specontext-run``, ``specontext-distill``, ``specontext-import-eagle3`` and the lm-eval adapter
each parse their options and hand their body to :func:`run_main`, which turns every way a run can
end into at most one line on stderr and an exit status:

* the body returns: its own status;
* bad input (a :class:`~specontext.errors.SpecontextError`): ``PROG: error: MESSAGE``, 1;
* out of memory (:func:`is_oom`): ``PROG: error: out of memory; ADVICE``, 1;
* any other exception, a bug: ``PROG: internal error: TYPE: FIRST LINE (rerun with --debug for
  the traceback)``, 1;
* Ctrl-C: ``PROG: interrupted NOTE``, 130; SIGTERM (:class:`Terminated`): ``PROG: terminated
  NOTE``, 143;
* standard output closed under it (``| head``): ``PROG: standard output was closed (broken pipe)
  before everything was printed NOTE``, 130;
* a usage error (:class:`OneLineParser`): ``PROG: error: MESSAGE (see --help)``, 2.

Warnings raised while the body runs print as one line too (``PROG: warning: MESSAGE``). With
``--debug`` every exception is re-raised, for its traceback, and warnings print as Python prints
them. What a command says beyond that (what fits in memory, how to resume, where its output is
kept) it passes to :func:`run_main` as its own notes.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import warnings
from typing import Callable

from ..errors import SpecontextError

EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED, EXIT_TERMINATED = 1, 2, 130, 143


class Terminated(KeyboardInterrupt):
    """SIGTERM (what `kill`, `timeout` and job schedulers send), handled as Ctrl-C is: work so far
    is kept (a partial answer, in --output too), and the exit status is 143."""


def _terminate(signum, frame) -> None:
    raise Terminated()


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line naming --help (exit 2), not usage plus message."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def is_oom(exc: BaseException) -> bool:
    """Python's MemoryError, torch's OutOfMemoryError (CUDA), or torch's CPU allocator failing (a
    RuntimeError "DefaultCPUAllocator: can't allocate memory")."""
    return (isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError"
            or (isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)))


def interruption(exc: BaseException) -> tuple[str, int]:
    """(what stopped the run, as a message says it; the exit status) for Ctrl-C, SIGTERM or a
    closed standard output caught while the body was still producing output."""
    if isinstance(exc, BrokenPipeError):
        return "standard output was closed (broken pipe); stopped", EXIT_INTERRUPTED
    if isinstance(exc, Terminated):
        return "terminated", EXIT_TERMINATED
    return "interrupted", EXIT_INTERRUPTED


def discard_stdout() -> None:
    """Point standard output at /dev/null once its reader has gone, so that nothing more (the
    interpreter's flush at exit included) fails on the closed pipe."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def one_line(text: object) -> str:
    """``text`` with its lines joined by spaces: an error message always prints as one line."""
    return " ".join(line.strip() for line in str(text).splitlines() if line.strip())


def run_main(prog: str, parse_args: Callable[[list[str] | None], argparse.Namespace],
             body: Callable[[argparse.Namespace], int], argv: list[str] | None = None, *,
             errors: tuple[type[BaseException], ...] = (SpecontextError,), interrupted_note: str = "",
             out_of_memory_advice: Callable[[argparse.Namespace], str] | None = None,
             broken_pipe_note: Callable[[argparse.Namespace], str] | None = None) -> int:
    """Parse ``argv`` and run ``body(args)``, ending as the module docstring says.

    Args:
        prog: the command's name, first on every line it prints to stderr.
        parse_args: ``argv`` (None: ``sys.argv[1:]``) -> the options; a usage error exits here.
            The options' ``debug`` attribute, when true, re-raises every exception instead.
        body: runs the command and returns its exit status.
        errors: the exceptions that are bad input, printed as ``error:`` (default: SpecontextError).
        interrupted_note: appended to the interrupted/terminated line, e.g. how to resume.
        out_of_memory_advice: ``args`` -> what would fit, appended to the out-of-memory line.
        broken_pipe_note: ``args`` -> where the output is kept, appended to the broken-pipe line.
    Returns:
        The exit status: the body's, or one of ``EXIT_*`` above.

    SIGTERM raises :class:`Terminated` while the body runs (in the main thread); the previous
    handler is restored afterwards. Example::

        def main(argv=None) -> int:
            return run_main("specontext-import-eagle3", build_parser().parse_args, run, argv)
    """
    args = parse_args(argv)
    debug = bool(getattr(args, "debug", False))
    in_main_thread = threading.current_thread() is threading.main_thread()  # signal handlers live there
    previous = signal.signal(signal.SIGTERM, _terminate) if in_main_thread else None

    def show_warning(message, category, filename, lineno, file=None, line=None) -> None:
        print(f"{prog}: warning: {message}", file=file or sys.stderr)  # no source location or code line

    try:
        with warnings.catch_warnings():
            if not debug:
                warnings.showwarning = show_warning
            return body(args)
    except KeyboardInterrupt as exc:
        if debug:
            raise
        why, status = interruption(exc)
        print(f"{prog}: {why}{interrupted_note}", file=sys.stderr)
        return status
    except BrokenPipeError:  # the reader of stdout went away (`| head`) while results were printed
        if debug:
            raise
        discard_stdout()
        note = broken_pipe_note(args) if broken_pipe_note else ""
        print(f"{prog}: standard output was closed (broken pipe) before everything was printed{note}",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    except errors as exc:
        if debug:
            raise
        print(f"{prog}: error: {one_line(exc)}", file=sys.stderr)
        return EXIT_ERROR
    except Exception as exc:  # a bug or an exhausted machine, not bad input: still one line unless --debug
        if debug:
            raise
        if is_oom(exc):
            advice = f"; {out_of_memory_advice(args)}" if out_of_memory_advice else ""
            print(f"{prog}: error: out of memory{advice}", file=sys.stderr)
            return EXIT_ERROR
        first_line = (str(exc).strip().splitlines() or [""])[0]
        print(f"{prog}: internal error: {type(exc).__name__}: {first_line} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return EXIT_ERROR
    finally:
        if in_main_thread:  # None: the handler was not set from Python; the default is the nearest
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
