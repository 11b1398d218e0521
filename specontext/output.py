"""``--output``: the answer written to a path the user names, whatever that path turns out to be.

* A regular file, or a path that does not exist yet: tokens go to ``TARGET.partial`` beside it as
  they arrive, renamed over TARGET when the run ends or is interrupted (Ctrl-C, SIGTERM), and
  removed when it fails, so an earlier answer is never half-overwritten.
* A symbolic link is followed to what it points to (chains too), and that target is written:
  the link stays a link.
* A device, FIFO or socket is written through, opened as it is and never replaced (a FIFO's
  reader gets the stream; ``/dev/null`` stays a device node).
* A write that fails (full disk, I/O error, file too large) drops the file: its partial is
  removed, any earlier file is left as it was, and ``error`` holds one line naming the path. The
  caller keeps printing the answer to standard output and reports the error at the end.
"""

from __future__ import annotations

import contextlib
import os
import stat
from typing import Iterator

from .errors import InputError


def resolve_output(path: str, option: str = "--output") -> tuple[str, bool]:
    """(the path to write, whether to write through it) for ``option path``.

    Raises:
        InputError: a directory, a missing directory, or a path that cannot be written.
    """
    target = os.path.realpath(path)  # a symlink (or a chain of them) leads to what it points to
    try:
        st = os.stat(target)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise InputError(f"{option} {path}: {exc.strerror or exc}") from None
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise InputError(f"{option} {path} is a directory, expected a file path")
    through = st is not None and not stat.S_ISREG(st.st_mode)
    parent = os.path.dirname(target)
    if not os.path.isdir(parent):
        raise InputError(f"{option} directory does not exist: {parent}")
    if (st is not None and not os.access(target, os.W_OK)) or (not through and not os.access(parent, os.W_OK)):
        raise InputError(f"{option} {path} is not writable")
    return target, through


class AnswerFile:
    """The open ``--output`` (see the module's docstring); ``write`` never raises for I/O."""

    def __init__(self, path: str):
        self.path = path
        self.target, self.through = resolve_output(path)
        self.partial = None if self.through else self.target + ".partial"
        self.error: str | None = None
        try:
            self._file = open(self.target if self.through else self.partial, "w", encoding="utf-8")
        except OSError as exc:
            raise InputError(f"cannot open --output {path}: {exc.strerror or exc}") from None

    def write(self, text: str) -> None:
        if self._file is None:
            return
        try:
            self._file.write(text)
            self._file.flush()
        except OSError as exc:
            self._drop(exc)

    def finish(self) -> None:
        """Close, and put the answer in place (rename the partial over the target)."""
        if self._file is None:
            return
        try:
            self._file.close()
            self._file = None
            if self.partial:
                os.replace(self.partial, self.target)
        except OSError as exc:
            self._drop(exc)

    def abort(self) -> None:
        """Close and remove the partial file; the target is left as it was."""
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None
        self._remove_partial()

    def _drop(self, exc: OSError) -> None:
        self.error = (f"cannot write --output {self.path}: {exc.strerror or exc}; "
                      f"{'an earlier file there was left as it was' if self.partial else 'the output stopped'}")
        self.abort()

    def _remove_partial(self) -> None:
        if self.partial:
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.partial)


@contextlib.contextmanager
def answer_output(path: str | None) -> Iterator[AnswerFile | None]:
    """An :class:`AnswerFile` for ``path`` (None without one): finished when the block ends (an
    interruption handled inside it counts as ending), aborted when the block raises."""
    if not path:
        yield None
        return
    out = AnswerFile(path)
    try:
        yield out
    except BaseException:
        out.abort()
        raise
    out.finish()
