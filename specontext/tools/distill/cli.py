"""The ``specontext-distill`` command line: options, their checks, and the summary it prints."""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

from ...cli.common import OneLineParser, run_main
from ...errors import InputError, SpecontextError
from ...retrieval.head import user_head_dir
from .config import DistillConfig, parse_task_mix
from .train import distill

PROG = "specontext-distill"


def _parse_ints(text: str, what: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise InputError(f"{what} must be comma-separated integers, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    d = DistillConfig()
    p = OneLineParser(
        prog=PROG,
        description="Train a retrieval head for a model from text, so that its per-KV-head attention matches the "
                    "model's attention averaged over layers. The head is saved as NAME.safetensors + NAME.json "
                    "and found by `specontext-run --sparsity specontext --retrieval-head auto`. Interrupted runs "
                    "resume from NAME.work/.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", "-m", metavar="PATH", help="a .gguf file or Hugging Face folder (default: the default model)")
    p.add_argument("--text", metavar="FILE", action="append",
                   help="UTF-8 training text (repeatable; default: the Paul Graham essays)")
    p.add_argument("--output", "-o", metavar="STEM",
                   help=f"where to save the head (default: {user_head_dir()}/MODEL-FINGERPRINT)")
    p.add_argument("--seq-tokens", type=int, default=d.seq_tokens, help="tokens per training sequence")
    p.add_argument("--max-sequences", type=int, default=d.max_sequences, help="training sequences at most")
    p.add_argument("--holdout-tokens", type=int, default=d.holdout_tokens,
                   help="tokens at the start of the text kept out of training and used to measure the head")
    p.add_argument("--eval-sequences", type=int, default=d.eval_sequences, help="held-out sequences measured")
    p.add_argument("--queries-per-sequence", type=int, default=d.queries_per_sequence,
                   help="query positions per sequence whose attention the head learns")
    p.add_argument("--hidden-layers", default=None,
                   help="target layers whose outputs the head fuses, comma-separated; 'none' for embedding only "
                        "(default: 2, L/2 and L-3: low, middle and high layers, in the spirit of EAGLE-3)")
    p.add_argument("--num-heads", type=int, default=0, help="head query heads (0: the model's)")
    p.add_argument("--head-dim", type=int, default=0, help="head dimension (0: the model's)")
    p.add_argument("--steps", type=int, default=d.steps, help="Adam steps")
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (cosine decay)")
    p.add_argument("--task-mix", default=None, metavar="KIND:N,...",
                   help="also train on N generated retrieval tasks of each KIND (needle, kv, vt, passage; e.g. "
                        "needle:8,kv:4,vt:4,passage:4): a document with a question and the model's own answer, "
                        "whose attention while answering the head learns (see specontext/retrieval/tasks.py)")
    p.add_argument("--answer-weight", type=float, default=d.answer_weight,
                   help="loss weight of the queries that produce a task's answer (reading queries weigh 1)")
    p.add_argument("--eval-tasks-per-kind", type=int, default=d.eval_tasks_per_kind,
                   help="held-out task examples per kind in --task-mix, built on the held-out text, on which the "
                        "recall at the answer-producing positions is measured")
    p.add_argument("--skip-tokens", default=None, metavar="START:END",
                   help="a token range of the text kept out of training (text sequences and task haystacks), "
                        "e.g. a tuning set's")
    p.add_argument("--loss-region", choices=("all", "middle"), default=d.loss_region,
                   help="past positions the KL is taken over: all, or only those between the sinks and the "
                        "recent window, which selection always keeps (see specontext/tools/distill/objective.py)")
    p.add_argument("--target-aggregate", choices=("mean", "max"), default=d.target_aggregate,
                   help="how a KV group's query heads are combined in the teacher target")
    p.add_argument("--seed", type=int, default=d.seed, help="seed for query positions, init and order")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: PyTorch's default)")
    p.add_argument("--restart", action="store_true", help="discard OUTPUT.work/ and start over")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    return p


def _checked(args: argparse.Namespace) -> tuple[tuple[tuple[str, int], ...], tuple[int, int]]:
    """(task mix, skipped token range) from options checked before any work; InputError names the bad one."""
    for name in ("seq_tokens", "max_sequences", "queries_per_sequence", "steps", "eval_sequences"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.num_heads < 0 or args.head_dim < 0:
        raise InputError("--num-heads and --head-dim must be >= 0 (0: the model's)")
    task_mix = parse_task_mix(args.task_mix or "")
    if not (args.answer_weight > 0 and math.isfinite(args.answer_weight)):
        raise InputError(f"--answer-weight must be a positive number, got {args.answer_weight}")
    if args.eval_tasks_per_kind < 0:
        raise InputError(f"--eval-tasks-per-kind must be >= 0, got {args.eval_tasks_per_kind}")
    skip = (0, 0)
    if args.skip_tokens is not None:
        parts = args.skip_tokens.split(":")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts) or int(parts[0]) >= int(parts[1]):
            raise InputError(f"--skip-tokens must be START:END with 0 <= START < END, got {args.skip_tokens!r}")
        skip = (int(parts[0]), int(parts[1]))
    if args.holdout_tokens < 0 or args.threads < 0 or not (args.lr > 0 and math.isfinite(args.lr)):
        raise InputError("--holdout-tokens and --threads must be >= 0 and --lr a positive number")
    return task_mix, skip


def _hidden_layers(option: str | None, num_layers: int) -> tuple[int, ...]:
    """``--hidden-layers``: the default (2, L/2, L-3), none, or the listed layers of the model."""
    L = num_layers
    if option is None:
        return tuple(sorted({min(2, L - 1), L // 2, max(L - 3, 0)}))
    if option.strip().lower() == "none":
        return ()
    layers = _parse_ints(option, "--hidden-layers")
    bad = [i for i in layers if not 0 <= i < L]
    if bad:
        raise InputError(f"--hidden-layers {bad[0]} is outside the model's layers 0..{L - 1}")
    return layers


def run(args: argparse.Namespace) -> int:
    """The command's body: check the options, load the model, distill, print the held-out recall."""
    from ... import assets
    from ...api import load

    task_mix, skip = _checked(args)
    texts = []
    for path in args.text or []:
        try:
            with open(path, encoding="utf-8") as f:
                texts.append(f.read())
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"cannot read --text {path}: {' '.join(str(exc).split())}") from None
    text = "\n\n".join(texts) if texts else assets.essay_text()
    llm = load(args.model, device="cpu", threads=args.threads)
    layers = _hidden_layers(args.hidden_layers, llm.config.num_layers)
    seq_tokens = min(args.seq_tokens, llm.config.max_position_embeddings)
    cfg = DistillConfig(seq_tokens=seq_tokens, max_sequences=args.max_sequences, holdout_tokens=args.holdout_tokens,
                        eval_sequences=args.eval_sequences, queries_per_sequence=args.queries_per_sequence,
                        min_query_position=min(DistillConfig.min_query_position, seq_tokens // 2),
                        hidden_layers=layers, num_heads=args.num_heads, head_dim=args.head_dim, steps=args.steps,
                        lr=args.lr, target_aggregate=args.target_aggregate, seed=args.seed,
                        task_mix=task_mix, answer_weight=args.answer_weight,
                        eval_tasks_per_kind=args.eval_tasks_per_kind, skip_tokens=skip,
                        loss_region=args.loss_region)
    name = os.path.splitext(os.path.basename(os.path.normpath(llm.path)))[0].lower()
    output = args.output or os.path.join(user_head_dir(), f"{name}-{llm.target.fingerprint[:12]}")
    t0 = time.perf_counter()
    label = ", ".join(args.text) if args.text else f"Paul Graham essays ({assets.ESSAYS_PIN})"
    path, quality = distill(llm, text, output, cfg, restart=args.restart, progress=not args.quiet,
                            log=lambda m: print(m, file=sys.stderr), text_label=label)
    recall = quality["recall_heldout"]
    print(f"saved {path} ({time.perf_counter() - t0:.0f} s)")
    print("held-out recall by budget: " + ", ".join(
        f"B={b}: head {recall['head'][b]:.3f} / global oracle {recall['oracle_global'][b]:.3f} / "
        f"streaming {recall['streaming'][b]:.3f}" for b in cfg.eval_budgets))
    if "recall_answer_heldout" in quality:
        answer = quality["recall_answer_heldout"]
        print("held-out task answers, recall by budget: " + ", ".join(
            f"B={b}: head {answer['head'][b]:.3f} / global oracle {answer['oracle_global'][b]:.3f}"
            for b in cfg.eval_budgets))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``specontext-distill`` with ``argv`` (None: ``sys.argv[1:]``); returns the exit status.

    Example: ``main(["--model", "model.gguf", "--steps", "300", "--quiet"])``.
    """
    return run_main(PROG, build_parser().parse_args, run, argv, errors=(SpecontextError, ValueError, OSError),
                    interrupted_note="; run the same command again to resume")
