"""--weights gguf: a GGUF's blocks multiplied by ggml's CPU kernels (model/ggml_linear.py, csrc/ggml.c).

ggml comes from llama-cpp-python (the llamacpp extra); the tests that run its kernels skip where it
is not installed. The references are independent of ggml: the gguf package's own quantization and
dequantization in numpy, and float64 products.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import specontext
from specontext.model.ggml_linear import BlockWeight, concat_block_rows, ggml_paths

from conftest import make_hf_model, write_tiny_gguf

gguf = pytest.importorskip("gguf", reason="the gguf package is not installed")
needs_ggml = pytest.mark.skipif(ggml_paths() is None, reason="llama-cpp-python (the llamacpp extra, which ships "
                                "ggml) is not installed")
Q8_0 = gguf.GGMLQuantizationType.Q8_0


def _blocks(w: np.ndarray, type_name: str) -> tuple[np.ndarray, np.ndarray]:
    """(the GGUF bytes of ``w`` as ``type_name``, their values as the gguf package reads them)."""
    if type_name == "F16":
        return w.astype(np.float16).view(np.uint8), w.astype(np.float16).astype(np.float32)
    qtype = getattr(gguf.GGMLQuantizationType, type_name)
    blocks = gguf.quants.quantize(w, qtype)
    return blocks, gguf.quants.dequantize(blocks, qtype)


@needs_ggml
@pytest.mark.parametrize("type_name,tolerance", [("Q4_0", 1e-5), ("Q4_1", 1e-3), ("Q8_0", 1e-5), ("F16", 1e-5)])
def test_products_equal_a_reference_on_quantized_activations(type_name, tolerance):
    """y = x W^T as llama.cpp computes it: the activation row rounded to the weight type's 8-bit
    partner (Q8_0 values; Q8_1 adds a float16 sum of each block, hence Q4_1's looser bound; F16
    rows take float16 activations), then exact products. Without that rounding the error is
    about 0.5%, over 5x larger, so the reference tells the two apart."""
    from specontext.model.ggml_linear import GGMLLinear

    rng = np.random.default_rng(0)
    w = rng.standard_normal((80, 256)).astype(np.float32)  # 80 rows: not a whole number of 16-row chunks
    blocks, values = _blocks(w, type_name)
    x = rng.standard_normal((3, 256)).astype(np.float32)
    if type_name == "F16":
        xq = x.astype(np.float16).astype(np.float32)
    else:
        xq = gguf.quants.dequantize(gguf.quants.quantize(x, Q8_0), Q8_0)
    ref = xq.astype(np.float64) @ values.astype(np.float64).T
    layer = GGMLLinear(BlockWeight(int(getattr(gguf.GGMLQuantizationType, type_name)),
                                   torch.from_numpy(np.ascontiguousarray(blocks)), 256))
    got = layer(torch.from_numpy(x)).double().numpy()
    err = np.abs(got - ref).max() / np.abs(ref).max()
    assert err <= tolerance
    unrounded = x.astype(np.float64) @ values.astype(np.float64).T
    if type_name != "F16":  # the rounding is what the reference models
        assert np.abs(got - unrounded).max() / np.abs(ref).max() > 5 * err


@needs_ggml
def test_many_rows_equal_each_row_alone_and_bias_adds():
    """A prefill's [M, K] product is each row's decode product (chunks of weight rows, split over
    threads, index every (row, token) pair once), and a bias is added after."""
    from specontext.model.ggml_linear import GGMLLinear

    rng = np.random.default_rng(1)
    blocks, _ = _blocks(rng.standard_normal((200, 64)).astype(np.float32), "Q4_1")
    bias = torch.randn(200)
    layer = GGMLLinear(BlockWeight(3, torch.from_numpy(blocks), 64), bias)
    x = torch.randn(2, 7, 64)
    together = layer(x)
    alone = torch.stack([torch.stack([layer(x[b, t]) for t in range(7)]) for b in range(2)])
    assert torch.equal(together, alone)
    assert together.shape == (2, 7, 200)
    assert torch.allclose(together - bias, GGMLLinear(BlockWeight(3, torch.from_numpy(blocks), 64))(x))


@needs_ggml
def test_embedding_rows_are_the_table_values_exactly():
    from specontext.model.ggml_linear import GGMLEmbedding

    rng = np.random.default_rng(2)
    blocks, values = _blocks(rng.standard_normal((50, 96)).astype(np.float32), "Q8_0")
    table = GGMLEmbedding(torch.from_numpy(blocks), int(Q8_0), 96)
    ids = torch.tensor([[0, 49, 7], [7, 3, 3]])
    assert torch.equal(table(ids), torch.from_numpy(values)[ids])


def _tiny_gguf(tmp_path, tensor_type, tied: bool = True) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=tied)
    model = LlamaForCausalLM(cfg)
    path = str(tmp_path / f"tiny-{tensor_type.name}-{'tied' if tied else 'untied'}.gguf")
    write_tiny_gguf(model, path, tensor_type=tensor_type)
    return path


def _values(layer) -> torch.Tensor:
    """A ggml layer's weight as float32, read back through ggml's own dequantization."""
    out = torch.empty(layer.out_features, layer.in_features)
    torch.ops.specontext.ggml_rows_(out, layer.blocks, torch.arange(layer.out_features), layer.ggml_type)
    return out


@needs_ggml
@pytest.mark.parametrize("type_name,tied", [("Q4_1", True), ("Q8_0", True), ("Q4_1", False)])
def test_a_gguf_model_runs_on_its_blocks_near_its_float_values(tmp_path, type_name, tied):
    """The whole model on ggml's kernels (fused q/k/v with RoPE rows reordered, gate/up, a tied
    table as head and embeddings, or an untied head of its own) against the same file
    dequantized to float32: every layer holds exactly the float path's values, row for row (so a
    q/k row order that differs shows), and the logits differ only by the activations' 8-bit
    rounding. Same retrieval-head fingerprint."""
    path = _tiny_gguf(tmp_path, getattr(gguf.GGMLQuantizationType, type_name), tied=tied)
    ids = list(range(3, 43))
    blocks = specontext.load(path, device="cpu", weights="gguf")
    floats = specontext.load(path, device="cpu", weights="fp32")
    for ours, theirs in zip(blocks.model.model.layers, floats.model.model.layers):
        assert torch.equal(_values(ours.self_attn.qkv_proj), theirs.self_attn.qkv_proj.weight)
        assert torch.equal(_values(ours.mlp.gate_up_proj), theirs.mlp.gate_up_proj.weight)
    assert torch.equal(_values(blocks.model.lm_head), floats.model.lm_head.weight)
    assert type(blocks.model.lm_head).__name__ == "GGMLLinear"
    shared = blocks.model.model.embed_tokens.blocks.data_ptr() == blocks.model.lm_head.blocks.data_ptr()
    assert shared == tied  # a tied table is one copy
    got, _ = blocks.engine.teacher_forced(ids[:20], ids[20:])
    ref, _ = floats.engine.teacher_forced(ids[:20], ids[20:])
    assert ((got - ref).abs().max() / ref.abs().max()).item() < 0.05
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean().item() >= 0.9
    assert blocks.target.fingerprint == floats.target.fingerprint
    assert blocks.model.weight_bytes() < floats.model.weight_bytes() / 3


_AOT_CHILD = """
import json, sys
import specontext
llm = specontext.load(sys.argv[1], device="cpu", threads=1, weights="gguf", compile_decode="aot")
ids = llm.generate(list(range(3, 23)), chat=False, max_new_tokens=12, ignore_eos=True).token_ids
print(json.dumps({"ids": ids, "aot_used": llm.engine._aot is not None}))
"""


@needs_ggml
def test_the_aot_step_calls_the_ggml_operators(tmp_path):
    """A step compiled ahead of time calls ggml's products as torch operators (registered by the
    native library), passes the load's check against the eager model and decodes its tokens."""
    path = _tiny_gguf(tmp_path, gguf.GGMLQuantizationType.Q4_1)
    proc = subprocess.run([sys.executable, "-c", _AOT_CHILD, path], capture_output=True, text=True,
                          env={**os.environ, "SPECONTEXT_AOT_DIR": str(tmp_path / "built")})
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["aot_used"]
    eager = specontext.load(path, device="cpu", threads=1, weights="gguf")
    assert got["ids"] == eager.generate(list(range(3, 23)), chat=False, max_new_tokens=12, ignore_eos=True).token_ids
    # the load's check is looser on ggml's 8-bit activations (AOTStep.tolerance), and still refuses a
    # step whose norms differ from the eager model's (this random model's attention is so flat that
    # a rotary 1.5x faster moves its logits by under 1%)
    from specontext.model.aot_step import AOTStep

    (package,) = [os.path.join(d, "step.pt2") for d in (tmp_path / "built").iterdir()]
    step = AOTStep(package, eager.model)
    assert step.check() <= step.tolerance() == 2.0 ** -5
    with torch.no_grad():
        for layer in eager.model.model.layers:
            layer.input_layernorm.eps = 0.5
    with pytest.raises(specontext.InputError, match="differs from the eager model"):
        step.check()


def test_gguf_weights_are_refused_where_they_cannot_run(tmp_path, monkeypatch):
    """A Hugging Face folder has no blocks; CUDA has no ggml here; without llama-cpp-python there
    is no ggml: each is one line naming what would work. q/k/v of different block types cannot
    be one fused layer."""
    from specontext.api import weight_format
    from specontext.model import ggml_linear
    from specontext.settings import RuntimeSettings

    folder = tmp_path / "hf"
    make_hf_model("llama", str(folder), vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    with pytest.raises(specontext.InputError, match="Hugging Face folder; use --weights auto, int4 or int8"):
        specontext.load(str(folder), device="cpu", weights="gguf")
    with pytest.raises(specontext.InputError, match="ggml's CPU kernels; on cuda use --weights int4"):
        weight_format(RuntimeSettings(weights="gguf"), torch.device("cuda"), torch.bfloat16)
    monkeypatch.setattr(ggml_linear, "ggml_paths", lambda: None)
    with pytest.raises(specontext.InputError, match=r"pip install 'specontext\[llamacpp\]'.*--weights auto or int4"):
        ggml_linear.ggml.__wrapped__()
    with pytest.raises(specontext.InputError, match="drop --embeddings int8"):
        specontext.load(_tiny_gguf(tmp_path, gguf.GGMLQuantizationType.Q8_0), device="cpu", weights="gguf",
                        embeddings="int8")
    parts = [BlockWeight(3, torch.zeros(4, 20, dtype=torch.uint8), 32),
             BlockWeight(14, torch.zeros(4, 26, dtype=torch.uint8), 32)]
    with pytest.raises(specontext.InputError, match="mix GGUF types .*Q4_1, Q6_K.*--weights int4 or fp32"):
        concat_block_rows(parts, "q_proj")


def test_the_planner_counts_gguf_as_the_format_its_blocks_map_to():
    """``--plan --weights gguf``: on a CPU profile the default model's Q4_1 blocks are counted as
    int4 (the same bytes); a GPU profile is refused, naming what would plan."""
    from specontext.assets import default_model_path
    from specontext.errors import ModelFileError
    from specontext.planner.plan import make_plan

    try:
        default_model_path()
    except ModelFileError as exc:
        pytest.skip(str(exc))
    planned = make_plan(None, "cpu", context_tokens=1024, weights="gguf")
    assert planned.table() == make_plan(None, "cpu", context_tokens=1024, weights="int4").table()
    with pytest.raises(specontext.InputError, match="on a CPU; plan it with a .gguf model on a CPU profile"):
        make_plan(None, "jetson-orin-nano-8gb", context_tokens=1024, weights="gguf")


@needs_ggml
def test_a_call_the_products_cannot_take_writes_nan_rather_than_reading_out_of_bounds():
    """The operators check dtypes, shapes and contiguity before reading the blocks or the ids."""
    from specontext.model.ggml_linear import ggml

    ggml()
    blocks, _ = _blocks(np.random.default_rng(3).standard_normal((8, 64)).astype(np.float32), "Q8_0")
    w = torch.from_numpy(blocks)
    for ids in (torch.tensor([0.0, 1.0]), torch.tensor([0, 8])):  # float ids; a row past the table
        out = torch.zeros(2, 64)
        torch.ops.specontext.ggml_rows_(out, w, ids, int(Q8_0))
        assert out.isnan().all()
    for x in (torch.randn(3, 64).double(), torch.randn(64, 3).t(), torch.randn(3, 32), torch.randn(3, 0)):
        out = torch.zeros(3, 8)
        torch.ops.specontext.ggml_mm_(out, x, w, int(Q8_0))
        assert out.isnan().all()
    base = torch.zeros(8)  # an output that is not its own memory (a stride-0 view) is left as it is
    torch.ops.specontext.ggml_mm_(base.expand(3, 8), torch.randn(3, 32), w, int(Q8_0))
    assert torch.equal(base, torch.zeros(8))
    for bad_type in (45, 63, -1, 4):  # numbers ggml's tables do not have (or no longer use)
        out = torch.zeros(3, 8)
        torch.ops.specontext.ggml_mm_(out, torch.randn(3, 64), w, bad_type)
        assert out.isnan().all()
