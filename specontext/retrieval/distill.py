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
3. **Quality.** On held-out sequences (by default the first tokens of the text, which training
   skips, so the accuracy harness evaluates on text the head never saw), the recall of the head's
   selection at several budgets next to the global oracle and StreamingLLM; saved in the
   artefact's ``quality``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass

import torch

from ..errors import InputError, SpecontextError
from ..kv.cache import DenseKVCache
from .head import RetrievalHead, RetrievalHeadConfig, save_head, user_head_dir

EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130


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
    qa_sequences: int = 0
    qa_answer_tokens: int = 20
    qa_answer_weight: float = 1.0
    loss_region: str = "middle"

    def train_key(self, teacher_key: str) -> str:
        """Checkpoints resume only a run with the same data and training settings (--steps may grow)."""
        fields = (teacher_key, self.num_heads, self.head_dim, self.lr, self.target_aggregate, self.qa_sequences,
                  self.qa_answer_tokens, self.qa_answer_weight)
        if self.loss_region != "all":  # appended only when set, so existing "all" checkpoints keep their key
            fields += (self.loss_region, self.sink_tokens, self.window_tokens)
        return hashlib.sha256(repr(fields).encode()).hexdigest()[:16]

    def teacher_key(self, fingerprint: str, text_digest: str) -> str:
        fields = (fingerprint, text_digest, self.seq_tokens, self.max_sequences, self.holdout_tokens,
                  self.eval_sequences, self.queries_per_sequence, self.min_query_position, self.hidden_layers,
                  self.seed)
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


def _sequences(ids: list[int], cfg: DistillConfig) -> tuple[list[list[int]], list[list[int]]]:
    """Held-out evaluation sequences from the start of the text, training sequences after it."""
    n = cfg.seq_tokens
    holdout = ids[:cfg.holdout_tokens]
    evals = [holdout[i:i + n] for i in range(0, len(holdout) - n + 1, n)][:cfg.eval_sequences]
    rest = ids[cfg.holdout_tokens:]
    trains = [rest[i:i + n] for i in range(0, len(rest) - n + 1, n)][:cfg.max_sequences]
    return trains, evals


@torch.no_grad()  # not inference_mode: the returned tensors feed training
def teacher_sequence(model, ids: list[int], cfg: DistillConfig, chunk_tokens: int, seed: int,
                     query_positions: torch.Tensor | None = None) -> TeacherSequence:
    """Run the target over ``ids`` once and record what the head learns from (see module docstring).

    Query positions are sampled from the sequence unless given ([Q] int64, sorted, unique)."""
    mcfg = model.config
    S = len(ids)
    if query_positions is None:
        g = torch.Generator().manual_seed(seed)
        span = S - cfg.min_query_position
        num_q = min(cfg.queries_per_sequence, span)
        qpos = (cfg.min_query_position + torch.randperm(span, generator=g)[:num_q]).sort().values
    else:
        qpos = query_positions
    probe = TeacherProbe(mcfg.num_layers, mcfg.num_kv_heads, mcfg.head_dim, S, model.dtype, model.device,
                         mcfg.num_heads, qpos)
    layers = cfg.hidden_layers
    hidden = torch.empty(S, len(layers) * mcfg.hidden_size, dtype=torch.float16)
    for start in range(0, S, chunk_tokens):
        part = ids[start:start + chunk_tokens]
        x = torch.tensor([part], dtype=torch.int64, device=model.device)
        captured: dict = {}
        model(x, probe.plan_step([len(part)]), probe, logits_for="none", capture_layers=layers, captured=captured)
        hidden[start:start + len(part)] = torch.cat([captured[i][0] for i in layers], dim=-1).to(torch.float16).cpu()
    attention = (probe.probs_sum / mcfg.num_layers).to(device="cpu", dtype=torch.float16)
    return TeacherSequence(torch.tensor(ids), hidden, qpos, attention)


# Retrieval-style training examples. Text continuation alone teaches the head where the model
# looks while reading; answering a question about one fact buried in a long document needs the
# few layers that retrieve it, which the layer mean of plain reading underweights (measured: the
# head trained on text alone passed 1-3 of 11 needle depths where dense passed 8-9). These
# synthetic facts and questions (none is the benchmark's needle) put the model in that mode.
_QA_TEMPLATES = (
    ("The secret ingredient in {person}'s famous soup is {thing}.",
     "What is the secret ingredient in {person}'s famous soup?"),
    ("{person} keeps the spare key to the workshop {place}.", "Where does {person} keep the spare key to the workshop?"),
    ("The password for the {org} archive is {word}.", "What is the password for the {org} archive?"),
    ("{person}'s first job was {job}.", "What was {person}'s first job?"),
    ("The {org} meeting was moved to {day} because {reason}.", "Why was the {org} meeting moved to {day}?"),
    ("The most useful advice {person} ever got was to {advice}.", "What was the most useful advice {person} ever got?"),
)
_QA_FILL = {
    "person": ("Marta Kowalski", "Tomas Lindqvist", "Aiko Tanaka", "Rafael Ortiz", "Nadia Haddad", "Ben Okafor",
               "Ingrid Solberg", "Priya Raman"),
    "thing": ("smoked paprika", "a spoon of honey", "roasted fennel seeds", "lemon zest", "a pinch of cinnamon"),
    "place": ("under the blue flowerpot", "inside an old tea tin", "behind the calendar", "in the left boot"),
    "org": ("chess club", "harbour museum", "robotics society", "city choir", "film archive"),
    "word": ("marigold", "copperfield", "tangerine", "northwind", "basilisk"),
    "job": ("delivering newspapers", "washing dishes at a diner", "teaching swimming", "repairing bicycles"),
    "day": ("Thursday", "Monday", "Saturday"),
    "reason": ("the roof was leaking", "the projector broke", "the speaker missed her train"),
    "advice": ("write every day before breakfast", "ask the question nobody else will", "finish what you start",
               "read the manual first"),
}


def _qa_example(llm, ids: list[int], length: int, g: torch.Generator) -> tuple[list[int], str, str]:
    """(chat prompt ids, fact, question): ``length`` tokens of ``ids`` with a fact at a random depth."""
    fact_t, question_t = _QA_TEMPLATES[int(torch.randint(len(_QA_TEMPLATES), (1,), generator=g))]
    fill = {k: v[int(torch.randint(len(v), (1,), generator=g))] for k, v in _QA_FILL.items()}
    fact, question = fact_t.format(**fill), question_t.format(**fill)
    start = int(torch.randint(max(len(ids) - length, 1), (1,), generator=g))
    doc_ids = ids[start:start + length]
    cut = int(len(doc_ids) * float(torch.rand((), generator=g)))
    before, after = llm.tokenizer.decode(doc_ids[:cut]), llm.tokenizer.decode(doc_ids[cut:])
    stop = before.rfind(". ")
    if stop > 0:
        before, after = before[:stop + 1], before[stop + 1:] + after
    prompt = llm.encode_prompt(f"{before} {fact} {after}\n\n{question} Answer in one sentence.")
    return prompt, fact, question


@torch.no_grad()
def qa_teacher_sequence(llm, ids: list[int], cfg: DistillConfig, seed: int) -> TeacherSequence:
    """A retrieval example: a fact in a document, a question, and the model's own greedy answer;
    the queries are the positions that produce the answer, plus sampled ones."""
    from ..retrieval.selection import SparsityOptions
    from ..settings import GenerationConfig

    g = torch.Generator().manual_seed(seed)
    room = cfg.seq_tokens - cfg.qa_answer_tokens - 64
    length = int(torch.randint(min(1024, room), room + 1, (1,), generator=g))
    prompt, _, _ = _qa_example(llm, ids, length, g)
    prompt = prompt[-(cfg.seq_tokens - cfg.qa_answer_tokens - 1):]
    run = llm.engine.generate(prompt, GenerationConfig(max_new_tokens=cfg.qa_answer_tokens),
                              sparsity=SparsityOptions())
    for _ in run:
        pass
    answer = run.result().token_ids
    seq = prompt + answer
    answer_q = torch.arange(len(prompt) - 1, len(seq) - 1)
    others = cfg.min_query_position + torch.randperm(len(prompt) - 1 - cfg.min_query_position, generator=g)
    qpos = torch.cat([answer_q, others[:max(cfg.queries_per_sequence - len(answer_q), 0)]]).unique().sort().values
    return teacher_sequence(llm.model, seq, cfg, llm.settings.prefill_chunk_tokens, seed, query_positions=qpos)


def _save_teacher(seq: TeacherSequence, path: str) -> None:
    from safetensors.torch import save_file

    save_file({"ids": seq.ids, "hidden": seq.hidden, "query_positions": seq.query_positions,
               "attention": seq.attention}, path + ".partial")
    os.replace(path + ".partial", path)


def _load_teacher(path: str) -> TeacherSequence:
    from safetensors.torch import load_file

    t = load_file(path)
    return TeacherSequence(t["ids"], t["hidden"], t["query_positions"], t["attention"])


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


def distill(llm, text: str, output: str, cfg: DistillConfig, restart: bool = False,
            progress: bool = True, log=print) -> tuple[str, dict]:
    """Train a head for ``llm`` (a loaded ``specontext.LLM``) on ``text``; save it at ``output``.

    Returns (config path, quality dict). Work (teacher data, checkpoints) lives in
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
    if cfg.qa_sequences:
        # one file per example, keyed without the count, so asking for more examples keeps the first ones
        qa_key = hashlib.sha256(repr((key, cfg.qa_answer_tokens, "qa-v1")).encode()).hexdigest()[:16]
        train_ids = ids[cfg.holdout_tokens:]
        for i in tqdm(range(cfg.qa_sequences), desc="teacher (questions)", unit="seq", disable=not progress):
            path = os.path.join(work, f"teacher-{qa_key}-qa{i:03d}.safetensors")
            if not os.path.exists(path):
                _save_teacher(qa_teacher_sequence(llm, train_ids, cfg, seed=cfg.seed * 100003 + 90000 + i), path)
            loaded["train"].append(_load_teacher(path))
    num_text = len(loaded["train"]) - cfg.qa_sequences
    # per-query loss weights: the queries that produce a QA example's answer may count more
    weights = []
    for i, seq in enumerate(loaded["train"]):
        w = torch.ones(len(seq.query_positions))
        if i >= num_text:
            w[seq.query_positions >= len(seq.ids) - 1 - cfg.qa_answer_tokens] = cfg.qa_answer_weight
        weights.append(w)

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
               "heldout_tokens": f"first {cfg.holdout_tokens} tokens of the text"}
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
    p.add_argument("--qa-sequences", type=int, default=d.qa_sequences,
                   help="also train on this many question-answering examples: a synthetic fact put in a stretch "
                        "of the training text, a question about it, and the model's own answer, whose attention "
                        "while answering the head learns (retrieval, as in needle-in-a-haystack prompts)")
    p.add_argument("--qa-answer-weight", type=float, default=d.qa_answer_weight,
                   help="loss weight of the queries that produce a question-answering example's answer")
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
        from .. import assets
        from ..api import load

        for name in ("seq_tokens", "max_sequences", "queries_per_sequence", "steps", "eval_sequences"):
            if getattr(args, name) < 1:
                raise InputError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
        if args.num_heads < 0 or args.head_dim < 0:
            raise InputError("--num-heads and --head-dim must be >= 0 (0: the model's)")
        if args.qa_sequences < 0:
            raise InputError(f"--qa-sequences must be >= 0, got {args.qa_sequences}")
        if not (args.qa_answer_weight > 0 and math.isfinite(args.qa_answer_weight)):
            raise InputError(f"--qa-answer-weight must be a positive number, got {args.qa_answer_weight}")
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
                            qa_sequences=args.qa_sequences, qa_answer_weight=args.qa_answer_weight,
                            loss_region=args.loss_region)
        name = os.path.splitext(os.path.basename(os.path.normpath(llm.path)))[0].lower()
        output = args.output or os.path.join(user_head_dir(), f"{name}-{llm.target.fingerprint[:12]}")
        t0 = time.perf_counter()
        path, quality = distill(llm, text, output, cfg, restart=args.restart, progress=not args.quiet,
                                log=lambda m: print(m, file=sys.stderr))
        recall = quality["recall_heldout"]
        print(f"saved {path} ({time.perf_counter() - t0:.0f} s)")
        print("held-out recall by budget: " + ", ".join(
            f"B={b}: head {recall['head'][b]:.3f} / global oracle {recall['oracle_global'][b]:.3f} / "
            f"streaming {recall['streaming'][b]:.3f}" for b in cfg.eval_budgets))
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
