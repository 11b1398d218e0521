"""The sparsity methods and the rules that follow from each: one table, read everywhere.

A method is *global* when one selection serves every layer, chosen before the model runs (so
offloaded layers can load it into their slots), *per layer* when it chooses inside each layer from
that layer's keys (so every layer's keys must be on the device), and needs a *head* when a
retrieval head makes the choice. The planner, the settings, the engine and the selectors ask
these questions here, never with their own lists.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import InputError


@dataclass(frozen=True)
class Method:
    """One ``--sparsity`` choice."""

    name: str
    kind: str  # "dense", "global" or "per-layer"
    needs_head: bool = False
    # what a decode step attends to, for --help
    summary: str = ""


TABLE = {m.name: m for m in (
    Method("dense", "dense", summary="every past token"),
    Method("specontext", "global", needs_head=True,
           summary="the retrieval head's choice, one set per KV head for all layers"),
    Method("oracle", "per-layer", summary="per layer, the top of the model's own attention: an upper bound"),
    Method("quest", "per-layer", summary="per layer, pages ranked by key bounds"),
    Method("streaming", "global", summary="sinks plus the most recent tokens"),
    Method("snapkv", "per-layer", summary="per layer, the prompt positions the prompt's last tokens attended "
                                          "to, plus sinks and window, fixed after prefill"),
)}
METHODS = tuple(TABLE)
GLOBAL_METHODS = tuple(n for n, m in TABLE.items() if m.kind == "global")
PER_LAYER_METHODS = tuple(n for n, m in TABLE.items() if m.kind == "per-layer")
SPARSE_METHODS = GLOBAL_METHODS + PER_LAYER_METHODS


def check_offload(method: str, where: str) -> None:
    """Raise InputError if layers in host memory cannot serve ``method`` (``where`` says why the
    run would have them: e.g. ``with offload_layers`` or ``on PROFILE this context needs ...``)."""
    if method in TABLE and TABLE[method].kind == "per-layer":
        raise InputError(f"sparsity {method} chooses inside each layer, so it needs every layer's keys on the "
                         f"device; {where} use {', '.join(GLOBAL_METHODS)} or dense")
