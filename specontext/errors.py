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
