"""What a distillation trains on and how: :class:`DistillConfig`, and how the text is cut.

The held-out sequences come from the start of the text (training never sees them, so the
accuracy harness can evaluate there too); training sequences follow, skipping ``skip_tokens``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from ...errors import InputError
from ...retrieval import tasks

# task haystacks from the Python reference topics start here: bench_edge/needles.py evaluates on the
# first 8192 tokens of that text and tunes on the 8192 after token 40000 (this keeps a margin)
PYDOC_FROM_TOKENS = 60_000


@dataclass(frozen=True)
class DistillConfig:
    """What to train and on what. Everything that changes the teacher data is in its cache key.

    The fields mirror ``specontext-distill``'s options (see ``--help``); the less obvious ones:
    ``hidden_layers`` are the target layers (0-based outputs) the head fuses, none for an
    embedding-only head; ``num_heads``/``head_dim`` 0 take the model's; ``min_query_position`` is
    the first position sampled as a query; ``eval_budgets`` the budgets recall is measured at, with
    ``sink_tokens`` and ``window_tokens`` always kept as at run time; ``answer_tokens`` the most a
    task's answer may run. Example: ``DistillConfig(seq_tokens=8192, task_mix=(("needle", 8),))``.
    """

    seq_tokens: int = 4096
    max_sequences: int = 24
    holdout_tokens: int = 16384
    eval_sequences: int = 2
    queries_per_sequence: int = 64
    min_query_position: int = 128
    hidden_layers: tuple[int, ...] = ()
    num_heads: int = 0
    head_dim: int = 0
    steps: int = 1200
    lr: float = 2e-3
    target_aggregate: str = "mean"
    seed: int = 0
    eval_budgets: tuple[int, ...] = (256, 512, 1024, 2048)
    sink_tokens: int = 4
    window_tokens: int = 60
    task_mix: tuple[tuple[str, int], ...] = ()  # (kind, count): see tasks.KINDS
    answer_tokens: int = 20
    answer_weight: float = 1.0
    eval_tasks_per_kind: int = 1
    skip_tokens: tuple[int, int] = (0, 0)  # [start, end) of the text kept out of training (a tuning set's)
    loss_region: str = "middle"

    def train_key(self, teacher_key: str) -> str:
        """Checkpoints resume only a run with the same data and training settings (--steps may grow)."""
        fields = (teacher_key, self.num_heads, self.head_dim, self.lr, self.target_aggregate, self.task_mix,
                  self.answer_tokens, self.answer_weight)
        if self.loss_region != "all":  # appended only when set, so existing "all" checkpoints keep their key
            fields += (self.loss_region, self.sink_tokens, self.window_tokens)
        return hashlib.sha256(repr(fields).encode()).hexdigest()[:16]

    def teacher_key(self, fingerprint: str, text_digest: str) -> str:
        """Teacher files are reused only for the same model, text, sequences and query sampling."""
        fields = (fingerprint, text_digest, self.seq_tokens, self.max_sequences, self.holdout_tokens,
                  self.eval_sequences, self.queries_per_sequence, self.min_query_position, self.hidden_layers,
                  self.seed)
        if self.skip_tokens != (0, 0):  # appended only when set, so existing teacher data keeps its key
            fields += (self.skip_tokens,)
        return hashlib.sha256(repr(fields).encode()).hexdigest()[:16]

    def task_key(self, fingerprint: str, text_digest: str) -> str:
        """Task examples do not depend on the text sequences, so --max-sequences keeps them."""
        fields = (fingerprint, text_digest, self.seq_tokens, self.holdout_tokens, self.skip_tokens,
                  self.queries_per_sequence, self.min_query_position, self.hidden_layers, self.seed,
                  self.answer_tokens, tasks.VERSION)
        return hashlib.sha256(repr(fields).encode()).hexdigest()[:16]


def train_starts(num_tokens: int, cfg: DistillConfig) -> list[int]:
    """Start offsets of the training sequences: after the held-out tokens, none overlapping the skipped range."""
    n, (skip_a, skip_b) = cfg.seq_tokens, cfg.skip_tokens
    starts, i = [], cfg.holdout_tokens
    while i + n <= num_tokens and len(starts) < cfg.max_sequences:
        if i < skip_b and i + n > skip_a:
            i = skip_b
            continue
        starts.append(i)
        i += n
    return starts


def text_sequences(ids: list[int], cfg: DistillConfig) -> tuple[list[list[int]], list[list[int]]]:
    """Held-out evaluation sequences from the start of the text, training sequences after it."""
    n = cfg.seq_tokens
    holdout = ids[:cfg.holdout_tokens]
    evals = [holdout[i:i + n] for i in range(0, len(holdout) - n + 1, n)][:cfg.eval_sequences]
    trains = [ids[i:i + n] for i in train_starts(len(ids), cfg)]
    return trains, evals


def parse_task_mix(text: str) -> tuple[tuple[str, int], ...]:
    """``"needle:8,kv:4"`` -> ``(("needle", 8), ("kv", 4))``; an empty string is no tasks.

    Raises InputError (one line) on an unknown kind, a count that is not an integer >= 0, or a repeat.
    """
    mix: dict[str, int] = {}
    for item in (x.strip() for x in text.split(",")):
        if not item:
            continue
        kind, sep, count = item.partition(":")
        kind = kind.strip()
        if kind not in tasks.KINDS:
            raise InputError(f"--task-mix kind must be one of {', '.join(tasks.KINDS)}, got {kind!r} in {text!r}")
        if not sep or not count.strip().isdigit():
            raise InputError(f"--task-mix items are KIND:COUNT with a count >= 0, got {item!r}")
        if kind in mix:
            raise InputError(f"--task-mix names {kind!r} twice")
        mix[kind] = int(count)
    return tuple((k, n) for k, n in mix.items() if n)

