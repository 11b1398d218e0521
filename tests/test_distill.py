"""specontext-distill on a tiny model: teacher targets against transformers, training, resume, artefact."""

from __future__ import annotations

import json
import math

import pytest
import torch

import specontext
from specontext.retrieval.head import load_head
from specontext.tools.distill import (DistillConfig, distill, distill_loss, evaluate, group_target, head_scores,
                                      main, selection_recall, teacher_sequence)

from conftest import make_hf_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill")
    hf = make_hf_model("llama", str(root / "m"), max_position_embeddings=256, num_hidden_layers=3)
    llm = specontext.load(str(root / "m"), device="cpu", prefill_chunk_tokens=24)
    words = [f"w{3 + (i * 7919 + i // 5) % 93}" for i in range(700)]
    return {"root": root, "hf": hf, "llm": llm, "text": " ".join(words)}


def small_config(**over) -> DistillConfig:
    base = dict(seq_tokens=64, max_sequences=4, holdout_tokens=128, eval_sequences=2, queries_per_sequence=12,
                min_query_position=16, hidden_layers=(0, 1), steps=40, lr=5e-3, eval_budgets=(16, 32),
                sink_tokens=2, window_tokens=4)
    base.update(over)
    return DistillConfig(**base)


def test_teacher_attention_matches_transformers_attentions(tiny):
    llm, hf = tiny["llm"], tiny["hf"]
    ids = llm.tokenizer.encode(tiny["text"], add_bos=False)[:64]
    cfg = small_config()
    seq = teacher_sequence(llm.model, ids, cfg, chunk_tokens=24, seed=1)
    hf.config._attn_implementation = "eager"
    with torch.no_grad():
        out = hf(torch.tensor([ids]), output_attentions=True, output_hidden_states=True)
    per_layer = []
    for att in out.attentions:  # [1, H, n, n]
        a = att[0][:, seq.query_positions]  # [H, Q, n]
        past = torch.arange(64)[None, :] < seq.query_positions[:, None]
        a = a * past[None]
        per_layer.append(a / a.sum(-1, keepdim=True))
    expected = torch.stack(per_layer).mean(0)
    assert (seq.attention.float() - expected).abs().max() <= 2e-3  # stored as float16
    hidden = torch.cat([out.hidden_states[1][0], out.hidden_states[2][0]], dim=-1)
    assert (seq.hidden.float() - hidden).abs().max() <= 2e-2 * hidden.abs().max()


def test_recall_of_the_group_mean_oracle_is_optimal_and_hand_checked():
    att = torch.tensor([[[0.5, 0.45, 0.05, 0.0]], [[0.0, 0.45, 0.55, 0.0]]])  # [H=2, Q=1, S=4], query at 3
    qpos = torch.tensor([3])
    # group mean [0.25, 0.45, 0.30] keeps {1, 2}: (0.5 + 1.0) / 2; group max [0.5, 0.45, 0.55] keeps {0, 2}
    assert selection_recall(att, group_target(att, 1, "mean"), 2, 0, 0, qpos) == pytest.approx(0.75)
    assert selection_recall(att, group_target(att, 1, "max"), 2, 0, 0, qpos) == pytest.approx(0.55)
    # streaming with a budget of one token keeps the most recent: (0.05 + 0.55) / 2
    assert selection_recall(att, torch.zeros(1, 1, 4), 1, 0, 1, qpos) == pytest.approx(0.3)


def test_middle_loss_region_ignores_sinks_and_window_and_is_hand_checked():
    # one group, S = 10, sinks = 2, window = 3: at query 9 the region is positions 2..5, at query 4 empty
    qpos = torch.tensor([9, 4])
    target = torch.zeros(1, 2, 10)
    target[0, 0] = torch.tensor([0.3, 0.1, 0.1, 0.0, 0.1, 0.0, 0.1, 0.2, 0.1, 0.0])
    target[0, 1, :4] = torch.tensor([0.1, 0.2, 0.3, 0.4])
    student = target.clone()
    # the student differs from the target only on sinks and window at query 9, everywhere at query 4
    student[0, 0, [0, 1, 6, 7, 8]] = torch.tensor([0.05, 0.05, 0.3, 0.1, 0.2])
    student[0, 1, :4] = torch.tensor([0.4, 0.3, 0.2, 0.1])
    weights = torch.ones(2)
    assert distill_loss(target, student, qpos, weights, "all", 2, 3) > 0.05
    assert distill_loss(target, student, qpos, weights, "middle", 2, 3) == pytest.approx(0.0, abs=1e-6)
    # inside the region both are renormalised: target (0.5, 0, 0.5, 0), student (0.25, 0, 0.75, 0);
    # the query with an empty region has weight 0, so the loss is that one query's KL
    student[0, 0, [2, 4]] = torch.tensor([0.05, 0.15])
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert distill_loss(target, student, qpos, weights, "middle", 2, 3) == pytest.approx(expected, rel=1e-5)
    # the scale of the student's scores does not matter (it is renormalised)
    assert distill_loss(target, 3 * student, qpos, weights, "middle", 2, 3) == pytest.approx(expected, rel=1e-5)
    assert DistillConfig(loss_region="all").train_key("t") != DistillConfig().train_key("t")
    with pytest.raises(ValueError, match="loss region"):
        distill_loss(target, student, qpos, weights, "edges", 2, 3)


def test_distill_trains_resumes_and_saves_a_head_auto_can_find(tiny, monkeypatch, capsys):
    llm, root = tiny["llm"], tiny["root"]
    out = str(root / "heads" / "tiny")
    path, q1 = distill(llm, tiny["text"], out, small_config(steps=10), progress=False, log=lambda m: None)
    logs = []
    path, quality = distill(llm, tiny["text"], out, small_config(steps=60), progress=False, log=logs.append)
    assert any("resuming training at step 10" in m for m in logs)
    head = load_head(path, target=llm.target)
    assert head.config.source == "distilled" and head.config.hidden_layers == (0, 1)
    recall = quality["recall_heldout"]
    assert set(recall) == {"head", "oracle_global", "streaming"}
    for b in (16, 32):
        assert 0 < recall["streaming"][b] <= recall["oracle_global"][b] + 1e-6 <= 1 + 1e-6
        assert 0 < recall["head"][b] <= recall["oracle_global"][b] + 1e-6
    # training moved the head toward the teacher: its held-out recall beats the untrained head's
    cfg = small_config()
    ids = llm.tokenizer.encode(tiny["text"], add_bos=False)
    evals = [teacher_sequence(llm.model, ids[i * 64:(i + 1) * 64], cfg, 24, seed=50000 + i) for i in range(2)]
    torch.manual_seed(0)
    fresh = type(head)(head.config)
    before = evaluate(fresh, llm.model.model.embed_tokens, evals, cfg, llm.config.num_kv_heads)["head"][16]
    after = evaluate(head, llm.model.model.embed_tokens, evals, cfg, llm.config.num_kv_heads)["head"][16]
    assert after > before
    assert q1["recall_heldout"]["head"] is not None

    monkeypatch.setenv("SPECONTEXT_HEAD_DIR", str(root / "heads"))
    llm.set_sparsity(sparsity="specontext", retrieval_head="auto", budget_tokens=20, sink_tokens=2, window_tokens=4)
    assert llm.retrieval_head is not None
    result = llm.generate(ids[:100], max_new_tokens=5, ignore_eos=True)
    assert result.stats.sparsity["sparse_steps"] == 4
    llm.set_sparsity(sparsity="dense")


def test_head_scores_are_a_distribution_over_the_past(tiny):
    llm = tiny["llm"]
    ids = llm.tokenizer.encode(tiny["text"], add_bos=False)[:64]
    seq = teacher_sequence(llm.model, ids, small_config(), 24, seed=3)
    from specontext.retrieval.head import RetrievalHead, RetrievalHeadConfig

    cfg = RetrievalHeadConfig(target=llm.target, input_kind="embedding+hidden", hidden_layers=(0, 1), num_heads=2,
                              num_kv_heads=2, head_dim=8, kv_group_of_head=(0, 1))
    scores = head_scores(RetrievalHead(cfg), llm.model.model.embed_tokens, seq)
    past = torch.arange(64)[None, :] < seq.query_positions[:, None]
    assert (scores * ~past[None]).abs().max() == 0
    assert ((scores.amax(-1) > 0) & (scores.amax(-1) <= 1)).all()


def test_cli_errors_are_one_line(tiny, capsys):
    rc = main(["--model", str(tiny["root"] / "m"), "--steps", "0"])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and "--steps must be >= 1" in err
    text = tiny["root"] / "short.txt"
    text.write_text("w3 w4 w5")
    rc = main(["--model", str(tiny["root"] / "m"), "--text", str(text), "--output", str(tiny["root"] / "x"),
               "--quiet"])
    err = capsys.readouterr().err
    assert rc == 1 and "distillation needs at least" in err and err.count("\n") == 1


def test_task_examples_query_the_positions_that_produce_the_models_own_answer(tiny):
    """A task example is a document with a question and the model's own greedy answer; the head
    learns the attention at the positions that produce the answer, plus sampled reading ones."""
    from specontext.tools.distill import TaskPool, query_weights, task_teacher_sequence

    llm = tiny["llm"]
    ids = llm.tokenizer.encode(tiny["text"], add_bos=False)
    cfg = small_config(seq_tokens=200, answer_tokens=6, queries_per_sequence=10)
    pools = [TaskPool("text", ids[128:], 128)]
    for kind in ("needle", "kv", "vt", "passage"):
        seq, record = task_teacher_sequence(llm, kind, pools, cfg, seed=3)
        again, record2 = task_teacher_sequence(llm, kind, pools, cfg, seed=3)
        assert torch.equal(seq.ids, again.ids) and record == record2  # a seed is one example
        S, P = len(seq.ids), record["prompt_tokens"]
        assert S <= cfg.seq_tokens and S - P == record["answer_tokens"] <= cfg.answer_tokens
        assert seq.answer_from == P - 1 and 128 <= record["haystack_tokens"][0] < record["haystack_tokens"][1]
        assert set(range(P - 1, min(P - 1 + cfg.answer_tokens, S))) <= set(seq.query_positions.tolist())
        assert len(seq.query_positions) == 10
        assert seq.query_positions.tolist() == sorted(set(seq.query_positions.tolist()))
        # the answer is the model's own greedy continuation of the prompt (transformers-free reference:
        # the engine's teacher-forced logits, a separate dense path)
        prompt, answer = seq.ids[:P].tolist(), seq.ids[P:].tolist()
        if answer:
            logits, _ = llm.engine.teacher_forced(prompt, answer)
            assert logits.argmax(-1).tolist() == answer
        assert torch.allclose(seq.attention.float().sum(-1), torch.ones(seq.attention.shape[:2]), atol=1e-2)
        # the answer-producing queries carry the answer weight, reading queries 1
        w = query_weights(seq, 4.0)
        assert w.tolist() == [4.0 if q >= P - 1 else 1.0 for q in seq.query_positions.tolist()]
    text_seq = teacher_sequence(llm.model, ids[:64], cfg, 24, seed=1)
    assert text_seq.answer_from == -1 and query_weights(text_seq, 4.0).tolist() == [1.0] * 10


def test_answer_weights_scale_each_querys_kl():
    # two queries with different KLs: the weighted loss is their weighted mean (hand-computed)
    qpos = torch.tensor([3, 3])
    target = torch.tensor([[[0.5, 0.5, 0.0, 0.0], [0.9, 0.1, 0.0, 0.0]]])  # [G=1, Q=2, S=4]
    student = torch.tensor([[[0.5, 0.5, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0]]])
    kl1 = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)
    assert distill_loss(target, student, qpos, torch.tensor([1.0, 1.0]), "all", 0, 0) == pytest.approx(kl1 / 2)
    assert distill_loss(target, student, qpos, torch.tensor([1.0, 3.0]), "all", 0, 0) == pytest.approx(3 * kl1 / 4)


def test_task_mix_is_parsed_and_bad_input_refused_in_one_line(tiny, capsys):
    from specontext.tools.distill import parse_task_mix

    assert parse_task_mix("needle:8, kv:4,vt:0,") == (("needle", 8), ("kv", 4))
    assert parse_task_mix("") == ()
    for bad, message in (("needles:2", "kind must be one of needle, kv, vt, passage"),
                         ("needle", "KIND:COUNT"), ("kv:-1", "KIND:COUNT"), ("kv:two", "KIND:COUNT"),
                         ("vt:1,vt:2", "names 'vt' twice")):
        rc = main(["--model", str(tiny["root"] / "m"), "--task-mix", bad, "--quiet"])
        err = capsys.readouterr().err
        assert rc == 1 and err.count("\n") == 1 and message in err, (bad, err)
    for bad in ("5:3", "10", "a:b"):
        rc = main(["--model", str(tiny["root"] / "m"), "--skip-tokens", bad, "--quiet"])
        err = capsys.readouterr().err
        assert rc == 1 and err.count("\n") == 1 and "--skip-tokens" in err, (bad, err)


def test_distill_with_tasks_saves_the_training_data_split(tiny):
    llm, root = tiny["llm"], tiny["root"]
    cfg = small_config(seq_tokens=128, holdout_tokens=256, steps=8, task_mix=(("needle", 2), ("kv", 1)),
                       answer_tokens=4, answer_weight=3.0, skip_tokens=(384, 448))
    path, quality = distill(llm, tiny["text"], str(root / "heads-tasks" / "t"), cfg, progress=False,
                            log=lambda m: None, text_label="tiny words")
    record = load_head(path, target=llm.target).config.quality["training_data"]
    assert record == json.loads(json.dumps(quality["training_data"]))
    text = record["text"]
    assert text["source"] == "tiny words" and text["heldout_tokens"] == [0, 256] and text["skipped_tokens"] == [384, 448]
    # text sequences: after the held-out tokens, none overlapping the skipped range
    assert text["train_sequences"] == [[256, 384], [448, 576]]
    t = record["tasks"]
    assert t["mix"] == {"needle": 2, "kv": 1} and t["answer_weight"] == 3.0 and t["version"]
    assert t["haystacks"]["text"]["tokens"][0] == 448 and t["haystacks"]["pydoc"]["tokens"][0] == 60_000
    assert [e["kind"] for e in t["examples"]] == ["needle", "needle", "kv"]
    for e in t["examples"]:
        lo = 448 if e["haystack"] == "text" else 60_000
        assert lo <= e["haystack_tokens"][0] < e["haystack_tokens"][1]
    held = t["heldout"]["examples"]
    assert [e["kind"] for e in held] == ["needle", "kv"] and all(e["haystack_tokens"][1] <= 256 for e in held)
    assert len({e["seed"] for e in t["examples"] + held}) == 5
    recall = quality["recall_answer_heldout"]
    assert set(recall) == {"head", "oracle_global", "streaming"} and 0 < recall["head"][16] <= 1
