"""Stage 1, the teacher: what the target model attends to, recorded while it prefills.

Shape letters: S tokens in a sequence, Q query positions sampled from it, E target hidden size,
H target query heads, G target KV heads, L fused layers.

The target prefills each sequence once (dense, chunked) observed by a :class:`TeacherProbe`,
which records at Q sampled query positions every layer's attention over the past positions; their
mean over layers, per query head ([H, Q, S], float16), is kept with the target's hidden states
after the fused layers ([S, L*E], float16). Each sequence is saved as one safetensors file, so an
interrupted run resumes without redoing it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch

from ...kv.cache import DenseKVCache
from ...kv.plan import StepPlan
from .config import DistillConfig


class TeacherProbe:
    """Records attention at chosen query positions, averaged over layers: an attention observer,
    carried by each prefill step's plan (``StepPlan.focus``), to which every attention layer
    reports its queries and the keys it attends over.

    ``probs_sum[h, j, :]`` accumulates, over layers, query head h's attention at query position
    ``query_positions[j]`` over the past positions (renormalised without the current token).
    """

    def __init__(self, num_heads: int, capacity: int, device: torch.device, query_positions: torch.Tensor):
        self.query_positions = query_positions.to(device)
        self.probs_sum = torch.zeros(num_heads, len(query_positions), capacity, dtype=torch.float32, device=device)
        self.positions: torch.Tensor | None = None  # [T] of the chunk being run

    def for_chunk(self, plan: StepPlan) -> StepPlan:
        """``plan`` (one row) with this probe observing its attention."""
        self.positions = plan.positions[0]
        return replace(plan, focus=self)

    def observe(self, layer: int, queries: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor | None) -> None:
        pos = self.positions
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


@dataclass
class TeacherSequence:
    ids: torch.Tensor  # [S] int64
    hidden: torch.Tensor  # [S, L*E] float16: target outputs after the fused layers at each position
    query_positions: torch.Tensor  # [Q] int64, sorted
    attention: torch.Tensor  # [H, Q, S] float16: layer-mean attention over past positions
    answer_from: int = -1  # first query position that produces the model's answer (-1: none, plain text)



@torch.no_grad()  # not inference_mode: the returned tensors feed training
def teacher_sequence(model, ids: list[int], cfg: DistillConfig, chunk_tokens: int, seed: int,
                     answer_tokens: int = 0, stop_ids: frozenset[int] = frozenset()) -> TeacherSequence:
    """Run the target over ``ids`` once and record what the head learns from (see the module docstring).

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
    cache = DenseKVCache(mcfg.num_layers, 1, mcfg.num_kv_heads, mcfg.head_dim, capacity, model.dtype, model.device)
    probe = TeacherProbe(mcfg.num_heads, capacity, model.device, qpos)
    layers = cfg.hidden_layers
    hidden = torch.empty(capacity, len(layers) * mcfg.hidden_size, dtype=torch.float16)
    seq = list(ids)

    def run(part: list[int], logits_for: str) -> torch.Tensor:
        start = cache.seq_lens[0]
        x = torch.tensor([part], dtype=torch.int64, device=model.device)
        captured: dict = {}
        logits = model(x, probe.for_chunk(cache.plan_step([len(part)])), cache, logits_for=logits_for,
                       capture_layers=layers, captured=captured)
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


def save_teacher(seq: TeacherSequence, path: str) -> None:
    """Write ``seq`` to the safetensors file ``path``, through ``path.partial`` (a crash leaves no torn file)."""
    from safetensors.torch import save_file

    save_file({"ids": seq.ids, "hidden": seq.hidden, "query_positions": seq.query_positions,
               "attention": seq.attention, "answer_from": torch.tensor([seq.answer_from])}, path + ".partial")
    os.replace(path + ".partial", path)


def load_teacher(path: str) -> TeacherSequence:
    """The sequence :func:`save_teacher` wrote (files from before tasks existed have no ``answer_from``)."""
    from safetensors.torch import load_file

    t = load_file(path)
    answer_from = int(t["answer_from"][0]) if "answer_from" in t else -1
    return TeacherSequence(t["ids"], t["hidden"], t["query_positions"], t["attention"], answer_from)

