"""``specontext-distill``: train a retrieval head to predict where the target model attends.

Shape letters: S tokens in a training sequence, Q query positions sampled from it, E target hidden
size, H target query heads, G target KV heads, L fused layers.

Three stages, each resumable from ``OUTPUT.work/``:

1. **Teacher.** The target prefills each training sequence once (dense, chunked). An instrumented
   cache records, for Q sampled query positions, every layer's attention probabilities over the
   past positions; their mean over layers, per query head, is kept ([H, Q, S], float16), with the
   target's hidden states after the fused layers ([S, L*E], float16).
2. **Training.** The head (fc fusion, norms, Q/K) is fitted so that, per KV group, its
   distribution (normalised max over its query heads, as selection uses) matches the teacher's
   per-group target by KL divergence. The target aggregate is the *mean* over the group's query
   heads of the layer-mean attention: for the recall the harness measures (mean over layers and
   heads of the attention mass on a shared per-group set), the best possible set is exactly the
   top-B of that mean, so it is what the head should rank by. ``--target-aggregate max`` gives the
   paper's group max instead, for comparison.

   ``--loss-region`` picks the past positions the KL is taken over. ``all``: every past position.
   ``middle``: only ``sink_tokens <= p < q - window_tokens``, the positions selection actually has
   to rank (sinks and the recent window are always kept), with both distributions renormalised
   over that region; a query with an empty region has weight 0. Most of the teacher's mass sits
   on the sinks and the window (63% for SmolLM2-135M on 8k-token text, 27% on the 4 sinks), so
   under ``all`` the KL spends much of the head's capacity on positions whose ranking never
   changes what is kept.

   ``--task-mix`` adds retrieval tasks (needles, key-value lookups, variable tracking, passage
   questions; see ``tasks.py``) to the text: each is a document with a question, rendered with the
   chat template, and the model's own greedy answer (dense) appended. Their queries are the
   positions that produce the answer, whose loss counts ``--answer-weight`` times, plus sampled
   reading positions. The haystacks are the training text after the held-out and skipped tokens and
   the Python reference topics after token ``PYDOC_FROM_TOKENS``; the artefact records the split.
3. **Quality.** On held-out sequences (by default the first tokens of the text, which training
   skips, so the accuracy harness evaluates on text the head never saw), the recall of the head's
   selection at several budgets next to the global oracle and StreamingLLM; saved in the
   artefact's ``quality``; with tasks, also the recall at the answer-producing positions of
   held-out task examples (built on the held-out text, with their own seeds).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass

import torch

from ...errors import InputError, SpecontextError
from ...kv.cache import DenseKVCache
from ...retrieval import tasks
from ...retrieval.head import RetrievalHead, RetrievalHeadConfig, save_head, user_head_dir

EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130
# task haystacks from the Python reference topics start here: bench_edge/needles.py evaluates on the
# first 8192 tokens of that text and tunes on the 8192 after token 40000 (this keeps a margin)
PYDOC_FROM_TOKENS = 60_000


@dataclass(frozen=True)
class DistillConfig:
    """What to train and on what. Everything that changes the teacher data is in its cache key."""

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


class TeacherProbe(DenseKVCache):
    """A dense cache that also records attention at chosen query positions, averaged over layers.

    ``probs_sum[h, j, :]`` accumulates, over layers, query head h's attention at query position
    ``query_positions[j]`` over the past positions (renormalised without the current token).
    """

    def __init__(self, num_layers, num_kv_heads, head_dim, capacity, dtype, device, num_heads,
                 query_positions: torch.Tensor):
        super().__init__(num_layers, 1, num_kv_heads, head_dim, capacity, dtype, device)
        self.query_positions = query_positions.to(self.device)
        self.probs_sum = torch.zeros(num_heads, len(query_positions), capacity, dtype=torch.float32, device=self.device)

    def update(self, layer, k, v, plan, queries=None):
        keys, values, mask = super().update(layer, k, v, plan, queries)
        pos = plan.positions[0]  # [T]
        hit = torch.isin(pos, self.query_positions)
        if hit.any():
            local = hit.nonzero(as_tuple=True)[0]
            qpos = pos[local]  # [n]
            j = torch.searchsorted(self.query_positions, qpos)
            H, G = queries.shape[1], keys.shape[1]
            D = queries.shape[-1]
            q = queries[0, :, local].float()  # [H, n, D]
            kk = keys[0].float().repeat_interleave(H // G, dim=0)  # [H, S, D]
            logits = torch.matmul(q, kk.transpose(-1, -2)) * D ** -0.5  # [H, n, S]
            past = torch.arange(keys.shape[2], device=keys.device)[None, :] < qpos[:, None]  # [n, S]
            probs = logits.masked_fill(~past[None], float("-inf")).softmax(-1)
            self.probs_sum[:, j, :keys.shape[2]] += probs
        return keys, values, mask


@dataclass
class TeacherSequence:
    ids: torch.Tensor  # [S] int64
    hidden: torch.Tensor  # [S, L*E] float16: target outputs after the fused layers at each position
    query_positions: torch.Tensor  # [Q] int64, sorted
    attention: torch.Tensor  # [H, Q, S] float16: layer-mean attention over past positions
    answer_from: int = -1  # first query position that produces the model's answer (-1: none, plain text)


def _train_starts(num_tokens: int, cfg: DistillConfig) -> list[int]:
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


def _sequences(ids: list[int], cfg: DistillConfig) -> tuple[list[list[int]], list[list[int]]]:
    """Held-out evaluation sequences from the start of the text, training sequences after it."""
    n = cfg.seq_tokens
    holdout = ids[:cfg.holdout_tokens]
    evals = [holdout[i:i + n] for i in range(0, len(holdout) - n + 1, n)][:cfg.eval_sequences]
    trains = [ids[i:i + n] for i in _train_starts(len(ids), cfg)]
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


@torch.no_grad()  # not inference_mode: the returned tensors feed training
def teacher_sequence(model, ids: list[int], cfg: DistillConfig, chunk_tokens: int, seed: int,
                     answer_tokens: int = 0, stop_ids: frozenset[int] = frozenset()) -> TeacherSequence:
    """Run the target over ``ids`` once and record what the head learns from (see module docstring).

    With ``answer_tokens``, ``ids`` is a prompt: the model then decodes its own greedy answer (up
    to that many tokens, stopping before a token in ``stop_ids``) in the same pass, and the
    positions that produce it are queries besides the sampled ones; the returned ``ids`` hold
    prompt and answer. Query positions are sampled with ``seed`` from ``[min_query_position, P)``
    (P: prompt tokens, or all of them minus the answer-producing last one).
    """
    mcfg = model.config
    P = len(ids)
    g = torch.Generator().manual_seed(seed)
    answer_q = torch.arange(P - 1, P - 1 + answer_tokens)
    span = P - len(answer_q[:1]) - cfg.min_query_position
    num_q = max(min(cfg.queries_per_sequence - len(answer_q), span), 0)
    sampled = cfg.min_query_position + torch.randperm(max(span, 0), generator=g)[:num_q]
    qpos = torch.cat([answer_q, sampled]).unique().sort().values
    capacity = P + answer_tokens
    probe = TeacherProbe(mcfg.num_layers, mcfg.num_kv_heads, mcfg.head_dim, capacity, model.dtype, model.device,
                         mcfg.num_heads, qpos)
    layers = cfg.hidden_layers
    hidden = torch.empty(capacity, len(layers) * mcfg.hidden_size, dtype=torch.float16)
    seq = list(ids)

    def run(part: list[int], logits_for: str) -> torch.Tensor:
        start = probe.seq_lens[0]
        x = torch.tensor([part], dtype=torch.int64, device=model.device)
        captured: dict = {}
        logits = model(x, probe.plan_step([len(part)]), probe, logits_for=logits_for, capture_layers=layers,
                       captured=captured)
        hidden[start:start + len(part)] = torch.cat([captured[i][0] for i in layers], dim=-1).to(torch.float16).cpu()
        return logits

    for start in range(0, P, chunk_tokens):
        last = start + chunk_tokens >= P
        logits = run(ids[start:start + chunk_tokens], "last" if last and answer_tokens else "none")
    for i in range(answer_tokens):  # greedy, dense: the model's own answer
        token = int(logits[0].argmax())
        if token in stop_ids:
            break
        seq.append(token)
        logits = run([token], "last" if i + 1 < answer_tokens else "none")
    S = len(seq)
    keep = qpos < S  # answer positions after an early stop never ran
    attention = (probe.probs_sum[:, keep, :S] / mcfg.num_layers).to(device="cpu", dtype=torch.float16)
    return TeacherSequence(torch.tensor(seq), hidden[:S].clone(), qpos[keep], attention,
                           answer_from=P - 1 if answer_tokens else -1)


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


def query_weights(seq: TeacherSequence, answer_weight: float) -> torch.Tensor:
    """[Q] float32 loss weights: ``answer_weight`` at the queries that produce the answer, 1 elsewhere."""
    w = torch.ones(len(seq.query_positions))
    if seq.answer_from >= 0:
        w[seq.query_positions >= seq.answer_from] = answer_weight
    return w


def answer_queries(seq: TeacherSequence) -> TeacherSequence:
    """The same sequence with only the queries that produce the answer (for measuring recall there)."""
    keep = seq.query_positions >= seq.answer_from
    return TeacherSequence(seq.ids, seq.hidden, seq.query_positions[keep], seq.attention[:, keep], seq.answer_from)


def _save_teacher(seq: TeacherSequence, path: str) -> None:
    from safetensors.torch import save_file

    save_file({"ids": seq.ids, "hidden": seq.hidden, "query_positions": seq.query_positions,
               "attention": seq.attention, "answer_from": torch.tensor([seq.answer_from])}, path + ".partial")
    os.replace(path + ".partial", path)


def _load_teacher(path: str) -> TeacherSequence:
    from safetensors.torch import load_file

    t = load_file(path)
    answer_from = int(t["answer_from"][0]) if "answer_from" in t else -1
    return TeacherSequence(t["ids"], t["hidden"], t["query_positions"], t["attention"], answer_from)


def group_target(attention: torch.Tensor, num_kv_heads: int, aggregate: str) -> torch.Tensor:
    """[H, Q, S] per-head layer-mean attention -> [G, Q, S] per-group target distribution."""
    H, Q, S = attention.shape
    per_group = attention.float().view(num_kv_heads, H // num_kv_heads, Q, S)
    agg = per_group.mean(1) if aggregate == "mean" else per_group.amax(1)
    return agg / agg.sum(-1, keepdim=True).clamp_min(1e-12)


def head_scores(head: RetrievalHead, embed: torch.nn.Module, seq: TeacherSequence,
                query_index: torch.Tensor | None = None) -> torch.Tensor:
    """The head's per-group scores [G, q, S] (group max of per-head softmax over past positions).

    ``query_index`` picks rows of ``seq.query_positions`` (all when None).
    """
    ids = seq.ids
    S = ids.shape[0]
    qpos = seq.query_positions if query_index is None else seq.query_positions[query_index]
    emb = embed(ids[None]).float()  # [1, S, E]
    hidden = None
    if head.config.input_kind == "embedding+hidden":
        h = seq.hidden.float()
        hidden = torch.cat([torch.zeros_like(h[:1]), h[:-1]], dim=0)[None]  # outputs at p - 1
    x = head.inputs(emb, hidden)  # [1, S, in]
    positions = torch.arange(S)[None]
    _, k = head.project(x, positions)  # [1, Gh, S, D]
    q, _ = head.project(x[:, qpos], qpos[None])  # [1, H, q, D]
    valid = torch.arange(S)[None, :] < qpos[:, None]  # [q, S]
    return head.group_probs(q, k, valid[None])[0]  # [G, q, S]


def distill_loss(target: torch.Tensor, scores: torch.Tensor, qpos: torch.Tensor, weights: torch.Tensor,
                 region: str, sinks: int, window: int) -> torch.Tensor:
    """Weighted mean over groups and queries of KL(target || student) on the loss region.

    ``target`` [G, Q, S] (teacher distribution over past positions), ``scores`` [G, Q, S] (the
    head's, zero outside the past), ``qpos`` [Q] int64, ``weights`` [Q] float32. ``region`` is
    "all" (positions p < q) or "middle" (``sinks <= p < q - window``: see the module docstring);
    both distributions are renormalised over it, and queries whose region is empty get weight 0.
    Returns a scalar. Example: ``distill_loss(t, s, qpos, torch.ones(Q), "middle", 4, 60)``.
    """
    if region not in ("all", "middle"):
        raise ValueError(f"loss region must be 'all' or 'middle', got {region!r}")
    pos = torch.arange(target.shape[-1], device=target.device)
    if region == "all":
        keep = pos[None, :] < qpos[:, None]  # [Q, S]
    else:
        keep = (pos[None, :] >= sinks) & (pos[None, :] < qpos[:, None] - window)
    t = target * keep[None]
    t = t / t.sum(-1, keepdim=True).clamp_min(1e-12)
    s = scores * keep[None]
    s = s / s.sum(-1, keepdim=True).clamp_min(1e-12)
    kl = (t * (t.clamp_min(1e-12).log() - s.clamp_min(1e-12).log())).sum(-1)  # [G, Q]
    w = weights * keep.any(-1)
    return (kl * w).sum() / (w.sum() * kl.shape[0]).clamp_min(1e-12)


def selection_recall(attention: torch.Tensor, scores: torch.Tensor, budget: int, sinks: int, window: int,
                     qpos: torch.Tensor) -> float:
    """Mean over heads and queries of the layer-mean attention mass on per-group top-``budget`` sets.

    ``attention`` [H, Q, S] (teacher), ``scores`` [G, Q, S] (what to rank by); sinks and the
    recent window are always kept, as at run time; queries whose past fits the budget count 1.
    """
    H, Q, S = attention.shape
    G = scores.shape[0]
    pos = torch.arange(S)
    past = pos[None, :] < qpos[:, None]  # [Q, S]
    pinned = (pos[None, :] < sinks) | (pos[None, :] >= qpos[:, None] - window)
    ranked = scores.float().masked_fill(pinned[None] & past[None], 2.0).masked_fill(~past[None], -1.0)
    k = min(budget, S)
    top = ranked.topk(k, dim=-1)
    chosen = torch.zeros(G, Q, S, dtype=torch.bool).scatter_(-1, top.indices, top.values >= 0)
    chosen = chosen.repeat_interleave(H // G, dim=0)  # [H, Q, S]
    return float((attention.float() * chosen).sum(-1).mean())


def evaluate(head, embed, seqs: list[TeacherSequence], cfg: DistillConfig, num_kv_heads: int) -> dict:
    """Recall at each budget for the head, the global per-group oracle and StreamingLLM."""
    out: dict = {"head": {}, "oracle_global": {}, "streaming": {}}
    with torch.no_grad():
        for budget in cfg.eval_budgets:
            rh, ro, rs = [], [], []
            for seq in seqs:
                att = seq.attention.float()
                scores = head_scores(head, embed, seq)
                rh.append(selection_recall(att, scores, budget, cfg.sink_tokens, cfg.window_tokens,
                                           seq.query_positions))
                ro.append(selection_recall(att, group_target(att, num_kv_heads, "mean"), budget, 0, 0,
                                           seq.query_positions))
                zero = torch.zeros(num_kv_heads, *att.shape[1:])
                rs.append(selection_recall(att, zero, budget, cfg.sink_tokens, budget - cfg.sink_tokens,
                                           seq.query_positions))
            out["head"][budget] = round(sum(rh) / len(rh), 4)
            out["oracle_global"][budget] = round(sum(ro) / len(ro), 4)
            out["streaming"][budget] = round(sum(rs) / len(rs), 4)
    return out


def _save_checkpoint(head, opt, step: int, path: str, loss_avg: float | None) -> None:
    """Head weights, Adam moments and the step, as safetensors + JSON (no pickle)."""
    from safetensors.torch import save_file

    tensors = {f"head.{k}": v.detach().clone().contiguous() for k, v in head.state_dict().items()}
    names = dict(head.named_parameters())
    for name, p in names.items():
        st = opt.state.get(p)
        if st:
            tensors[f"adam.exp_avg.{name}"] = st["exp_avg"].contiguous()
            tensors[f"adam.exp_avg_sq.{name}"] = st["exp_avg_sq"].contiguous()
            adam_step = float(st["step"])
    meta = {"step": step, "adam_step": adam_step if step else 0.0, "loss_avg": loss_avg}
    # the step travels inside the weights file too, so a crash between the two renames is detected
    save_file(tensors, path + ".safetensors.partial", metadata={"step": str(step)})
    with open(path + ".json.partial", "w") as f:
        json.dump(meta, f)
    os.replace(path + ".safetensors.partial", path + ".safetensors")
    os.replace(path + ".json.partial", path + ".json")


def _load_checkpoint(head, opt, path: str) -> tuple[int, float | None]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    with open(path + ".json") as f:
        meta = json.load(f)
    with safe_open(path + ".safetensors", "pt") as f:
        if (f.metadata() or {}).get("step") != str(meta["step"]):
            raise InputError(f"training checkpoint {path}.* is torn (weights and step disagree); "
                             "rerun with --restart")
    tensors = load_file(path + ".safetensors")
    head.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("head.")}, strict=True)
    for name, p in head.named_parameters():
        if f"adam.exp_avg.{name}" in tensors:
            opt.state[p] = {"step": torch.tensor(meta["adam_step"]), "exp_avg": tensors[f"adam.exp_avg.{name}"],
                            "exp_avg_sq": tensors[f"adam.exp_avg_sq.{name}"]}
    return int(meta["step"]), meta.get("loss_avg")


def _task_pools(llm, ids: list[int], cfg: DistillConfig) -> tuple[list[TaskPool], list[TaskPool]]:
    """Haystacks for training tasks (the text after the held-out and skipped tokens, the Python
    reference topics after ``PYDOC_FROM_TOKENS``) and for held-out tasks (the held-out text)."""
    text_from = max(cfg.holdout_tokens, cfg.skip_tokens[1])
    train = [TaskPool("text", ids[text_from:], text_from)]
    pydoc = llm.tokenizer.encode(tasks.pydoc_text(), add_bos=False, parse_special=False)[PYDOC_FROM_TOKENS:]
    if len(pydoc) >= cfg.seq_tokens:
        train.append(TaskPool("pydoc", pydoc, PYDOC_FROM_TOKENS))
    return train, [TaskPool("text", ids[:cfg.holdout_tokens], 0)]


def _task_sequences(llm, ids: list[int], cfg: DistillConfig, fingerprint: str, text_digest: str, work: str,
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
    train_pools, eval_pools = _task_pools(llm, ids, cfg)
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
            _save_teacher(seq, path + ".safetensors")
            with open(path + ".json.partial", "w") as f:
                json.dump(record, f)
            os.replace(path + ".json.partial", path + ".json")
        with open(path + ".json") as f:
            out[split].append((_load_teacher(path + ".safetensors"), json.load(f)))
    return out, train_pools


def _split_record(text_label: str, text_digest: str, num_text_tokens: int, cfg: DistillConfig,
                  text_starts: list[int], pools: list[TaskPool], task_records: dict) -> dict:
    """What the head was trained and measured on, saved in the artefact (``quality.training_data``)."""
    import platform

    n = cfg.seq_tokens
    record = {
        "text": {"source": text_label, "sha256_16": text_digest, "tokens": num_text_tokens,
                 "heldout_tokens": [0, cfg.holdout_tokens],
                 "skipped_tokens": list(cfg.skip_tokens) if cfg.skip_tokens != (0, 0) else None,
                 "train_sequences": [[a, a + n] for a in text_starts]},
    }
    if cfg.task_mix:
        record["tasks"] = {
            "version": tasks.VERSION, "mix": dict(cfg.task_mix), "answer_weight": cfg.answer_weight,
            "max_answer_tokens": cfg.answer_tokens,
            "haystacks": {p.name: {"tokens": [p.offset, p.offset + len(p.ids)],
                                   "source": text_label if p.name == "text" else
                                   f"Python {platform.python_version()} pydoc_data.topics (sorted, joined)"}
                          for p in pools},
            "seeds": f"{cfg.seed} * 100003 + 200000 + 1000 * (index of the kind in {list(tasks.KINDS)}) + i",
            "examples": [r for _, r in task_records["train"]],
            "heldout": {"haystack": f"held-out text, tokens [0, {cfg.holdout_tokens})",
                        "seeds": f"{cfg.seed} * 100003 + 300000 + 1000 * (kind index) + i",
                        "examples": [r for _, r in task_records["eval"]]},
            "kept_out": "bench_edge/needles.py's EVAL_NEEDLES and DEV_NEEDLES: no template, vocabulary entry or "
                        "number format of tasks.py can produce their answer keywords (tests/test_tasks.py)",
        }
    return record


def distill(llm, text: str, output: str, cfg: DistillConfig, restart: bool = False,
            progress: bool = True, log=print, text_label: str = "text") -> tuple[str, dict]:
    """Train a head for ``llm`` (a loaded ``specontext.LLM``) on ``text``; save it at ``output``.

    Returns (config path, quality dict); ``text_label`` names the text in the saved split record. Work (teacher data, checkpoints) lives in
    ``OUTPUT.work/`` so an interrupted run resumes where it stopped; ``restart`` discards it.
    """
    from tqdm import tqdm

    model, target = llm.model, llm.target
    mcfg = model.config
    if model.device.type != "cpu" and model.dtype != torch.float32:
        log("note: the teacher runs in the model's dtype; float32 gives the cleanest targets")
    ids = llm.tokenizer.encode(text, add_bos=False)
    trains, evals = _sequences(ids, cfg)
    if not trains or not evals:
        need = cfg.holdout_tokens + cfg.seq_tokens
        raise InputError(f"the text is {len(ids)} tokens; distillation needs at least {need} "
                         f"(--holdout-tokens {cfg.holdout_tokens} plus one --seq-tokens {cfg.seq_tokens} sequence)")
    text_digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    key = cfg.teacher_key(target.fingerprint, text_digest)
    stem = output[:-5] if output.endswith(".json") else output
    work = stem + ".work"
    if restart and os.path.isdir(work):
        for name in os.listdir(work):
            os.remove(os.path.join(work, name))
    os.makedirs(work, exist_ok=True)

    # the head's shape is checked before minutes of teacher work
    H = cfg.num_heads or mcfg.num_heads
    G = mcfg.num_kv_heads
    if H % G:
        raise InputError(f"--num-heads must be a multiple of the model's {G} KV heads, got {H}")
    head_cfg = RetrievalHeadConfig(
        target=target, input_kind="embedding+hidden" if cfg.hidden_layers else "embedding",
        hidden_layers=cfg.hidden_layers, num_heads=H, num_kv_heads=G, head_dim=cfg.head_dim or mcfg.head_dim,
        kv_group_of_head=tuple(h // (H // G) for h in range(H)), rope=mcfg.rope, rms_norm_eps=mcfg.rms_norm_eps,
        trained_context_tokens=cfg.seq_tokens, source="distilled")

    # 1. teacher data, one file per sequence, reused on resume
    all_seqs = [("eval", i, s) for i, s in enumerate(evals)] + [("train", i, s) for i, s in enumerate(trains)]
    loaded: dict[str, list[TeacherSequence]] = {"eval": [], "train": []}
    bar = tqdm(all_seqs, desc="teacher", unit="seq", disable=not progress)
    for kind, i, seq_ids in bar:
        path = os.path.join(work, f"teacher-{key}-{kind}{i:03d}.safetensors")
        if not os.path.exists(path):
            seq = teacher_sequence(model, seq_ids, cfg, llm.settings.prefill_chunk_tokens,
                                   seed=cfg.seed * 100003 + (i if kind == "train" else 50000 + i))
            _save_teacher(seq, path)
        loaded[kind].append(_load_teacher(path))
    task_records, pools = _task_sequences(llm, ids, cfg, target.fingerprint, text_digest, work, progress)
    loaded["train"] += [seq for seq, _ in task_records["train"]]
    weights = [query_weights(seq, cfg.answer_weight) for seq in loaded["train"]]

    # 2. training
    torch.manual_seed(cfg.seed)
    head = RetrievalHead(head_cfg).float().train()
    embed = model.model.embed_tokens
    opt = torch.optim.Adam(head.parameters(), lr=cfg.lr)
    ckpt = os.path.join(work, f"checkpoint-{cfg.train_key(key)}")
    step, loss_avg = 0, None
    if os.path.exists(ckpt + ".json") and os.path.exists(ckpt + ".safetensors"):
        step, loss_avg = _load_checkpoint(head, opt, ckpt)
        log(f"resuming training at step {step} of {cfg.steps} from {ckpt}.safetensors")
    targets = [group_target(s.attention, G, cfg.target_aggregate) for s in loaded["train"]]
    bar = tqdm(total=cfg.steps, initial=step, desc="train", unit="step", disable=not progress)
    last_save = time.monotonic()
    while step < cfg.steps:
        g = torch.Generator().manual_seed(cfg.seed * 7919 + step)
        i = int(torch.randint(len(loaded["train"]), (1,), generator=g))
        seq = loaded["train"][i]
        lr = cfg.lr * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
        for group in opt.param_groups:
            group["lr"] = lr
        scores = head_scores(head, embed, seq)  # [G, Q, S]
        loss = distill_loss(targets[i], scores, seq.query_positions, weights[i], cfg.loss_region,
                            cfg.sink_tokens, cfg.window_tokens)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        loss_value = loss.item()
        loss_avg = loss_value if loss_avg is None else 0.95 * loss_avg + 0.05 * loss_value
        bar.update(1)
        bar.set_postfix(kl=f"{loss_avg:.3f}")
        if time.monotonic() - last_save > 60 or step == cfg.steps:
            _save_checkpoint(head, opt, step, ckpt, loss_avg)
            last_save = time.monotonic()
    bar.close()

    # 3. quality on held-out text
    head.eval()
    recall = evaluate(head, embed, loaded["eval"], cfg, G)
    quality = {"recall_heldout": recall, "train_kl": round(loss_avg or 0.0, 4),
               "distill": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
               "train_tokens": sum(len(t.ids) for t in loaded["train"]),
               "heldout_tokens": f"first {cfg.holdout_tokens} tokens of the text",
               "training_data": _split_record(text_label, text_digest, len(ids), cfg,
                                              _train_starts(len(ids), cfg), pools, task_records)}
    answering = [answer_queries(seq) for seq, _ in task_records["eval"]]
    answering = [seq for seq in answering if len(seq.query_positions)]
    if answering:
        quality["recall_answer_heldout"] = evaluate(head, embed, answering, cfg, G)
    final = RetrievalHead(RetrievalHeadConfig.from_dict({**head_cfg.to_dict(), "quality": quality}))
    final.load_state_dict(head.state_dict())
    paths = save_head(final, stem, dtype=torch.float16)
    return paths[1], quality


def _parse_ints(text: str, what: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise InputError(f"{what} must be comma-separated integers, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    d = DistillConfig()
    p = argparse.ArgumentParser(
        prog="specontext-distill",
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
                        "recent window, which selection always keeps (see the module docstring)")
    p.add_argument("--target-aggregate", choices=("mean", "max"), default=d.target_aggregate,
                   help="how a KV group's query heads are combined in the teacher target")
    p.add_argument("--seed", type=int, default=d.seed, help="seed for query positions, init and order")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: PyTorch's default)")
    p.add_argument("--restart", action="store_true", help="discard OUTPUT.work/ and start over")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from ... import assets
        from ...api import load

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
        texts = []
        for path in args.text or []:
            try:
                with open(path, encoding="utf-8") as f:
                    texts.append(f.read())
            except (OSError, UnicodeDecodeError) as exc:
                raise InputError(f"cannot read --text {path}: {' '.join(str(exc).split())}") from None
        text = "\n\n".join(texts) if texts else assets.essay_text()
        llm = load(args.model, device="cpu", threads=args.threads)
        L = llm.config.num_layers
        if args.hidden_layers is None:
            layers = tuple(sorted({min(2, L - 1), L // 2, max(L - 3, 0)}))
        elif args.hidden_layers.strip().lower() == "none":
            layers = ()
        else:
            layers = _parse_ints(args.hidden_layers, "--hidden-layers")
            bad = [i for i in layers if not 0 <= i < L]
            if bad:
                raise InputError(f"--hidden-layers {bad[0]} is outside the model's layers 0..{L - 1}")
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
    except KeyboardInterrupt:
        print("specontext-distill: interrupted; run the same command again to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (SpecontextError, ValueError, OSError) as exc:
        if args.debug:
            raise
        print(f"specontext-distill: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
