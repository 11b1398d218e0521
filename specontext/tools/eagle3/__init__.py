"""``specontext-import-eagle3``: an EAGLE-3 draft checkpoint as a retrieval head.

SpeContext's retrieval head is the target's EAGLE-3 draft pruned to what selection needs: the
embedding reference (shared with the target), the fc fusion of three target layers' hidden states,
both input norms and the Q and K projections; V, O, the MLP and the LM head go (more than 90% of
the parameters). :mod:`.draft` reads a draft checkpoint and knows its layout, :mod:`.convert`
checks it against the target and saves the head, :mod:`.cli` is the command line. Example::

    from specontext.tools.eagle3 import import_eagle3
    report = import_eagle3("EAGLE3-LLaMA3.1-Instruct-8B", target, "heads/llama31-eagle3")
"""

from .cli import build_parser, main
from .convert import Eagle3ImportReport, import_eagle3
from .draft import (DROPPED_GROUPS, KEPT_TENSORS, DraftCheckpoint, default_hidden_layers, read_draft_config,
                    resolve_hidden_layers)

__all__ = ["DROPPED_GROUPS", "DraftCheckpoint", "Eagle3ImportReport", "KEPT_TENSORS", "build_parser",
           "default_hidden_layers", "import_eagle3", "main", "read_draft_config", "resolve_hidden_layers"]
