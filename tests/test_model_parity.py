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


def test_decode_attention_sends_each_query_head_to_its_kv_head_under_a_per_kv_head_mask(tmp_path):
    """A CPU decode step attends with one query per head (enable_gqa) and expands a [B, G, 1, S]
    mask (a sparse step's) per query head. Against a float32 reference written head by head:
    query head h reads KV head h // R under KV head h // R's mask (a wrong expansion, such as
    repeat instead of repeat_interleave, sends heads to the wrong mask)."""
    from specontext.kv.cache import DenseKVCache

    make_hf_model("llama", str(tmp_path / "m"), num_attention_heads=6, num_key_value_heads=2)
    llm = specontext.load(str(tmp_path / "m"), device="cpu")
    attn, cfg = llm.model.model.layers[0].self_attn, llm.model.config
    H, G, D, S = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, 9
    R = H // G
    torch.manual_seed(0)
    keys, values = torch.randn(1, G, S, D), torch.randn(1, G, S, D)
    mask = torch.ones(1, G, 1, S, dtype=torch.bool)
    mask[0, 0, 0, :4] = False  # KV head 0 ignores its first 4 positions, KV head 1 its last 3
    mask[0, 1, 0, -3:] = False

    class Given:  # a cache that returns these keys, values and mask
        def update(self, layer, k, v, plan):
            return keys, values, mask

    plan = DenseKVCache(cfg.num_layers, 1, G, D, 16, torch.float32, "cpu").plan_step([1])
    cos, sin = llm.model.rotary(plan.positions, torch.float32)
    from dataclasses import replace

    plan = replace(plan, cos=cos, sin=sin)
    x = torch.randn(1, 1, cfg.hidden_size)
    got = attn(x, plan, Given())
    # the reference: q from the same projection and rotation, then each head alone
    from specontext.model.rope import apply_rotary

    q = attn.qkv_proj(x)[..., :H * D].view(1, 1, H, D).transpose(1, 2)
    q = apply_rotary(q, cos, sin)[0, :, 0]  # [H, D]
    heads = []
    for h in range(H):
        g = h // R
        scores = (keys[0, g] @ q[h]) / D ** 0.5
        scores = scores.masked_fill(~mask[0, g, 0], float("-inf"))
        heads.append(scores.softmax(-1) @ values[0, g])
    want = attn.o_proj(torch.cat(heads).view(1, 1, H * D))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
