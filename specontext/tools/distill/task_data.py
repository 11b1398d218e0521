"""Retrieval tasks as teacher data (``--task-mix``): a question about a document, answered by the model.

Each example (see :mod:`specontext.retrieval.tasks`) is rendered with the chat template, the
model's own greedy answer (dense) is appended, and the teacher records its attention at the
positions that produce the answer as well as at sampled reading positions. Haystacks are cut
from :class:`TaskPool` s: for training, the text after the held-out and skipped tokens and the
Python reference topics after ``PYDOC_FROM_TOKENS``; for held-out examples, the held-out text.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass

from ...errors import InputError
from ...retrieval import tasks
from .config import PYDOC_FROM_TOKENS, DistillConfig
from .teacher import TeacherSequence, load_teacher, save_teacher, teacher_sequence


@dataclass(frozen=True)
class TaskPool:
    """Token ids a task's haystack is cut from: ``ids`` are tokens ``[offset, offset + len(ids))`` of ``name``."""

    name: str
    ids: list[int]
    offset: int


def task_prompt(llm, kind: str, pools: list[TaskPool], cfg: DistillConfig, seed: int) -> tuple[list[int], dict]:
    """(chat prompt ids, record) of one ``kind`` example whose prompt leaves room for the answer.

    The haystack is a random stretch of a random pool; the generator's own randomness restarts
    from the same seed whenever the haystack is shortened to fit, so a seed always gives one example.
    """
    rng = random.Random(seed)
    pool = pools[rng.randrange(len(pools))]
    room = cfg.seq_tokens - cfg.answer_tokens - 1
    want = rng.randint(min(1024, room // 2), room)
    framing = rng.choice(tasks.FRAMINGS)
    gen_seed = rng.getrandbits(64)
    num_hay = max(min(want - 64, len(pool.ids)), 16)
    start = rng.randrange(len(pool.ids) - num_hay + 1)
    for _ in range(8):
        hay_ids = pool.ids[start:start + num_hay]
        example = tasks.KINDS[kind](random.Random(gen_seed), llm.tokenizer.decode(hay_ids))
        messages = tasks.chat_messages(example, framing)
        if llm.tokenizer.chat_template:
            prompt = llm.encode_prompt(messages)
        else:  # a base model: the same parts as plain text
            prompt = llm.encode_prompt("\n\n".join(m["content"] for m in messages), chat=False)
        if len(prompt) <= room:
            break
        num_hay = int(num_hay * min(want / len(prompt), 0.98))
    else:
        raise InputError(f"cannot fit a {kind} task into {room} tokens (--seq-tokens {cfg.seq_tokens} is too short)")
    record = {"kind": kind, "seed": seed, "haystack": pool.name,
              "haystack_tokens": [pool.offset + start, pool.offset + start + len(hay_ids)], "framing": framing,
              "prompt_tokens": len(prompt), "expected": example.answer}
    return prompt, record


def task_teacher_sequence(llm, kind: str, pools: list[TaskPool], cfg: DistillConfig,
                          seed: int) -> tuple[TeacherSequence, dict]:
    """A retrieval example, the model's own greedy answer (dense) and the teacher's attention at the
    positions that produce it plus sampled reading positions; with a record of what it holds."""
    prompt, record = task_prompt(llm, kind, pools, cfg, seed)
    stop = frozenset(llm.tokenizer.eos_token_ids) | frozenset(llm.config.eos_token_ids)
    seq = teacher_sequence(llm.model, prompt, cfg, llm.settings.prefill_chunk_tokens, seed,
                           answer_tokens=cfg.answer_tokens, stop_ids=stop)
    answer = llm.tokenizer.decode(seq.ids[len(prompt):].tolist())
    names = [a.strip().lower() for a in record["expected"].split(",")] if kind == "vt" else \
        [record["expected"].lower()]
    record.update(answer=answer, answer_tokens=len(seq.ids) - len(prompt),
                  answered=all(n in answer.lower() for n in names))
    return seq, record


def task_pools(llm, ids: list[int], cfg: DistillConfig) -> tuple[list[TaskPool], list[TaskPool]]:
    """Haystacks for training tasks (the text after the held-out and skipped tokens, the Python
    reference topics after ``PYDOC_FROM_TOKENS``) and for held-out tasks (the held-out text)."""
    text_from = max(cfg.holdout_tokens, cfg.skip_tokens[1])
    train = [TaskPool("text", ids[text_from:], text_from)]
    pydoc = llm.tokenizer.encode(tasks.pydoc_text(), add_bos=False, parse_special=False)[PYDOC_FROM_TOKENS:]
    if len(pydoc) >= cfg.seq_tokens:
        train.append(TaskPool("pydoc", pydoc, PYDOC_FROM_TOKENS))
    return train, [TaskPool("text", ids[:cfg.holdout_tokens], 0)]


def task_sequences(llm, ids: list[int], cfg: DistillConfig, fingerprint: str, text_digest: str, work: str,
                    progress: bool) -> tuple[dict[str, list[tuple[TeacherSequence, dict]]], list[TaskPool]]:
    """Training and held-out task examples ({"train": [(sequence, record)], "eval": [...]}) and the
    training haystacks; one teacher file (and record) per example, reused on resume.

    Seeds: each kind has its own stream (KINDS order), so asking for more of a kind keeps the first ones.
    """
    from tqdm import tqdm

    out: dict[str, list] = {"train": [], "eval": []}
    if not cfg.task_mix:
        return out, []
    key = cfg.task_key(fingerprint, text_digest)
    train_pools, eval_pools = task_pools(llm, ids, cfg)
    jobs = []
    for kind, count in cfg.task_mix:
        k = list(tasks.KINDS).index(kind)
        jobs += [("train", kind, i, cfg.seed * 100003 + 200000 + 1000 * k + i, train_pools) for i in range(count)]
        jobs += [("eval", kind, i, cfg.seed * 100003 + 300000 + 1000 * k + i, eval_pools)
                 for i in range(cfg.eval_tasks_per_kind)]
    for split, kind, i, seed, pools in tqdm(jobs, desc="teacher (tasks)", unit="seq", disable=not progress):
        path = os.path.join(work, f"teacher-{key}-{split}-{kind}{i:03d}")
        if not os.path.exists(path + ".json"):
            seq, record = task_teacher_sequence(llm, kind, pools, cfg, seed)
            save_teacher(seq, path + ".safetensors")
            with open(path + ".json.partial", "w") as f:
                json.dump(record, f)
            os.replace(path + ".json.partial", path + ".json")
        with open(path + ".json") as f:
            out[split].append((load_teacher(path + ".safetensors"), json.load(f)))
    return out, train_pools


