"""The command lines.

* :mod:`.run` is ``specontext-run`` (``python -m specontext.cli``): :mod:`.inputs` reads its
  documents and ``--batch`` requests, :mod:`.generate` answers them, :mod:`.plan` prints
  ``--plan`` and says what fits when memory runs out.
* :mod:`.common` is what every command shares (``specontext-run``, ``specontext-distill``,
  ``specontext-import-eagle3``, the lm-eval adapter): exit codes, SIGTERM as
  :class:`Terminated`, one-line usage errors, and :func:`run_main`, which ends every run with at
  most one line on stderr.

``specontext.cli:main`` is the ``specontext-run`` entry point.
"""

from .common import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_TERMINATED, EXIT_USAGE, Terminated, is_oom, run_main
from .inputs import read_batch, read_document, request_ids
from .run import build_parser, main

_is_oom = is_oom  # the name this module had before it became a package

__all__ = ["EXIT_ERROR", "EXIT_INTERRUPTED", "EXIT_TERMINATED", "EXIT_USAGE", "Terminated", "build_parser", "is_oom",
           "main", "read_batch", "read_document", "request_ids", "run_main"]
