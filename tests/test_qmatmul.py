"""The native int4 / int8 products on float32 activations (``csrc/qmatmul.c``,
``specontext/model/qmatmul.py``) against float64 products of the dequantized weights, on their
AVX2 loops and on the portable ones; the operators' argument checks; the int8-group LM head."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

import specontext
from specontext import native
from specontext.model import qmatmul
from specontext.model.quant import Int4Linear, quantize

from conftest import make_hf_model, write_tiny_gguf

pytestmark = pytest.mark.skipif(not qmatmul.available(), reason="the native library or torch's C ABI is missing")


@pytest.fixture(params=["simd", "plain"])
def loops(request):
    """Each test runs on the AVX2 loops (where the CPU has them) and on the portable ones."""
    lib = native.library().lib
    lib.spc_qmm_force_plain(request.param == "plain")
    yield request.param
    lib.spc_qmm_force_plain(0)


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.double() - ref).abs().max() / ref.abs().max()).item()


def test_packing_puts_values_8b_plus_a_and_8b_plus_a_plus_4_in_byte_4a_plus_b():
    q = (torch.arange(64) * 7 % 16).to(torch.uint8).view(1, 64)  # value i is 7 i mod 16
    packed = qmatmul.pack_int4(q)
    assert packed.shape == (1, 32)
    for byte, (lo, hi) in ((0, (0, 4)), (1, (8, 12)), (4, (1, 5)), (7, (25, 29)), (15, (27, 31)), (16, (32, 36))):
        assert [int(packed[0, byte]) & 15, int(packed[0, byte]) >> 4] == [int(q[0, lo]), int(q[0, hi])]


@pytest.mark.parametrize("n,k", [(37, 64), (8, 96), (130, 32)])
@pytest.mark.parametrize("m", [1, 3, 4, 9])
def test_q4_product_is_the_float_product_of_the_dequantized_weight(loops, n, k, m):
    torch.manual_seed(n * k + m)
    w = quantize(torch.randn(n, k), "int4")
    x = torch.randn(m, k)
    y = qmatmul.q4_mm(x, qmatmul.pack_int4(w.q), w.scale, w.zero)
    assert _rel(y, x.double() @ w.dequantize().double().T) < 2e-6


def test_q4_dequantize_equals_the_reference_values_exactly(loops):
    torch.manual_seed(1)
    w = quantize(torch.randn(50, 160) * 3, "int4")
    assert torch.equal(qmatmul.q4_dequantize(qmatmul.pack_int4(w.q), w.scale, w.zero), w.dequantize())


@pytest.mark.parametrize("m", [1, 5])
def test_q8_product_is_the_float_product(loops, m):
    torch.manual_seed(m)
    q = torch.randint(-128, 128, (45, 96), dtype=torch.int8)
    scale = torch.rand(45, 3)
    x = torch.randn(m, 96)
    ref = x.double() @ (q.double().view(45, 3, 32) * scale.double()[:, :, None]).view(45, 96).T
    assert _rel(qmatmul.q8_mm(x, q, scale), ref) < 2e-6


@pytest.mark.parametrize("tile_rows", [None, 7])  # the whole layer at once, or tiles of 7 rows
def test_int4_linear_on_the_native_product_matches_float32_for_decode_and_prefill_rows(monkeypatch, tile_rows):
    torch.manual_seed(2)
    w, bias = quantize(torch.randn(64, 96), "int4"), torch.randn(64)
    lin = Int4Linear(w, bias)
    assert lin.native and lin.compute_dtype == torch.float32
    if tile_rows:
        monkeypatch.setattr(qmatmul, "TILE_BYTES", tile_rows * 96 * 4)
    for rows in (1, qmatmul.DIRECT_ROWS // 2, qmatmul.DIRECT_ROWS // 2 + 1, 60):  # direct, then dequantized
        x = torch.randn(2, rows, 96)
        ref = torch.nn.functional.linear(x.double(), w.dequantize().double(), bias.double())
        assert _rel(lin(x), ref) < 2e-6


def test_a_compiled_step_calls_the_operator():
    torch.manual_seed(3)
    lin = Int4Linear(quantize(torch.randn(32, 64), "int4"), None)
    x = torch.randn(1, 64)
    compiled = torch.compile(lin, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x), lin(x))


def test_bad_arguments_give_nan_not_a_crash():
    w = quantize(torch.randn(16, 64), "int4")
    packed = qmatmul.pack_int4(w.q)
    out = torch.zeros(1, 16)
    torch.ops.specontext.q4_mm_(out, torch.randn(1, 32), packed, w.scale, w.zero)  # K 32 against 64
    assert out.isnan().all()
    out = torch.zeros(1, 16)
    torch.ops.specontext.q4_mm_(out, torch.randn(1, 64), packed, w.scale[:, :1].contiguous(), w.zero)  # scales
    assert out.isnan().all()
    out = torch.zeros(1, 16)
    torch.ops.specontext.q8_mm_(out, torch.randn(1, 64), w.q, torch.ones(16, 2))  # uint8, not int8
    assert out.isnan().all()
    wide = torch.zeros(1, 32)
    out = wide[:, ::2]  # not contiguous: left as it is
    torch.ops.specontext.q4_mm_(out, torch.randn(1, 64), packed, w.scale, w.zero)
    assert (wide == 0).all()
    out = torch.zeros(16, 32)  # K 32 against the weight's 64
    torch.ops.specontext.q4_dequantize_(out, packed, w.scale, w.zero)
    assert out.isnan().all()


def test_exact_int8_groups_take_q8_0_values_back_and_refuse_others():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((40, 128)).astype(np.float32)
    w[3, :32] = 0  # an all-zero group
    raw = gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0)
    values = torch.from_numpy(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.Q8_0).reshape(40, 128).copy())
    q, scale = qmatmul.exact_int8_groups(values)
    assert torch.equal((q.float().view(40, 4, 32) * scale[:, :, None]).view(40, 128), values)
    table = qmatmul.Q8Table(q, scale)
    ids = torch.tensor([[5, 3, 39]])
    assert torch.equal(table.rows(ids), values[ids])
    with pytest.raises(IndexError):
        table.rows(torch.tensor([-1]))  # not the last row
    for rows in (2, qmatmul.DIRECT_ROWS + 3):  # direct, then a float32 tile of the table
        x = torch.randn(rows, 128)
        assert _rel(table(x), x.double() @ values.double().T) < 2e-6
    assert qmatmul.exact_int8_groups(torch.from_numpy(w)) is None  # float values are not int8 groups
    assert qmatmul.exact_int8_groups(values[:, :100].contiguous()) is None  # K not a multiple of 32


@pytest.mark.parametrize("tied", [False, True])
def test_a_q8_0_table_is_held_in_int8_groups_beside_int4_layers(tmp_path, tied):
    """A GGUF with Q4_1 layers and Q8_0 tables: int4 holds the head and the embeddings (one table
    when tied) in int8 groups and gives the float32 model's logits and tokens."""
    hf = make_hf_model("llama", str(tmp_path / "hf"), vocab_size=288, hidden_size=64, intermediate_size=96,
                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    path = str(tmp_path / "q4_1_q8_0.gguf")
    write_tiny_gguf(hf, path, tensor_type=gguf.GGMLQuantizationType.Q4_1, table_type=gguf.GGMLQuantizationType.Q8_0)
    int4 = specontext.load(path, device="cpu", weights="int4")
    head, embed = int4.model.lm_head, int4.model.model.embed_tokens
    assert isinstance(head, qmatmul.Q8Table) and isinstance(embed, qmatmul.Q8Embedding)
    assert (head.q.data_ptr() == embed.q.data_ptr()) == tied  # one table serves both when tied
    ref = specontext.load(path, device="cpu", weights="fp32")
    ids = list(range(3, 40))
    got, want = (llm.engine.prefill(ids, llm.engine.new_cache(len(ids)), logits_for="all")[0] for llm in (int4, ref))
    assert torch.allclose(got, want, atol=2e-4, rtol=1e-4)
    one = int4.generate(ids, chat=False, max_new_tokens=4, ignore_eos=True)
    assert one.token_ids == ref.generate(ids, chat=False, max_new_tokens=4, ignore_eos=True).token_ids
    assert int4.model.weight_bytes() < ref.model.weight_bytes()


def test_a_table_that_is_not_int8_groups_stays_bf16_or_float(tiny_q4_table):
    """A Q4_1 table is not int8 groups: the head stays the bf16 (or float) one, and the embeddings
    come out float32."""
    llm = specontext.load(tiny_q4_table, device="cpu", weights="int4")
    assert not isinstance(llm.model.lm_head, qmatmul.Q8Table)
    assert llm.model.model.embed_tokens(torch.tensor([[4, 5]])).dtype == torch.float32
    emb8 = specontext.load(tiny_q4_table, device="cpu", weights="int4", embeddings="int8")
    assert not isinstance(emb8.model.lm_head, qmatmul.Q8Table)


@pytest.fixture
def tiny_q4_table(tmp_path):
    hf = make_hf_model("llama", str(tmp_path / "hf"), vocab_size=288, hidden_size=64, intermediate_size=96,
                       num_attention_heads=4, num_key_value_heads=2)
    path = str(tmp_path / "q4_1.gguf")
    write_tiny_gguf(hf, path, tensor_type=gguf.GGMLQuantizationType.Q4_1)
    return path
