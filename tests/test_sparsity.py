"""Sparse decode against independent references.

* End to end: a decode step that attends only to chosen tokens must equal Hugging Face
  transformers run over the whole sequence with an attention mask allowing exactly those tokens
  (per query head, SDPA), for SpeContext's per-KV-head choice and for StreamingLLM.
* The retrieval head's K cache and scores must equal the head applied to hidden states that
  transformers reports (``output_hidden_states``), prompt and generated tokens alike.
* A budget at or above the context gives exactly the dense result for every method.
* Oracle, Quest and selection bookkeeping are checked by what matters: attention mass captured.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

import specontext
from specontext.errors import InputError
from specontext.retrieval.recall import past_attention
from specontext.methods import METHODS
from specontext.retrieval.selection import SparsityOptions

from conftest import make_hf_model, recording_selections, tiny_sparse_setup

PREFIX, TOTAL = 80, 120


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny GQA llama (6 query heads, 2 KV heads), its transformers twin, and a random head."""
    return tiny_sparse_setup(tmp_path_factory.mktemp("sparse"), TOTAL)


def _mask_from_record(record, prefix_len, n, num_heads, num_kv_heads):
    """[H, n, n] bool: causal for the prompt; each decode row allows what that step chose."""
    mask = torch.tril(torch.ones(n, n, dtype=torch.bool))[None].repeat(num_heads, 1, 1)
    for step, chosen in enumerate(record):
        if chosen is None:
            continue
        p = prefix_len + step
        for h in range(num_heads):
            row = torch.zeros(n, dtype=torch.bool)
            row[chosen[0, h // (num_heads // num_kv_heads)]] = True
            mask[h, p] = row
    return mask


def _hf_logits(hf, ids, mask):
    hf.config._attn_implementation = "sdpa"
    with torch.no_grad():
        return hf(torch.tensor([ids]), attention_mask=mask[None]).logits[0]


@pytest.mark.parametrize("method", ["specontext", "streaming"])
def test_sparse_decode_equals_transformers_with_the_same_tokens_masked_in(tiny, method):
    llm, hf, ids = tiny["llm"], tiny["hf"], tiny["ids"]
    llm.set_sparsity(sparsity="specontext", retrieval_head=tiny["head_path"])
    opts = SparsityOptions(method=method, budget_tokens=30, sink_tokens=2, window_tokens=4)
    record, restore = recording_selections(llm)
    try:
        logits, selector = llm.engine.teacher_forced(ids[:PREFIX], ids[PREFIX:], sparsity=opts)
    finally:
        restore()
    assert selector.stats.sparse_steps == TOTAL - PREFIX - 1
    H, G = llm.config.num_heads, llm.config.num_kv_heads
    n = len(ids)
    for step, p in enumerate(range(PREFIX, n - 1)):
        chosen = record[step]  # [1, G, K + 1], the current position last
        assert chosen.shape == (1, G, opts.budget_tokens + 1)
        assert (chosen[0, :, -1] == p).all() and (chosen[0, :, :-1] < p).all()
        for g in range(G):
            assert len(set(chosen[0, g].tolist())) == opts.budget_tokens + 1  # K distinct past tokens
    mask = _mask_from_record(record, PREFIX, n, H, G)
    expected = _hf_logits(hf, ids, mask)
    assert (logits[0] - expected[PREFIX - 1]).abs().max() <= 1e-4  # prefill stays exact
    assert (logits[1:] - expected[PREFIX:n - 1]).abs().max() <= 1e-4
    dense = _hf_logits(hf, ids, torch.tril(torch.ones(n, n, dtype=torch.bool))[None])
    assert (logits[1:] - dense[PREFIX:n - 1]).abs().max() > 1e-2  # the test can tell sparse from dense


def test_specontext_keeps_sinks_and_window_and_ranks_the_rest_by_the_head(tiny):
    llm, ids = tiny["llm"], tiny["ids"]
    llm.set_sparsity(sparsity="specontext", retrieval_head=tiny["head_path"])
    opts = SparsityOptions(method="specontext", budget_tokens=24, sink_tokens=3, window_tokens=5, pin_fraction=0.0)
    record, restore = recording_selections(llm)
    try:
        _, selector = llm.engine.teacher_forced(ids[:PREFIX], ids[PREFIX:PREFIX + 8], sparsity=opts)
    finally:
        restore()
    head, cfg = llm.retrieval_head, llm.config
    n = PREFIX + 8
    mask = _mask_from_record(record, PREFIX, n, cfg.num_heads, cfg.num_kv_heads)
    x = _head_input(llm, head, ids[:n], mask)
    with torch.no_grad():
        q, k = head.project(x, torch.arange(n)[None])
    for step, chosen in enumerate(record):
        p = PREFIX + step
        with torch.no_grad():
            probs = head.group_probs(q[:, :, p:p + 1], k[:, :, :p])[0, :, 0]  # [G, p]
        for g in range(cfg.num_kv_heads):
            got = set(chosen[0, g, :-1].tolist())
            pinned = set(range(3)) | set(range(p - 5, p))
            assert pinned <= got
            rest = probs[g].clone()
            rest[list(pinned)] = -1
            best = rest.topk(24 - len(pinned)).values.sum()
            assert probs[g, sorted(got - pinned)].sum() >= best - 1e-5  # mass, not exact indices


@torch.no_grad()
def _head_input(llm, head, ids, mask=None):
    """Head inputs for every position from transformers' hidden states (an independent forward,
    with the same attention mask the sparse steps used)."""
    hf_model = llm_hf_twin(llm)
    hf_model.config._attn_implementation = "sdpa"
    out = hf_model(torch.tensor([ids]), attention_mask=None if mask is None else mask[None], output_hidden_states=True)
    layers = head.config.hidden_layers
    # hidden_states[i + 1] is the output of layer i (the last entry is after the final norm, so
    # the head here never fuses the last layer)
    hidden = torch.cat([out.hidden_states[i + 1] for i in layers], dim=-1)
    shifted = torch.cat([torch.zeros_like(hidden[:, :1]), hidden[:, :-1]], dim=1)
    emb = llm.model.model.embed_tokens(torch.tensor([ids]))
    return head.inputs(emb, shifted)


_TWINS: dict = {}


def llm_hf_twin(llm):
    import transformers

    if llm.path not in _TWINS:
        _TWINS[llm.path] = transformers.AutoModelForCausalLM.from_pretrained(llm.path).eval()
    return _TWINS[llm.path]


def test_head_keys_a_one_token_last_prefill_chunk(tiny):
    """A prompt of one chunk plus one token (the fixture's chunk is 32) still keys every position."""
    llm, ids = tiny["llm"], tiny["ids"]
    llm.set_sparsity(sparsity="specontext", retrieval_head=tiny["head_path"])
    state = llm.engine.prefill_state(ids[:33], 40)
    x = _head_input(llm, llm.retrieval_head, ids[:33])
    with torch.no_grad():
        _, k_ref = llm.retrieval_head.project(x, torch.arange(33)[None])
    assert (state.head_selector.k_device[:, :, :33] - k_ref).abs().max() <= 1e-4
    llm.set_sparsity(sparsity="dense")


def test_sliding_window_models_refuse_sparsity(tmp_path):
    make_hf_model("mistral", str(tmp_path / "mistral"), sliding_window=7)
    llm = specontext.load(str(tmp_path / "mistral"), device="cpu")
    with pytest.raises(InputError, match="sliding-window"):
        llm.set_sparsity(sparsity="streaming", budget_tokens=16)


@pytest.mark.parametrize("budget", [30, PREFIX + 5, 200])
def test_head_k_cache_covers_prompt_and_generated_tokens(tiny, budget):
    """Every position's key, dense steps included (budget 200 never goes sparse): their keys are
    made together at the first sparse step, or when asked."""
    llm, ids = tiny["llm"], tiny["ids"]
    llm.set_sparsity(sparsity="specontext", retrieval_head=tiny["head_path"], budget_tokens=budget, sink_tokens=2,
                     window_tokens=4)
    record, restore = recording_selections(llm)
    try:
        g = llm.engine.generate(ids[:PREFIX], specontext.GenerationConfig(max_new_tokens=12, ignore_eos=True))
        list(g)
    finally:
        restore()
    selector = g.selector
    full = ids[:PREFIX] + g.result().token_ids
    cfg = llm.config
    mask = _mask_from_record(record, PREFIX, len(full), cfg.num_heads, cfg.num_kv_heads)
    x = _head_input(llm, llm.retrieval_head, full, mask)
    with torch.no_grad():
        _, k_ref = llm.retrieval_head.project(x, torch.arange(len(full))[None])
    n = len(full) - 1  # the last generated token was sampled but never run
    selector.key_pending()
    assert (selector.k_device[:, :, :n] - k_ref[:, :, :n]).abs().max() <= 1e-4
    stats = g.result().stats.sparsity
    assert (stats["sparse_steps"], stats["dense_steps"]) == {30: (11, 0), PREFIX + 5: (5, 6), 200: (0, 11)}[budget]


@pytest.mark.parametrize("method", [m for m in METHODS if m != "dense"])
@pytest.mark.parametrize("budget", [TOTAL - 1, TOTAL])
def test_budget_at_or_above_the_context_is_exactly_dense(tiny, method, budget):
    llm, ids = tiny["llm"], tiny["ids"]
    llm.set_sparsity(sparsity="dense")
    dense = llm.generate(ids[:PREFIX], max_new_tokens=20, ignore_eos=True)
    dense_logits, _ = llm.engine.teacher_forced(ids[:PREFIX], ids[PREFIX:])
    llm.set_sparsity(sparsity=method, budget_tokens=budget, retrieval_head=tiny["head_path"], sink_tokens=2,
                     window_tokens=4)
    sparse = llm.generate(ids[:PREFIX], max_new_tokens=20, ignore_eos=True)
    logits, selector = llm.engine.teacher_forced(ids[:PREFIX], ids[PREFIX:])
    assert sparse.token_ids == dense.token_ids
    assert torch.equal(logits, dense_logits)
    assert selector.stats.sparse_steps == 0 and selector.stats.dense_steps == TOTAL - PREFIX - 1
    llm.set_sparsity(sparsity="dense")


def test_oracle_captures_the_most_attention_and_quest_is_bounded_by_it(tiny):
    llm, ids = tiny["llm"], tiny["ids"]
    recalls = {}
    for method in ("oracle", "quest", "streaming"):
        opts = SparsityOptions(method=method, budget_tokens=32, sink_tokens=2, measure_recall=True)
        _, selector = llm.engine.teacher_forced(ids[:PREFIX], ids[PREFIX:], sparsity=opts)
        assert selector.stats.sparse_steps == TOTAL - PREFIX - 1
        recalls[method] = selector.stats.recall
    # the per-layer oracle keeps the top of each layer's group-max attention: far above the
    # recency baseline (not a strict bound on quest, whose ranking uses another aggregate)
    assert 0 < recalls["streaming"] < recalls["oracle"] <= 1
    assert recalls["quest"] > 0


def test_quest_pages_follow_the_key_bound():
    """Quest keeps the current page and the pages whose key bound is largest (hand-built keys)."""
    from specontext.retrieval.baselines import QuestSelector

    D, page = 4, 4
    keys = torch.zeros(1, 1, 22, D)  # pages 0..4 full, then 2 tokens in the current page
    keys[0, 0, 8:12, 0] = 5.0  # page 2 has a large bound along dim 0
    keys[0, 0, 16:20, 1] = 3.0  # page 4 along dim 1
    q = torch.tensor([1.0, 1.0, 0.0, 0.0]).view(1, 1, 1, D)
    sel = QuestSelector(budget_tokens=10, page_tokens=page)
    idx, valid = sel.choose_in_layer(0, q, keys, None)
    assert sorted(idx[0, 0].tolist()) == list(range(8, 12)) + list(range(16, 22))
    assert valid is None


def test_gathered_attention_equals_a_masked_float32_reference():
    """The cache's per-KV-head gather gives the same attention as masking dense attention."""
    from specontext.kv.cache import DenseKVCache
    from specontext.kv.plan import Selection

    torch.manual_seed(0)
    B, G, R, D, S = 2, 3, 2, 8, 37
    cache = DenseKVCache(1, B, G, D, 64, torch.float32, "cpu")
    prefill = cache.plan_step([S - 1] * B)
    cache.update(0, torch.randn(B, G, S - 1, D), torch.randn(B, G, S - 1, D), prefill)
    plan = cache.plan_step([1] * B)
    chosen = torch.stack([torch.randperm(S - 1)[:11] for _ in range(B * G)]).view(B, G, 11)
    indices = torch.cat([chosen, torch.full((B, G, 1), S - 1)], dim=-1)
    plan = plan.with_selection(Selection(indices=indices), cache.row_pitch)
    k_new, v_new = torch.randn(B, G, 1, D), torch.randn(B, G, 1, D)
    q = torch.randn(B, G * R, 1, D)
    keys, values, mask = cache.update(0, k_new, v_new, plan)
    out = torch.nn.functional.scaled_dot_product_attention(q.view(B, G, R, D), keys, values)
    full_k, full_v = cache.layers[0].k[:, :, :S], cache.layers[0].v[:, :, :S]
    allowed = torch.zeros(B, G, S, dtype=torch.bool).scatter_(-1, indices, True)
    ref_logits = (q.view(B, G, R, D) @ full_k.transpose(-1, -2)) / D ** 0.5
    ref = ref_logits.masked_fill(~allowed[:, :, None], float("-inf")).softmax(-1) @ full_v
    assert (out - ref).abs().max() <= 1e-5


def test_fallback_runs_unconfident_steps_dense(tiny):
    llm, ids = tiny["llm"], tiny["ids"]
    llm.set_sparsity(sparsity="dense")
    dense_logits, _ = llm.engine.teacher_forced(ids[:PREFIX], ids[PREFIX:])
    llm.set_sparsity(sparsity="specontext", retrieval_head=tiny["head_path"])
    always = SparsityOptions(method="specontext", budget_tokens=30, sink_tokens=2, window_tokens=4,
                             fallback_threshold=1.0)
    logits, selector = llm.engine.teacher_forced(ids[:PREFIX], ids[PREFIX:], sparsity=always)
    assert selector.stats.fallback_steps == TOTAL - PREFIX - 1 and selector.stats.sparse_steps == 0
    assert torch.equal(logits, dense_logits)
    never = SparsityOptions(method="specontext", budget_tokens=30, sink_tokens=2, window_tokens=4,
                            fallback_threshold=1e-9)
    _, selector = llm.engine.teacher_forced(ids[:PREFIX], ids[PREFIX:], sparsity=never)
    assert selector.stats.fallback_steps == 0 and selector.stats.sparse_steps == TOTAL - PREFIX - 1
    assert 0 < selector.stats.confidence_sum / selector.stats.sparse_steps < 1


def test_selection_synchronises_the_device_only_when_asked_to_time_it(tiny, monkeypatch):
    """No step waits on the host for selection unless ``measure_selection_time`` (benchmarks) asks;
    then the selector synchronises the device before and after each selection, and only then."""
    from dataclasses import replace

    from specontext.retrieval.selection import make_selector
    from specontext.retrieval.selector import Selector

    synced = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synced.append(device))
    on_cuda = SimpleNamespace(positions=SimpleNamespace(device=torch.device("cuda", 1)))
    opts = SparsityOptions(method="streaming", budget_tokens=8, sink_tokens=2)
    make_selector(opts, 2)._sync_for_timing(on_cuda)
    assert synced == []
    make_selector(replace(opts, measure_selection_time=True), 2)._sync_for_timing(on_cuda)
    assert synced == [torch.device("cuda", 1)]

    calls = []
    original = Selector._sync_for_timing
    monkeypatch.setattr(Selector, "_sync_for_timing", lambda self, plan: calls.append(self) or original(self, plan))
    llm, ids = tiny["llm"], tiny["ids"]
    llm.set_sparsity(sparsity="specontext", retrieval_head=tiny["head_path"])
    results = {}
    for timed in (False, True):
        calls.clear()
        opts = SparsityOptions(method="specontext", budget_tokens=30, sink_tokens=2, window_tokens=4,
                               measure_selection_time=timed)
        results[timed], selector = llm.engine.teacher_forced(ids[:PREFIX], ids[PREFIX:], sparsity=opts)
        assert selector.measure_selection_time == timed and selector.stats.sparse_steps == TOTAL - PREFIX - 1
        assert len(calls) == 2 * selector.stats.sparse_steps and selector.stats.selection_s > 0
    llm.set_sparsity(sparsity="dense")
    assert torch.equal(results[False], results[True]) and synced == [torch.device("cuda", 1)]  # CPU: never


def test_recall_is_the_dense_mass_on_the_chosen_set():
    probs = torch.tensor([[[[0.5, 0.3, 0.2]]]])  # [B=1, G=1, R=1, P=3]
    from specontext.retrieval.recall import SelectionStats, record_recall

    stats = SelectionStats()
    record_recall(stats, probs, torch.tensor([[[0, 2]]]), None)
    assert stats.recall == pytest.approx(0.7)
    q, k = torch.randn(1, 2, 1, 4), torch.randn(1, 1, 5, 4)
    assert past_attention(q, k).sum(-1).allclose(torch.ones(1, 1, 2))


# ---- bad input -------------------------------------------------------------------------------

def test_budget_not_above_sinks_plus_window_is_refused_with_the_minimum():
    with pytest.raises(InputError, match=r"sinks \+ window \(= 64\).*at least 65"):
        SparsityOptions(method="specontext", budget_tokens=64, sink_tokens=4, window_tokens=60, pin_fraction=0)
    # pins take their share of the budget too: the smallest budget B with B >= 64 + round(B / 4) + 1
    with pytest.raises(InputError, match=r"pins \(0.25 of the budget = 20\); got 80, use at least 87"):
        SparsityOptions(method="specontext", budget_tokens=80, sink_tokens=4, window_tokens=60, pin_fraction=0.25)
    SparsityOptions(method="specontext", budget_tokens=87, sink_tokens=4, window_tokens=60, pin_fraction=0.25)
    with pytest.raises(InputError, match="pin_fraction must be in"):
        SparsityOptions(method="specontext", pin_fraction=1.0)
    with pytest.raises(InputError, match="odd number"):
        SparsityOptions(method="snapkv", focus_pool_tokens=4)
    with pytest.raises(InputError, match="at least 65"):
        SparsityOptions(method="snapkv", budget_tokens=64, sink_tokens=4, window_tokens=60)
    with pytest.raises(InputError, match="at least 5"):
        specontext.RuntimeSettings(sparsity="streaming", budget_tokens=4, sink_tokens=4)
    with pytest.raises(InputError, match="sparsity must be one of"):
        SparsityOptions(method="sparse")


def test_head_for_another_model_is_refused_naming_its_model(tiny, tmp_path):
    other = make_hf_model("llama", str(tmp_path / "other"), seed=5, max_position_embeddings=256)
    del other
    llm = specontext.load(str(tmp_path / "other"), device="cpu")
    with pytest.raises(InputError, match=r"made for m \(3 layers.*fingerprint"):
        llm.set_sparsity(sparsity="specontext", retrieval_head=tiny["head_path"])


def test_auto_without_a_head_says_how_to_make_one(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("SPECONTEXT_HEAD_DIR", str(tmp_path / "none"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with pytest.raises(InputError, match="specontext-distill"):
        tiny["llm"].set_sparsity(sparsity="specontext", retrieval_head="auto")
    monkeypatch.setenv("SPECONTEXT_HEAD_DIR", str(tiny["root"] / "head"))
    tiny["llm"].set_sparsity(sparsity="specontext", retrieval_head="auto")
    assert tiny["llm"].retrieval_head is not None
    tiny["llm"].set_sparsity(sparsity="dense")


def test_cli_reports_sparsity_in_json_and_refuses_a_small_budget(tiny, capsys):
    from specontext.cli import main

    root = tiny["root"]
    words = " ".join(f"w{i % 90 + 3}" for i in range(150))
    doc = root / "doc.txt"
    doc.write_text(words)
    rc = main(["--model", str(root / "m"), "--document", str(doc), "--no-chat-template", "--json",
               "--max-new-tokens", "8", "--ignore-eos", "--sparsity", "specontext", "--budget", "40",
               "--sink-tokens", "2", "--window-tokens", "4", "--retrieval-head", tiny["head_path"],
               "--measure-recall", "--quiet"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0
    info = out["sparsity"]
    assert info["method"] == "specontext" and info["budget_tokens"] == 40 and info["sparse_steps"] == 7
    assert 0 < info["recall"] <= 1 and info["fallback_steps"] == 0
    assert info["retrieval_head"].endswith("tiny.json")
    rc = main(["--model", str(root / "m"), "--question", "hi", "--sparsity", "specontext", "--budget", "10"])
    err = capsys.readouterr().err
    assert rc != 0 and err.count("\n") == 1 and "at least 129" in err


def test_global_oracle_records_the_layer_mean_attention_and_replays_its_top_b(tiny):
    """bench_edge/global_oracle.py: pass 1 is dense and records transformers' layer-mean attention;
    pass 2 keeps the top-B of it (sinks and window pinned) and captures more mass than the head."""
    import os
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "bench_edge"))
    import global_oracle

    hf, llm, ids = tiny["hf"], tiny["llm"], tiny["ids"]
    cfg = llm.model.config
    dense_logits, _ = llm.engine.teacher_forced(ids[:PREFIX], ids[PREFIX:])
    recorder = global_oracle.AttentionRecorder(cfg.num_layers, cfg.num_kv_heads)
    logits, _ = llm.engine.teacher_forced(ids[:PREFIX], ids[PREFIX:], selector=recorder)
    assert (logits - dense_logits).abs().max() <= 1e-4
    assert sorted(recorder.scores) == list(range(PREFIX, TOTAL - 1))

    hf.config._attn_implementation = "eager"
    with torch.no_grad():
        att = torch.stack(hf(torch.tensor([ids]), output_attentions=True).attentions)[:, 0]  # [L, H, T, T]
    R = cfg.num_heads // cfg.num_kv_heads
    for p in (PREFIX, PREFIX + 17, TOTAL - 2):
        past = att[:, :, p, :p] / att[:, :, p, :p].sum(-1, keepdim=True)  # [L, H, p]
        expected = past.mean(0).reshape(cfg.num_kv_heads, R, p).mean(1)
        assert (recorder.scores[p][0] - expected).abs().max() <= 1e-5

    budget, sinks, window = 24, 2, 4
    oracle = global_oracle.ReplayedGlobalOracle(recorder.scores, budget, sinks, window, cfg.num_kv_heads)
    llm.engine.teacher_forced(ids[:PREFIX], ids[PREFIX:PREFIX + 2], selector=oracle)
    p = PREFIX
    scores = recorder.scores[p][0].clone()
    scores[:, :sinks], scores[:, p - window:] = 2.0, 2.0
    expected = scores.topk(budget, dim=-1).indices.sort(dim=-1).values
    assert oracle.stats.sparse_steps == 1
    sel = global_oracle.ReplayedGlobalOracle(recorder.scores, budget, sinks, window, cfg.num_kv_heads)
    got = sel.choose(None, SimpleNamespace(positions=torch.tensor([[p]])), [p]).indices[0, :, :-1]
    assert torch.equal(got, expected)

    recalls = {}
    for name, selector in (("oracle-global", global_oracle.ReplayedGlobalOracle(
            recorder.scores, budget, sinks, window, cfg.num_kv_heads)), ("specontext", None)):
        opts = SparsityOptions(method="specontext", budget_tokens=budget, sink_tokens=sinks, window_tokens=window,
                               measure_recall=True)
        if selector is None:
            llm.set_sparsity(sparsity="specontext", retrieval_head=tiny["head_path"])
        _, used = llm.engine.teacher_forced(ids[:PREFIX], ids[PREFIX:], sparsity=opts, selector=selector)
        recalls[name] = used.stats.recall
    llm.set_sparsity(sparsity="dense")
    assert recalls["specontext"] < recalls["oracle-global"] <= 1
