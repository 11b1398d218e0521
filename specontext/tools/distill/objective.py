"""Stages 2 and 3, the objective: what the head is fitted to, and how its choice is measured.

Shape letters: S tokens in a sequence, Q query positions, H target query heads, G target KV heads
(the head's query heads vote per G group, as selection does).

* **Target.** Per KV group, the *mean* over the group's query heads of the teacher's layer-mean
  attention (:func:`group_target`). For the recall measured here (mean over layers and heads of
  the attention mass on a shared per-group set) the best possible set is exactly the top-B of that
  mean, so it is what the head should rank by; ``"max"`` gives the paper's group max instead.
* **Loss.** KL divergence of the head's per-group distribution (normalised max over its query
  heads) from the target, over a loss region (:func:`distill_loss`). ``"middle"`` keeps only
  ``sink_tokens <= p < q - window_tokens``, the positions selection actually has to rank (sinks
  and the recent window are always kept): most of the teacher's mass sits on the sinks and the
  window (63% for SmolLM2-135M on 8k-token text, 27% on the 4 sinks), so under ``"all"`` the KL
  spends much of the head's capacity on positions whose ranking never changes what is kept.
* **Quality.** The recall of the head's top-B choice at several budgets, next to the global oracle
  and StreamingLLM (:func:`evaluate`).
"""

from __future__ import annotations

import torch

from ...retrieval.head import RetrievalHead
from .config import DistillConfig
from .teacher import TeacherSequence


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

