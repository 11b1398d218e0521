"""``--embeddings int8``: the token table held as int8 rows with a float32 scale each."""

import warnings

import pytest
import torch

import specontext
from specontext.errors import InputError
from specontext.model.int8_embedding import CHUNK_ROWS, Int8Embedding

from conftest import make_hf_model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_each_row_reads_back_within_half_its_step(dtype):
    """Every value within half a step (its row's largest / 127) of the float table, in ``dtype``,
    across more rows than one load chunk (rows after the first chunk must be quantized too)."""
    torch.manual_seed(0)
    table = torch.randn(CHUNK_ROWS + 37, 24) * torch.rand(CHUNK_ROWS + 37, 1) * 3
    emb = Int8Embedding(table.to(dtype), dtype)
    ids = torch.tensor([[0, 5, CHUNK_ROWS + 36], [CHUNK_ROWS, 1, 1]])
    got = emb(ids)
    assert got.shape == (2, 3, 24) and got.dtype == dtype
    want = table.to(dtype).float()[ids]
    step = want.abs().amax(-1, keepdim=True) / 127
    slack = 0 if dtype == torch.float32 else want.abs() / 128  # the one bf16 rounding of the result
    assert ((got.float() - want).abs() <= step / 2 + slack + 1e-6).all()
    assert (got.float() != want).any(), "int8 rows must round"
    assert emb.q.dtype == torch.int8 and emb.q.shape == table.shape and emb.scale.shape == (CHUNK_ROWS + 37, 1)


@pytest.fixture(scope="module")
def untied(tmp_path_factory):
    folder = tmp_path_factory.mktemp("untied") / "m"
    make_hf_model("llama", str(folder), tie_word_embeddings=False)
    return str(folder)


def test_an_untied_model_holds_its_table_in_int8_and_the_planner_counts_it(untied):
    from specontext.planner.memory import model_weight_bytes

    ids = [[3, 17, 40, 8, 61, 22, 5, 90, 12]]
    base = specontext.load(untied, device="cpu")
    llm = specontext.load(untied, device="cpu", embeddings="int8")
    assert isinstance(llm.model.model.embed_tokens, Int8Embedding)
    cfg = llm.config
    V, E = cfg.vocab_size, cfg.hidden_size
    assert base.model.weight_bytes() - llm.model.weight_bytes() == V * E * 4 - V * (E + 4)
    assert model_weight_bytes(cfg, 4, embedding_format="int8") == llm.model.weight_bytes()
    want, _ = base.engine.teacher_forced(ids[0][:4], ids[0][4:])
    got, _ = llm.engine.teacher_forced(ids[0][:4], ids[0][4:])
    assert got.shape == want.shape and not torch.equal(got, want)
    assert (got.log_softmax(-1) - want.log_softmax(-1)).abs().max() < 0.05
    # generation runs through the int8 table, prefill and decode
    assert len(llm.generate(ids[0], chat=False, max_new_tokens=6, ignore_eos=True).token_ids) == 6


def test_a_tied_model_keeps_its_head_table_and_says_so(tmp_path):
    make_hf_model("llama", str(tmp_path / "m"), tie_word_embeddings=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        llm = specontext.load(str(tmp_path / "m"), device="cpu", embeddings="int8")
    assert any("tied" in str(w.message) for w in caught)
    assert isinstance(llm.model.model.embed_tokens, Int8Embedding)
    assert llm.model.lm_head.weight.dtype == torch.float32
    from specontext.planner.memory import model_weight_bytes
    assert model_weight_bytes(llm.config, 4, embedding_format="int8") == llm.model.weight_bytes()


def test_an_unknown_embedding_format_is_refused_naming_the_choices(untied):
    with pytest.raises(InputError, match="embeddings must be one of float, int8"):
        specontext.load(untied, device="cpu", embeddings="int4")


def test_a_plan_with_int8_embeddings_frees_the_table(untied):
    from specontext.planner.plan import make_plan

    def weights(plan):
        return next(b["bytes"] for b in plan.to_dict()["at_context"]["buffers"] if b["name"] == "weights")
    plain, int8 = (make_plan(untied, "cpu", context_tokens=64, weights="fp32", embeddings=e) for e in ("float", "int8"))
    cfg = specontext.load(untied, device="cpu").config
    assert weights(plain) - weights(int8) == cfg.vocab_size * cfg.hidden_size * 4 - cfg.vocab_size * (cfg.hidden_size + 4)
    assert int8.to_dict()["settings"]["embedding_format"] == "int8"
    assert "embeddings int8" in int8.table()


def test_a_compiled_step_reads_the_int8_table_and_8bit_kv_as_eager_does(untied):
    """Both upcasts write into a new tensor (``torch.mul(..., out=)``): the step still traces whole."""
    ids = [3, 17, 40, 8, 61, 22, 5, 90, 12]
    opts = dict(device="cpu", embeddings="int8", kv_dtype="int8")
    eager = specontext.load(untied, **opts).generate(ids, chat=False, max_new_tokens=8, ignore_eos=True)
    llm = specontext.load(untied, compile_decode="on", **opts)
    compiled = llm.generate(ids, chat=False, max_new_tokens=8, ignore_eos=True)
    assert llm.engine._compiled is not None, "the decode steps must have run compiled"
    assert compiled.token_ids == eager.token_ids
