"""``specontext-run --plan``, and the plan's word on what fits when a run runs out of memory."""

from __future__ import annotations

import argparse
import json
import os

from ..config import ModelConfig
from ..errors import ContextLengthError, InputError
from ..output import resolve_output
from ..settings import RuntimeSettings


def run_plan(args: argparse.Namespace, settings: RuntimeSettings) -> int:
    """``--plan``: the memory plan for ``args.model`` as a table (or JSON), without loading weights.

    With ``--output FILE`` the JSON is also written to FILE (through FILE.partial). Returns 0.
    """
    from ..planner.plan import make_plan

    if args.output:
        resolve_output(args.output)  # fail before any work if it cannot be written
    plan = make_plan(args.model, settings.device_profile, context_tokens=args.context_tokens, requests=args.requests,
                     budget_tokens=settings.budget_tokens, sparsity=settings.sparsity, dtype=settings.dtype,
                     slot_pool=settings.slot_pool, block_tokens=settings.block_tokens,
                     prefill_chunk_tokens=settings.prefill_chunk_tokens, retrieval_head=settings.retrieval_head,
                     weights=settings.weights, kv_dtype=settings.kv_dtype, embeddings=settings.embeddings)
    payload = json.dumps(plan.to_dict(), indent=2)
    if args.output:
        tmp = args.output + ".partial"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(payload + "\n")
        os.replace(tmp, args.output)
    print(payload if args.json else plan.table())
    return 0


def what_fits(model: str | ModelConfig | None, settings: RuntimeSettings | None, reached: int | None = None) -> str:
    """What the memory plan for this machine says would fit, for an out-of-memory message.

    ``model`` is the model's path (None: the default model) or, better, the loaded model's shape,
    which spares reading the model file again with memory short; ``settings`` None (they could
    not be read) plans with the defaults; ``reached`` is how many tokens the run held when it
    failed. Never raises: without a plan it gives the generic advice.
    """
    from ..planner.plan import make_plan

    try:
        plan = make_plan(model, settings.device_profile if settings else "auto", context_tokens=1,
                         requests=1,
                         budget_tokens=settings.budget_tokens if settings else 2048,
                         sparsity=settings.sparsity if settings else "specontext")
        fits = plan.placement.max_context_tokens
    except (InputError, ContextLengthError) as exc:  # the plan itself says what cannot fit, and what would
        return str(exc)
    except Exception:  # noqa: BLE001 - no plan at all (a file unreadable with memory short): the generic advice
        return "use a shorter document, fewer new tokens or a smaller model"
    where = f" (this run reached {reached})" if reached else ""
    return (f"the memory plan for this machine fits at most {fits} tokens of prompt plus answer{where}, with "
            f"memory other programs hold counted as free; see specontext-run --plan, and use a shorter document, "
            f"fewer new tokens or a smaller model")
