"""Stage 2, training, and the artefact: :func:`distill` runs the three stages end to end.

Shape letters: S tokens in a sequence, Q query positions, G target KV heads.

Work lives in ``OUTPUT.work/``, so an interrupted run resumes where it stopped: one teacher file
per sequence (:mod:`.teacher`, :mod:`.task_data`), and a training checkpoint (head weights, Adam
moments and the step, as safetensors + JSON, never pickle) saved every minute and at the end.
The head is saved with :func:`specontext.retrieval.head.save_head`; its ``quality`` holds the
held-out recall (:mod:`.objective`) and what it was trained and measured on.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict

import torch

from ...errors import InputError
from ...retrieval import tasks
from ...retrieval.head import RetrievalHead, RetrievalHeadConfig, save_head
from .config import DistillConfig, text_sequences, train_starts
from .objective import distill_loss, evaluate, group_target, head_scores
from .task_data import TaskPool, task_sequences
from .teacher import TeacherSequence, answer_queries, load_teacher, query_weights, save_teacher, teacher_sequence


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


def _fit(head: RetrievalHead, embed: torch.nn.Module, seqs: list[TeacherSequence], cfg: DistillConfig,
         ckpt: str, progress: bool, log) -> float | None:
    """Adam with cosine decay over ``cfg.steps`` steps, one random sequence per step; resumes from
    (and saves to) the checkpoint ``ckpt``. Returns the running mean of the loss (None if no step ran)."""
    from tqdm import tqdm

    G = head.config.num_kv_heads
    weights = [query_weights(seq, cfg.answer_weight) for seq in seqs]
    opt = torch.optim.Adam(head.parameters(), lr=cfg.lr)
    step, loss_avg = 0, None
    if os.path.exists(ckpt + ".json") and os.path.exists(ckpt + ".safetensors"):
        step, loss_avg = _load_checkpoint(head, opt, ckpt)
        log(f"resuming training at step {step} of {cfg.steps} from {ckpt}.safetensors")
    targets = [group_target(s.attention, G, cfg.target_aggregate) for s in seqs]
    bar = tqdm(total=cfg.steps, initial=step, desc="train", unit="step", disable=not progress)
    last_save = time.monotonic()
    while step < cfg.steps:
        g = torch.Generator().manual_seed(cfg.seed * 7919 + step)
        i = int(torch.randint(len(seqs), (1,), generator=g))
        seq = seqs[i]
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
    return loss_avg


def distill(llm, text: str, output: str, cfg: DistillConfig, restart: bool = False,
            progress: bool = True, log=print, text_label: str = "text") -> tuple[str, dict]:
    """Train a head for ``llm`` (a loaded ``specontext.LLM``) on ``text``; save it at ``output``.

    Args:
        llm: the target model, loaded (the teacher runs on its device, in its dtype).
        text: training text; its first ``cfg.holdout_tokens`` tokens are held out for measuring.
        output: artefact stem (a trailing ``.json`` is dropped); writes STEM.safetensors and
            STEM.json, and keeps its work (teacher data, checkpoints) in ``STEM.work/`` so an
            interrupted run resumes where it stopped.
        cfg: what to train and on what.
        restart: discard ``STEM.work/`` first.
        progress: show progress bars; ``log`` takes one-line notes (resuming, dtype).
        text_label: names the text in the saved split record.
    Returns:
        (config path, quality dict): the held-out recall by budget for the head, the global
        oracle and StreamingLLM, and what the head was trained and measured on.
    Raises:
        InputError: the text is too short for one held-out and one training sequence, or the
            head's query heads do not divide into the model's KV groups.

    Example::

        path, quality = distill(specontext.load(), essays, "heads/smollm2", DistillConfig(steps=300))
    """
    from tqdm import tqdm

    model, target = llm.model, llm.target
    mcfg = model.config
    if model.device.type != "cpu" and model.dtype != torch.float32:
        log("note: the teacher runs in the model's dtype; float32 gives the cleanest targets")
    ids = llm.tokenizer.encode(text, add_bos=False)
    trains, evals = text_sequences(ids, cfg)
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
            save_teacher(seq, path)
        loaded[kind].append(load_teacher(path))
    task_records, pools = task_sequences(llm, ids, cfg, target.fingerprint, text_digest, work, progress)
    loaded["train"] += [seq for seq, _ in task_records["train"]]

    # 2. training
    torch.manual_seed(cfg.seed)
    head = RetrievalHead(head_cfg).float().train()
    embed = model.model.embed_tokens
    loss_avg = _fit(head, embed, loaded["train"], cfg, os.path.join(work, f"checkpoint-{cfg.train_key(key)}"),
                    progress, log)

    # 3. quality on held-out text
    head.eval()
    recall = evaluate(head, embed, loaded["eval"], cfg, G)
    quality = {"recall_heldout": recall, "train_kl": round(loss_avg or 0.0, 4),
               "distill": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
               "train_tokens": sum(len(t.ids) for t in loaded["train"]),
               "heldout_tokens": f"first {cfg.holdout_tokens} tokens of the text",
               "training_data": _split_record(text_label, text_digest, len(ids), cfg,
                                              train_starts(len(ids), cfg), pools, task_records)}
    answering = [answer_queries(seq) for seq, _ in task_records["eval"]]
    answering = [seq for seq in answering if len(seq.query_positions)]
    if answering:
        quality["recall_answer_heldout"] = evaluate(head, embed, answering, cfg, G)
    final = RetrievalHead(RetrievalHeadConfig.from_dict({**head_cfg.to_dict(), "quality": quality}))
    final.load_state_dict(head.state_dict())
    paths = save_head(final, stem, dtype=torch.float16)
    return paths[1], quality

