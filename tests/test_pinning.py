"""Query-focused pinning (retrieval/focus.py) and the snapkv baseline.

References: Hugging Face transformers' own attention probabilities (``output_attentions``) for
the focus; the selections each step makes for the pinning rules; the device-resident cache for
offloaded layers (token-identical), and each request run alone for batches.
"""

from __future__ import annotations

import pytest
import torch

import specontext
from specontext.retrieval.focus import QueryFocus, focus_layer_weights, pins_from_scores
from specontext.retrieval.selection import SparsityOptions

from conftest import recording_selections, tiny_sparse_setup

PREFIX, TOTAL = 80, 120


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny GQA llama (6 query heads, 2 KV heads, 3 layers), its transformers twin, a random head."""
    return tiny_sparse_setup(tmp_path_factory.mktemp("pinning"), TOTAL)


def _focus(llm, prompts, window, keep="layers"):
    cache = llm.engine.new_cache(max(len(p) for p in prompts) + 4, batch_size=len(prompts))
    focus = llm.engine.new_focus([len(p) for p in prompts], cache.capacity_tokens, window, keep=keep)
    llm.engine.prefill_rows(prompts, cache, focus=focus)
    return focus


@pytest.mark.parametrize("window", [1, 40])  # 40 spans two 32-token prefill chunks
def test_focus_equals_transformers_window_attention(tiny, window):
    llm, hf, ids = tiny["llm"], tiny["hf"], tiny["ids"][:PREFIX]
    hf.config._attn_implementation = "eager"
    with torch.no_grad():
        attn = hf(torch.tensor([ids]), output_attentions=True).attentions  # L x [1, H, n, n]
    H, G = llm.config.num_heads, llm.config.num_kv_heads
    # each layer: per query row, the max over each KV group's query heads; mean over the last W rows
    per_layer = [a[0, :, -window:].reshape(G, H // G, window, -1).amax(1).mean(1) for a in attn]  # [G, n]
    focus = _focus(llm, [ids], window)
    for layer, expected in enumerate(per_layer):
        torch.testing.assert_close(focus.scores(layer)[0], expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(focus.scores()[0], torch.stack(per_layer).mean(0), atol=1e-5, rtol=1e-4)


def test_focus_layers_average_only_the_chosen_layers(tiny):
    llm, ids = tiny["llm"], tiny["ids"][:PREFIX]
    every = _focus(llm, [ids], 16)  # keep="layers"
    cache = llm.engine.new_cache(PREFIX + 4)
    late = llm.engine.new_focus([PREFIX], cache.capacity_tokens, 16, layers="late")  # layers 1 and 2 of 3
    llm.engine.prefill_rows([ids], cache, focus=late)
    expected = (every.scores(1) + every.scores(2)) / 2
    torch.testing.assert_close(late.scores(), expected, atol=1e-6, rtol=1e-5)
    weights = focus_layer_weights("late", 3, llm.config.num_kv_heads)
    torch.testing.assert_close(every.scores(layer_weights=weights), expected, atol=1e-6, rtol=1e-5)
    assert focus_layer_weights("0,2", 3, 2)[:, 0].tolist() == [1.0, 0.0, 1.0]
    with pytest.raises(specontext.InputError, match="must lie in 0..2"):
        focus_layer_weights("1-5", 3, 2)
    with pytest.raises(specontext.InputError, match="layers and ranges"):
        SparsityOptions(method="specontext", focus_layers="middle")


def test_focus_of_a_batch_row_equals_the_row_alone(tiny):
    ids = tiny["ids"]
    prompts = [ids[:70], ids[:41], ids[5:98]]
    batch = _focus(tiny["llm"], prompts, 32)
    for b, p in enumerate(prompts):
        alone = _focus(tiny["llm"], [p], 32)
        torch.testing.assert_close(batch.scores()[b, :, :len(p)], alone.scores()[0], atol=1e-6, rtol=0)


def test_pins_take_the_smoothed_top_and_skip_sinks_and_padding():
    scores = torch.zeros(2, 1, 12)
    scores[0, 0, 6] = 0.9  # pooled over 3 it covers 5, 6, 7
    scores[0, 0, 0] = 1.0  # a sink: never pinned
    scores[1, 0, 10] = 0.5  # past row 1's prompt (8 tokens): never pinned
    pos, valid = pins_from_scores(scores, [12, 8], num_pins=3, pool_tokens=3, sink_tokens=1)
    assert pos[0, 0].tolist() == [5, 6, 7] and valid[0].all()
    assert 10 not in pos[1, 0][valid[1, 0]].tolist()
    pos, valid = pins_from_scores(scores, [12, 3], num_pins=4, sink_tokens=1)
    assert valid[1, 0].tolist() == [True, True, False, False]  # only positions 1 and 2 are candidates
    assert pos[1, 0, :2].tolist() == [1, 2]


def test_pins_are_always_chosen_inside_the_budget(tiny):
    llm, ids = tiny["llm"], tiny["ids"]
    llm.set_sparsity(sparsity="specontext", retrieval_head=tiny["head"])
    opts = SparsityOptions(method="specontext", budget_tokens=32, sink_tokens=2, window_tokens=4,
                           pin_fraction=0.5, focus_window_tokens=8, focus_pool_tokens=3, focus_layers="all")
    record, restore = recording_selections(llm)
    try:
        _, selector = llm.engine.teacher_forced(ids[:PREFIX], ids[PREFIX:], sparsity=opts)
    finally:
        restore()
    pins, valid = _focus(llm, [ids[:PREFIX]], 8, keep="total").pins(16, 3, 2)
    assert valid.all() and selector.pin_mask[0, :, :PREFIX].sum().item() == 16 * llm.config.num_kv_heads
    assert selector.stats.sparse_steps == TOTAL - PREFIX - 1
    for step, chosen in enumerate(record):
        p = PREFIX + step
        for g in range(llm.config.num_kv_heads):
            got = chosen[0, g, :-1].tolist()
            assert len(set(got)) == len(got) == 32  # the budget, no repeats
            assert set(pins[0, g].tolist()) | {0, 1} | set(range(p - 4, p)) <= set(got)


def test_pinning_off_is_the_head_alone_and_pins_change_the_choice(tiny):
    llm, ids = tiny["llm"], tiny["ids"]
    llm.set_sparsity(sparsity="specontext", retrieval_head=tiny["head"])
    common = dict(method="specontext", budget_tokens=32, sink_tokens=2, window_tokens=4)
    chosen = {}
    for fraction in (0.0, 0.5):
        record, restore = recording_selections(llm)
        try:
            llm.engine.teacher_forced(ids[:PREFIX], ids[PREFIX:], sparsity=SparsityOptions(pin_fraction=fraction, **common))
        finally:
            restore()
        chosen[fraction] = record
    assert all(s is not None for s in chosen[0.0])
    assert any(not torch.equal(a, b) for a, b in zip(chosen[0.0], chosen[0.5]))


def test_offloaded_pins_equal_resident_and_are_fetched_once(tiny):
    ids = tiny["ids"]
    common = dict(sparsity="specontext", retrieval_head=tiny["head"], budget_tokens=32, sink_tokens=2, window_tokens=4,
                  pin_fraction=0.5, focus_window_tokens=8)
    resident = specontext.load(tiny["path"], device="cpu", prefill_chunk_tokens=32, **common)
    expected = resident.generate(ids[:PREFIX], max_new_tokens=30, ignore_eos=True).token_ids
    for pool in (1.0, 1.5):
        llm = specontext.load(tiny["path"], device="cpu", prefill_chunk_tokens=32, offload_layers=2, slot_pool=pool,
                              **common)
        assert llm.generate(ids[:PREFIX], max_new_tokens=30, ignore_eos=True).token_ids == expected
    # each pinned position keeps the slot of its first fetch for the whole generation
    engine = llm.engine
    state = engine.prefill_state(ids[:PREFIX], TOTAL, focus_window_tokens=8)
    selector = engine.new_selector(TOTAL, cache=state.cache)
    slots_seen = []
    select = selector.select

    def watched(x, plan):
        pool_ = state.cache.slot_pool
        if pool_ is not None and selector.pin_mask is not None:
            pinned = selector.pin_mask[0].nonzero()  # [n, 2] (kv head, position)
            slots_seen.append(pool_.slot_of_pos[pinned[:, 0], pinned[:, 1]].clone())
        return select(x, plan)
    selector.select = watched
    engine.teacher_forced(ids[:PREFIX], ids[PREFIX:], state=state, selector=selector)
    fetched = [s for s in slots_seen if (s >= 0).all()]
    assert len(fetched) >= TOTAL - PREFIX - 3  # from the first sparse step on, every pin has a slot
    assert all(torch.equal(s, fetched[0]) for s in fetched)


def test_batched_pins_are_per_row(tiny):
    llm, ids = tiny["llm"], tiny["ids"]
    llm.set_sparsity(sparsity="specontext", retrieval_head=tiny["head"], budget_tokens=32, sink_tokens=2,
                     window_tokens=4, pin_fraction=0.5, focus_window_tokens=8)
    prompts = [ids[:70], ids[10:51], ids[3:96]]
    alone = [llm.generate(p, max_new_tokens=12, ignore_eos=True).token_ids for p in prompts]
    batched = [r.token_ids for r in llm.generate_batch(prompts, max_new_tokens=12, ignore_eos=True)]
    assert batched == alone
    llm.set_sparsity(sparsity="dense", pin_fraction=0.25, focus_window_tokens=32)


def test_snapkv_keeps_each_layers_pins_sinks_and_window(tiny):
    llm, ids = tiny["llm"], tiny["ids"]
    opts = SparsityOptions(method="snapkv", budget_tokens=30, sink_tokens=2, window_tokens=4, focus_window_tokens=8,
                           focus_pool_tokens=3)
    focus = _focus(llm, [ids[:PREFIX]], 8)
    chosen_per_layer: dict[int, list] = {}
    selector = llm.engine.new_selector(TOTAL, sparsity=opts)
    inner = selector.choose_in_layer

    def recorded(layer, queries, past_keys, past_valid):
        indices, valid = inner(layer, queries, past_keys, past_valid)
        chosen_per_layer.setdefault(layer, []).append((indices.clone(), valid.clone(), past_keys.shape[2]))
        return indices, valid
    selector.choose_in_layer = recorded
    state = llm.engine.prefill_state(ids[:PREFIX], TOTAL, focus_window_tokens=8)
    llm.engine.teacher_forced(ids[:PREFIX], ids[PREFIX:], state=state, selector=selector)
    assert len(chosen_per_layer) == llm.config.num_layers
    for layer, steps in chosen_per_layer.items():
        pins, pins_valid = focus.pins(30 - 2 - 4, 3, 2, layer=layer)
        for indices, valid, past in steps:
            for g in range(llm.config.num_kv_heads):
                got = indices[0, g][valid[0, g]].tolist()
                expected = set(pins[0, g][pins_valid[0, g]].tolist()) | {0, 1} | set(range(past - 4, past))
                assert len(got) == len(set(got)) and set(got) == expected


def test_snapkv_is_refused_with_offloaded_layers(tiny):
    with pytest.raises(specontext.InputError, match="chooses inside each layer"):
        specontext.RuntimeSettings(sparsity="snapkv", offload_layers=1)


def test_focus_bookkeeping_over_chunks():
    focus = QueryFocus([10, 4], num_layers=1, num_heads=2, num_kv_heads=1, capacity_tokens=12, window_tokens=3,
                       device="cpu")
    assert not focus.begin_chunk([4, 1])  # row 0: positions 0-3; row 1: position 0 (its window is 1-3)
    assert focus.begin_chunk([2, 3]) and focus._rows == [(1, 0, 3, 1)]  # row 1's 1-3; row 0's window is 7-9
    assert focus.begin_chunk([4, 0]) and focus._rows == [(0, 1, 4, 6)]  # row 0's 7-9, columns 1-3
