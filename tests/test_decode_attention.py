"""The native decode attention (csrc/attention.c, the torch operator specontext::decode_attention_)
against float64 attention in plain torch."""

from __future__ import annotations

import pytest
import torch

from specontext.model.decode_attention import available, decode_attention, usable

pytestmark = pytest.mark.skipif(not available(), reason="the native library or torch's stable C ABI is missing")


def _reference(q, k, v, mask):
    """float64 softmax(q k^T / sqrt(D)) v, query head h on KV head h // (H / G), masked positions
    excluded (a [1, G, 1, S] mask is per KV head)."""
    H, G = q.shape[1], k.shape[1]
    k, v = (t.double().repeat_interleave(H // G, dim=1) for t in (k, v))
    scores = (q.double() @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
    if mask is not None:
        scores = scores.masked_fill(~mask.repeat_interleave(H // mask.shape[1], dim=1), float("-inf"))
    return scores.softmax(-1) @ v


@pytest.mark.parametrize("H,G,S,D", [(9, 3, 1024, 64), (9, 3, 1000, 64), (4, 2, 37, 16), (8, 8, 300, 12),
                                     (32, 8, 5000, 128)])
@pytest.mark.parametrize("mask_kind", ["none", "shared", "per_kv_head"])
def test_equals_float64_attention(H, G, S, D, mask_kind):
    """Every shape the kernel takes (several 256-position chunks and a partial one, head dims that
    are and are not multiples of 8, one or many query heads per KV head), over K and V that are
    views of longer buffers (a cache's capacity), with no mask, one for all heads, or one per KV
    head (a sparse step's)."""
    g = torch.Generator().manual_seed(S)
    q = torch.randn(1, H, 1, D, generator=g)
    k = torch.randn(1, G, S + 7, D, generator=g)[:, :, :S]
    v = torch.randn(1, G, S + 7, D, generator=g)[:, :, :S]
    mask = {"none": None, "shared": torch.rand(1, 1, 1, S, generator=g) > 0.3,
            "per_kv_head": torch.rand(1, G, 1, S, generator=g) > 0.5}[mask_kind]
    assert usable(q, k, mask)
    got = decode_attention(q, k, v, mask)
    assert (got.double() - _reference(q, k, v, mask)).abs().max().item() < 1e-5


def test_a_head_with_no_position_gets_zeros_and_other_steps_are_not_taken():
    q, k, v = torch.randn(1, 4, 1, 8), torch.randn(1, 2, 20, 8), torch.randn(1, 2, 20, 8)
    mask = torch.ones(1, 2, 1, 20, dtype=torch.bool)
    mask[0, 1] = False
    got = decode_attention(q, k, v, mask)
    assert torch.equal(got[0, 2:], torch.zeros(2, 1, 8))
    assert torch.allclose(got[0, :2].double(), _reference(q[:, :2], k[:, :1], v[:, :1], None)[0], atol=1e-6)
    assert not usable(torch.randn(2, 4, 1, 8), torch.randn(2, 2, 20, 8), None)  # batched
    assert not usable(torch.randn(1, 4, 3, 8), k, None)  # a prefill chunk
    assert not usable(q.bfloat16(), k.bfloat16(), None)
    assert not usable(q, k, torch.zeros(1, 1, 1, 20))  # an additive float mask


def test_a_model_decodes_as_with_torch_attention(monkeypatch, tmp_path):
    """A float32 model's decode steps go through the kernel (every layer, every step) and give the
    greedy tokens torch's attention gives."""
    import specontext
    import specontext.model.llama as llama
    from conftest import make_hf_model

    make_hf_model("llama", str(tmp_path / "m"), vocab_size=96, hidden_size=64, intermediate_size=128,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    llm = specontext.load(str(tmp_path / "m"), device="cpu", weights="fp32")
    prompt = list(range(1, 40))
    calls = []
    kernel = llama.decode_attention
    monkeypatch.setattr(llama, "decode_attention", lambda *a: calls.append(1) or kernel(*a))
    with_kernel = llm.generate(prompt, chat=False, max_new_tokens=12, ignore_eos=True)
    assert len(calls) == 2 * 11  # two layers, every decode step after the prefill's token
    monkeypatch.setattr(llama, "usable", lambda *a: False)
    torch_attention = llm.generate(prompt, chat=False, max_new_tokens=12, ignore_eos=True)
    assert with_kernel.token_ids == torch_attention.token_ids


def test_a_call_the_kernel_cannot_take_writes_nan_rather_than_reading_out_of_bounds():
    """The operator checks what it is given (dtypes, shapes, unit strides) before touching memory:
    a call that bypassed the Python checks gets NaN, never a read past a buffer."""
    q, k, v = torch.randn(1, 4, 1, 8), torch.randn(1, 2, 20, 8), torch.randn(1, 2, 20, 8)
    for args in [(q.double(), k, v, torch.empty(0, dtype=torch.bool)),  # float64 query
                 (q, k, v, torch.ones(20, dtype=torch.uint8)),  # a mask that is not bool
                 (q, k, v[:, :, :10], torch.empty(0, dtype=torch.bool)),  # V shorter than K
                 (q, k.transpose(-1, -2).contiguous().transpose(-1, -2), v, torch.empty(0, dtype=torch.bool)),
                 (q, k, v, torch.ones(2, 64, dtype=torch.bool)[:, :20]),  # a sliced [G, S] mask
                 (q, k, v, torch.ones(1, dtype=torch.bool).expand(40))]:  # an expanded one
        out = torch.zeros(1, 4, 1, 8)
        torch.ops.specontext.decode_attention_(out, *args, 0.35)
        assert out.isnan().all()
    base = torch.zeros(8)  # an output that is not its own memory (a stride-0 view) is left as it is
    torch.ops.specontext.decode_attention_(base.view(1, 1, 1, 8).expand(1, 4, 1, 8), q, k, v,
                                           torch.empty(0, dtype=torch.bool), 0.35)
    assert torch.equal(base, torch.zeros(8))
    assert not usable(q, k, torch.ones(1, 1, 1, 19, dtype=torch.bool))  # a mask of another length
