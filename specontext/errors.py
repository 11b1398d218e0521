"""Typed exceptions for everything a user can get wrong.

Every exception raised for bad input derives from :class:`SpecontextError` so the CLI can turn
it into a one-line message and a non-zero exit without a traceback. Messages say what was wrong
and what would be right.
"""

from __future__ import annotations


class SpecontextError(Exception):
    """Base class for errors caused by input the user controls (files, options, prompts)."""


class ModelFileError(SpecontextError):
    """A model file (GGUF, safetensors, config.json, tokenizer) is missing, truncated or corrupt."""


class UnsupportedModelError(SpecontextError):
    """The model uses an architecture, tensor type or tokenizer kind that specontext does not run."""


class ContextLengthError(SpecontextError):
    """A prompt (plus the tokens to generate) does not fit in the model's context."""


class InputError(SpecontextError, ValueError):
    """A document, question or option value is unusable (not UTF-8, empty, out of range, ...)."""


def malformed(where: str, error: type[SpecontextError] = ModelFileError):
    """A decorator for parsers of untrusted files: any plain exception that escapes (a field of the
    wrong type, a value out of range, a library's own failure on odd bytes) becomes a
    ``error`` (a :class:`ModelFileError` by default) naming ``where`` and the cause, so bad bytes
    never reach the user as a traceback. Our own typed errors pass through unchanged."""
    import functools

    def wrap(fn):
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except SpecontextError:
                raise
            except (MemoryError, RecursionError):
                raise error(f"{where} is malformed: it asks for more memory or nesting than it could hold") from None
            except Exception as exc:  # noqa: BLE001 - untrusted bytes: every failure is the file's
                detail = (str(exc).strip().splitlines() or [""])[0][:200]
                raise error(f"{where} is malformed ({type(exc).__name__}: {detail})") from None

        return inner

    return wrap
