"""Our decoder against Hugging Face transformers on tiny random-weight models of every family.

Each case writes a checkpoint (safetensors + config.json) with transformers, loads it through our
public loader, and compares float32 logits over a sequence long enough to cross the original
context of the RoPE-scaled variants.
"""

from __future__ import annotations

import pytest
import torch

import specontext

from conftest import make_hf_model

LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 16, "rope_theta": 500000.0}
CASES = {
    "llama2_mha": ("llama", dict(num_key_value_heads=6)),
    "llama3_gqa": ("llama", dict(rope_theta=500000.0)),
    "llama3.1_rope_scaling": ("llama", dict(rope_parameters=LLAMA3_SCALING)),
    "llama3.2_tied": ("llama", dict(rope_parameters=LLAMA3_SCALING, tie_word_embeddings=True)),
    "llama_mqa_attention_bias": ("llama", dict(num_key_value_heads=1, attention_bias=True, mlp_bias=True)),
    "llama_linear_scaling": ("llama", dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0})),
    "smollm2": ("llama", dict(num_attention_heads=9, num_key_value_heads=3, hidden_size=54, tie_word_embeddings=True,
                              rope_theta=100000.0)),
    "mistral_sliding_window": ("mistral", dict(sliding_window=7)),
    "qwen2_qkv_bias": ("qwen2", dict(tie_word_embeddings=True)),
    "qwen2.5_yarn": ("qwen2", dict(max_position_embeddings=64, rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                                     "original_max_position_embeddings": 16})),
    "qwen3_qk_norm_head_dim": ("qwen3", dict(head_dim=16, tie_word_embeddings=False)),
}


def _ids(n: int, vocab: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(case, tmp_path):
    family, overrides = CASES[case]
    hf = make_hf_model(family, str(tmp_path), **overrides)
    ids = _ids(40, hf.config.vocab_size)
    with torch.no_grad():
        expected = hf(ids).logits[0]

    llm = specontext.load(str(tmp_path), device="cpu", prefill_chunk_tokens=16)
    cache = llm.engine.new_cache(64)
    got = llm.engine.prefill(ids[0].tolist(), cache, logits_for="all")[0]
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-4


@pytest.mark.parametrize("case", ["llama3_gqa", "qwen3_qk_norm_head_dim", "mistral_sliding_window"])
def test_decode_steps_match_full_forward(case, tmp_path):
    """Chunked prefill then token-by-token decode gives the full-sequence logits at each step."""
    family, overrides = CASES[case]
    hf = make_hf_model(family, str(tmp_path), **overrides)
    ids = _ids(30, hf.config.vocab_size, seed=2)
    with torch.no_grad():
        expected = hf(ids).logits[0]
    llm = specontext.load(str(tmp_path), device="cpu", prefill_chunk_tokens=7)
    cache = llm.engine.new_cache(30)
    prompt = ids[0, :20].tolist()
    last = llm.engine.prefill(prompt, cache)
    assert (last[0] - expected[19]).abs().max().item() <= 1e-4
    for t in range(20, 30):
        x = ids[:, t:t + 1]
        logits = llm.model(x, cache.plan_step([1]), cache)
        assert (logits[0] - expected[t]).abs().max().item() <= 1e-4


def test_batch_rows_of_different_lengths_match_single_rows(tmp_path):
    """Two prompts of different lengths in one batch give each row's single-request logits."""
    hf = make_hf_model("llama", str(tmp_path))
    llm = specontext.load(str(tmp_path), device="cpu")
    cfg = llm.config
    a, b = _ids(11, cfg.vocab_size, 3)[0], _ids(6, cfg.vocab_size, 4)[0]
    with torch.no_grad():
        want_a, want_b = hf(a[None]).logits[0, -1], hf(b[None]).logits[0, -1]
    cache = llm.engine.new_cache(16, batch_size=2)
    batch = torch.zeros(2, 11, dtype=torch.int64)
    batch[0], batch[1, :6] = a, b
    got = llm.model(batch, cache.plan_step([11, 6]), cache)
    assert (got[0] - want_a).abs().max().item() <= 1e-4
    assert (got[1] - want_b).abs().max().item() <= 1e-4
    # one more token per row, rows now at different positions
    nxt = torch.tensor([[5], [7]])
    got = llm.model(nxt, cache.plan_step([1, 1]), cache)
    with torch.no_grad():
        want_a = hf(torch.cat([a, nxt[0]])[None]).logits[0, -1]
        want_b = hf(torch.cat([b, nxt[1]])[None]).logits[0, -1]
    assert (got[0] - want_a).abs().max().item() <= 1e-4
    assert (got[1] - want_b).abs().max().item() <= 1e-4
