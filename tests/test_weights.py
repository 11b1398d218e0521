"""Weight formats (issue 17, first part): int4 and int8 linear layers against float32 references.

The kernels are checked against a pure-torch dequantize-then-matmul of the same values; a GGUF
Q4_1 or Q4_0 tensor becomes int4 with exactly the values gguf's own dequantization gives.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

import specontext
from specontext.errors import InputError
from specontext.loaders.gguf_loader import GGUFFile
from specontext.loaders.gguf_quant import int4_from_gguf, int8_from_gguf
from specontext.model.quant import Int4Linear, Int8Linear, QuantizedWeight, concat_rows, quantize, quantized_linear

from conftest import make_hf_model, write_tiny_gguf


@pytest.mark.parametrize("fmt,activations,tol", [("int4", None, 1e-5), ("int8", "float", 1e-5), ("int8", "int8", 0.02)])
def test_kernels_match_a_dequantize_then_matmul_reference(fmt, activations, tol):
    torch.manual_seed(0)
    w, b, x = torch.randn(96, 128), torch.randn(96), torch.randn(2, 5, 128)
    qw = quantize(w, fmt)
    module = (Int4Linear(qw, b, bf16=False, native=False) if fmt == "int4" else Int8Linear(qw, b, activations, bf16=False))
    ref = x @ qw.dequantize().t() + b
    assert ((module(x) - ref).abs().max() / ref.abs().max()).item() <= tol
    assert ((qw.dequantize() - w).abs().max() / w.abs().max()).item() < (0.1 if fmt == "int4" else 0.01)


@pytest.mark.parametrize("fmt", ["int4", "int8"])
def test_bf16_kernels_compute_the_rounded_values_they_are_given(fmt):
    """With bfloat16 activations (torch's fast CPU path; int4's where the native products are
    missing) the kernel multiplies bf16-rounded activations
    by the weight whose scales (and zeros) are bf16-rounded, and returns bf16: within 2^-8 of the
    largest output of that product (measured 0.0016 int8, 0.0032 int4), and 1% of the float one."""
    torch.manual_seed(0)
    w, b, x = torch.randn(96, 128), torch.randn(96), torch.randn(2, 5, 128)
    qw = quantize(w, fmt)
    module = Int4Linear(qw, b, bf16=True, native=False) if fmt == "int4" else Int8Linear(qw, b, bf16=True)
    def r(t):
        return None if t is None else t.bfloat16().float()
    rounded = QuantizedWeight(fmt, qw.q, r(qw.scale), r(qw.zero)).dequantize()
    exact_ref = r(x) @ rounded.t() + b
    float_ref = x @ qw.dequantize().t() + b
    y = module(x)
    assert y.dtype == torch.float32
    assert ((y - exact_ref).abs().max() / exact_ref.abs().max()).item() <= 2 ** -8
    assert ((y - float_ref).abs().max() / float_ref.abs().max()).item() <= 0.01


@pytest.mark.parametrize("qtype", [gguf.GGMLQuantizationType.Q4_1, gguf.GGMLQuantizationType.Q4_0])
def test_gguf_q4_blocks_become_int4_losslessly(qtype):
    """scale = d, zero = m + 8 d (Q4_0: 0): every value equals gguf's dequantization bit for bit."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((48, 256)).astype(np.float32)
    raw = gguf.quants.quantize(w, qtype)
    qw = int4_from_gguf(raw, qtype.name, 48, 256)
    expected = torch.from_numpy(gguf.quants.dequantize(raw, qtype).reshape(48, 256).astype(np.float32))
    assert torch.equal(qw.dequantize(), expected)


def test_gguf_q4_k_blocks_become_int4():
    """Q4_K super-blocks (6-bit sub-block scales and minima) become int4 groups of 32: value for
    value gguf's own dequantization, up to one rounding of the zero (exact on this data)."""
    rng = np.random.default_rng(2)
    rows, k = 12, 768
    blocks = rng.integers(0, 256, (rows, k // 256, 144), dtype=np.uint8)
    d_dmin = (rng.standard_normal((rows, k // 256, 2)) * 0.01).astype(np.float16)
    blocks[..., 0:4] = d_dmin.view(np.uint8).reshape(rows, k // 256, 4)  # finite scales, random rest
    raw = blocks.reshape(rows, -1)
    expected = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.Q4_K).reshape(rows, k).astype(np.float32)
    got = int4_from_gguf(raw, "Q4_K", rows, k).dequantize().numpy()
    assert np.abs(got - expected).max() <= np.abs(expected).max() * 2.0 ** -22
    assert (got == expected).mean() > 0.99


def test_auto_keeps_one_quantized_format_or_falls_back_to_float_with_a_notice(monkeypatch):
    import specontext.model.quant as quant
    from specontext.loaders.gguf_loader import auto_format

    monkeypatch.setattr(quant, "cpu_bf16_kernels", lambda: True)

    assert auto_format(["Q4_1"]) == "int4" and auto_format(["Q4_0", "Q4_K"]) == "int4"
    assert auto_format(["Q8_0"]) == "int8"
    import warnings as w

    with w.catch_warnings():
        w.simplefilter("error")
        assert auto_format(["F16", "F32"], warn=True) == "fp32"  # a float file: nothing to note
    with pytest.warns(UserWarning, match="Q4_K, Q6_K; --weights auto keeps one quantized format") as seen:
        assert auto_format(["Q4_K", "Q6_K"], warn=True) == "fp32"
    assert len(seen) == 1 and "\n" not in str(seen[0].message)
    monkeypatch.setattr(quant, "cpu_bf16_kernels", lambda: False)  # the kernels are slower than float32 there
    with pytest.warns(UserWarning, match="neither native bfloat16 nor AVX2.*--weights int4 keeps them int4") as seen:
        assert auto_format(["Q4_1"], warn=True) == "fp32"
    assert len(seen) == 1


def test_gguf_q8_0_becomes_int8_per_row():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((40, 128)).astype(np.float32)
    raw = gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0)
    expected = torch.from_numpy(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.Q8_0).reshape(40, 128))
    qw = int8_from_gguf(raw, 40, 128)
    assert ((qw.dequantize() - expected).abs().max() / expected.abs().max()).item() < 0.01


def test_fused_rows_and_row_order_follow_the_float_weights():
    torch.manual_seed(0)
    a, b = torch.randn(32, 64), torch.randn(16, 64)
    fused = concat_rows([quantize(a, "int4"), quantize(b, "int4")])
    assert torch.equal(fused.dequantize(), torch.cat([quantize(a, "int4").dequantize(), quantize(b, "int4").dequantize()]))
    order = torch.randperm(48)
    assert torch.equal(fused.rows(order).dequantize(), fused.dequantize()[order])


@pytest.fixture(scope="module")
def tiny_q4(tmp_path_factory):
    root = tmp_path_factory.mktemp("weights")
    hf = make_hf_model("llama", str(root / "hf"), vocab_size=288, hidden_size=64, intermediate_size=96,
                       num_attention_heads=4, num_key_value_heads=2)
    path = str(root / "q4_1.gguf")
    write_tiny_gguf(hf, path, tensor_type=gguf.GGMLQuantizationType.Q4_1)
    return path


def _logits(llm, ids):
    cache = llm.engine.new_cache(len(ids))
    return llm.engine.prefill(ids, cache, logits_for="all")[0]


def test_a_q4_1_gguf_runs_int4_with_its_float_values(tiny_q4, monkeypatch):
    """The int4 model computes what the float model loaded from the same file computes: exactly
    with float32 activations, and within bf16 rounding on the fast path (bfloat16 activations)."""
    import specontext.model.quant as quant

    ids = list(range(3, 40))
    ref = specontext.load(tiny_q4, device="cpu", weights="fp32")
    fast = _logits(specontext.load(tiny_q4, device="cpu", weights="int4"), ids)
    monkeypatch.setattr(quant, "cpu_bf16_kernels", lambda: False)
    llm = specontext.load(tiny_q4, device="cpu", weights="int4")
    layer = llm.model.model.layers[0]
    assert isinstance(layer.self_attn.qkv_proj, Int4Linear) and isinstance(layer.mlp.down_proj, Int4Linear)
    assert layer.mlp.down_proj.compute_dtype == torch.float32
    ref_logits = _logits(ref, ids)
    assert torch.allclose(_logits(llm, ids), ref_logits, atol=2e-4, rtol=1e-4)
    assert (fast - ref_logits).abs().max().item() < 0.05 * ref_logits.abs().max().item()
    assert llm.model.weight_bytes() < ref.model.weight_bytes()
    f = GGUFFile(tiny_q4)  # read straight from the blocks: no float copy of those tensors
    tensors = f.hf_tensors(f.model_config(), "int4")
    assert type(tensors["model.layers.0.mlp.down_proj.weight"]).__name__ == "QuantizedWeight"
    assert tensors["model.embed_tokens.weight"].dtype == torch.float32


def test_auto_keeps_a_q4_1_gguf_int4_on_a_cpu(tiny_q4, monkeypatch):
    """--weights auto: the GGUF's Q4_1 stays int4 (the same module and values as --weights int4),
    on a CPU with native bf16 (taken as given here: elsewhere auto loads float32, tested above),
    where the LM head and the tied embeddings share one bf16 table."""
    import specontext.model.quant as quant
    from specontext.model.bf16 import BF16Embedding, BF16Head
    from specontext.model.quant import kernel_dtype

    monkeypatch.setattr(quant, "cpu_bf16_kernels", lambda: True)

    ids = list(range(3, 40))
    auto = specontext.load(tiny_q4, device="cpu")
    int4 = specontext.load(tiny_q4, device="cpu", weights="int4")
    assert isinstance(auto.model.model.layers[0].self_attn.qkv_proj, Int4Linear)
    assert torch.equal(_logits(auto, ids), _logits(int4, ids))
    assert auto.model.dtype == torch.float32
    if kernel_dtype() == torch.bfloat16:
        head, embed = auto.model.lm_head, auto.model.model.embed_tokens
        assert isinstance(head, BF16Head) and isinstance(embed, BF16Embedding)
        assert (head.weight is embed.weight) == auto.config.tie_word_embeddings


def test_int8_weights_follow_float32(tiny_q4):
    ids = list(range(3, 40))
    ref = _logits(specontext.load(tiny_q4, device="cpu", weights="fp32"), ids).softmax(-1)
    llm = specontext.load(tiny_q4, device="cpu", weights="int8")
    assert isinstance(llm.model.model.layers[0].mlp.gate_up_proj, Int8Linear)
    got = _logits(llm, ids).softmax(-1)
    assert (got - ref).abs().max().item() < 0.05
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean().item() >= 0.9


def test_a_float_checkpoint_is_quantized_on_load(tmp_path):
    make_hf_model("llama", str(tmp_path / "hf"), vocab_size=96, hidden_size=64, intermediate_size=96,
                  num_attention_heads=4, num_key_value_heads=2)
    llm = specontext.load(str(tmp_path / "hf"), device="cpu", weights="int4")
    assert isinstance(llm.model.model.layers[1].self_attn.o_proj, Int4Linear)
    assert len(llm.generate([3, 4, 5], chat=False, max_new_tokens=4, ignore_eos=True).token_ids) == 4


def test_formats_that_cannot_be_honoured_are_refused(tiny_q4):
    with pytest.raises(InputError, match="is for CUDA; on a CPU use fp32, int8 or int4"):
        specontext.load(tiny_q4, device="cpu", weights="fp16")
    with pytest.raises(InputError, match="weights must be one of"):
        specontext.RuntimeSettings(weights="q4")
    with pytest.raises(InputError, match="disagree"):
        specontext.load(tiny_q4, device="cpu", dtype="float32", weights="bf16")


def test_a_plan_reads_a_gguf_s_format_from_its_header_for_auto(tiny_q4, monkeypatch):
    """--plan --weights auto on a CPU counts what --weights auto loads: the Q4_1 file as int4 (on
    a CPU with native bf16, taken as given here)."""
    import specontext.model.quant as quant
    from specontext.planner.plan import make_plan

    monkeypatch.setattr(quant, "cpu_bf16_kernels", lambda: True)

    def weights(plan):
        return next(b["bytes"] for b in plan.to_dict()["at_context"]["buffers"] if b["name"] == "weights")
    auto = make_plan(tiny_q4, "cpu", context_tokens=64)
    assert auto.to_dict()["settings"]["weight_format"] == "int4"
    assert weights(auto) == specontext.load(tiny_q4, device="cpu").model.weight_bytes()
    assert make_plan(tiny_q4, "rtx-4060-laptop-8gb", context_tokens=64).to_dict()["settings"]["weight_format"] == "float"


@pytest.mark.parametrize("weights", ["fp32", "int8", "int4"])
def test_the_planner_counts_each_format_as_the_runtime_holds_it(tiny_q4, weights):
    from specontext.planner.memory import model_weight_bytes
    from specontext.planner.plan import quantized_bytes

    llm = specontext.load(tiny_q4, device="cpu", weights=weights)
    fmt = "float" if weights == "fp32" else weights
    scale, head = quantized_bytes(weights, "cpu")
    assert model_weight_bytes(llm.config, 4, fmt, scale, head) == llm.model.weight_bytes()


def test_a_plan_takes_the_weight_format(tiny_q4):
    from specontext.planner.plan import make_plan

    def weights(plan):
        return next(b["bytes"] for b in plan.to_dict()["at_context"]["buffers"] if b["name"] == "weights")
    float32, int4 = (make_plan(tiny_q4, "cpu", context_tokens=64, weights=w) for w in ("fp32", "int4"))
    assert int4.to_dict()["settings"]["weight_format"] == "int4" and weights(int4) < weights(float32)
    assert "linear layers int4" in int4.table()
    with pytest.raises(InputError, match="weights must be auto, fp32, fp16, bf16, int8, int4 or gguf"):
        make_plan(tiny_q4, "cpu", weights="q4")


def _plant_outlier_channels(llm, channels=(5, 17), factor=40.0):
    """Make a few RMSNorm output channels `factor` times larger and the layers reading them that
    much smaller: the float function is unchanged, but per-token int8 activations now lose the
    other channels (what real LLMs' outlier channels do)."""
    from specontext.model.quant import QuantizedWeight, quantize

    idx = torch.tensor(channels)
    for layer in llm.model.model.layers:
        for norm, owner, name in (("input_layernorm", "self_attn", "qkv_proj"),
                                  ("post_attention_layernorm", "mlp", "gate_up_proj")):
            with torch.no_grad():
                getattr(layer, norm).weight[idx] *= factor
            lin = getattr(getattr(layer, owner), name)
            w = QuantizedWeight("int8", lin.q, lin.scale).dequantize()
            w[:, idx] /= factor
            setattr(getattr(layer, owner), name, Int8Linear(quantize(w, "int8"), lin.bias))


def test_smoothing_recovers_int8_activations_from_outlier_channels(tiny_q4):
    """With planted outlier channels, per-token int8 activations drift from weight-only int8;
    smoothing (calibrated on the model's own text) brings them back, and the layers are the ones
    the design names: q/k/v, o and gate/up int8 x int8, down_proj weight-only."""
    from specontext.api import _calibrate_int8_activations

    ids = list(range(3, 60))
    ref_llm = specontext.load(tiny_q4, device="cpu", weights="int8")
    _plant_outlier_channels(ref_llm)
    ref = _logits(ref_llm, ids).softmax(-1)

    def error(smooth: bool) -> float:
        llm = specontext.load(tiny_q4, device="cpu", weights="int8")
        _plant_outlier_channels(llm)
        if smooth:
            _calibrate_int8_activations(llm)
        else:  # the same layout with s = 1 (maxima of one, alpha 1): no smoothing
            from specontext.model.smooth import use_int8_activations

            K = llm.config.hidden_size
            use_int8_activations(llm.model, [{"qkv_proj": torch.ones(K), "gate_up_proj": torch.ones(K)}
                                             for _ in llm.model.model.layers], alpha=1.0)
        layer = llm.model.model.layers[0]
        assert layer.self_attn.qkv_proj.activations == "int8" and layer.self_attn.o_proj.activations == "int8"
        assert not isinstance(layer.mlp.down_proj, Int8Linear)  # float32, or bfloat16 where the CPU has it
        return (_logits(llm, ids).softmax(-1) - ref).abs().sum(-1).mean().item()

    plain, smoothed = error(False), error(True)
    print(f"mean |p - p_ref|: unsmoothed {plain:.4f}, smoothed {smoothed:.4f}")
    assert smoothed < 0.5 * plain, (smoothed, plain)


def test_int8_activations_load_deterministically_and_need_int8_weights_on_a_cpu(tiny_q4):
    ids = list(range(3, 30))
    a = specontext.load(tiny_q4, device="cpu", weights="int8", activations="int8")
    b = specontext.load(tiny_q4, device="cpu", weights="int8", activations="int8")
    assert torch.equal(_logits(a, ids), _logits(b, ids))
    with pytest.raises(InputError, match="needs --weights int8"):
        specontext.load(tiny_q4, device="cpu", weights="int4", activations="int8")
    with pytest.raises(InputError, match="activations must be one of"):
        specontext.RuntimeSettings(activations="int4")


def test_bf16_linear_follows_a_float32_reference():
    from specontext.model.smooth import BF16Linear

    w, b, x = torch.randn(48, 64) * 0.05, torch.randn(48), torch.randn(3, 5, 64)
    got = BF16Linear(w, b)(x)
    assert got.dtype == torch.float32 and got.shape == (3, 5, 48)
    ref = x @ w.t() + b
    assert (got - ref).abs().max().item() < 0.02 * ref.abs().max().item()


def test_the_bf16_head_ranks_its_highest_logits_in_float32():
    """A bf16 product rounds logits near 25 to steps of 0.125; the head recomputes its highest
    logits from the bf16 rows and float32 activations, so a near-tie keeps its float32 order."""
    from specontext.model.bf16 import BF16Head

    torch.manual_seed(0)
    w = torch.randn(300, 64).bfloat16().float()  # exactly representable rows
    x = torch.randn(2, 75, 64)  # 150 positions: refined in chunks of BF16Head.CHUNK
    head = BF16Head(w, None)
    ref = x @ w.t()
    y = head(x)
    top = ref.topk(5, dim=-1).indices
    assert torch.allclose(y.gather(-1, top), ref.gather(-1, top), rtol=1e-6, atol=1e-5)
    assert torch.equal(y.argmax(-1), ref.argmax(-1))
    # a tie that bf16 output makes: two rows whose float32 logits differ by less than a bf16 step
    w2 = torch.zeros(2, 64)
    w2[0, 0], w2[1, 0], w2[1, 1] = 25.0, 25.0, 0.0625
    x2 = torch.zeros(1, 64)
    x2[0, 0], x2[0, 1] = 1.0, 1.0
    assert BF16Head(w2, None)(x2).argmax(-1).item() == 1
    assert torch.nn.functional.linear(x2.bfloat16(), w2.bfloat16()).float()[0, 0] == \
        torch.nn.functional.linear(x2.bfloat16(), w2.bfloat16()).float()[0, 1]


def test_loading_reads_each_tensor_once(tiny_q4, monkeypatch):
    """The GGUF's tensors are read when the model takes them, each once (the fingerprint and the
    model share one read), so loading never holds a second copy of every weight."""
    from collections import Counter

    reads = Counter()
    real = GGUFFile._raw

    def counted(self, tensor):
        reads[tensor.name] += 1
        return real(self, tensor)

    monkeypatch.setattr(GGUFFile, "_raw", counted)
    specontext.load(tiny_q4, device="cpu", weights="int4")
    assert reads and max(reads.values()) == 1 and len(reads) == len(GGUFFile(tiny_q4).tensors)


def test_a_gguf_that_changes_while_its_tensors_are_read_is_refused(tiny_q4, tmp_path, monkeypatch):
    """Tensors are read while the model is built; once they are all taken the file must still be
    the one whose header was read (a change between reads, or during the last one, is caught)."""
    import shutil

    from specontext.errors import ModelFileError

    path = str(tmp_path / "m.gguf")
    shutil.copy(tiny_q4, path)
    f = GGUFFile(path)
    tensors = f.hf_tensors(f.model_config(), "int4")
    for name in list(tensors):
        tensors.pop(name)
    tensors.check()  # unchanged: nothing raised
    with open(path, "ab") as out:
        out.write(b"\0")
    with pytest.raises(ModelFileError, match="changed while it was being read"):
        tensors.check()
    calls = []
    monkeypatch.setattr(GGUFFile, "check_unchanged", lambda self: calls.append(self.path))
    specontext.load(tiny_q4, device="cpu", weights="int4")
    assert calls == [tiny_q4]  # load() asks once it has built the model


def test_loading_the_default_model_peaks_near_its_weights_plus_one_tensor():
    """Issue 17: peak memory while loading stays near the quantized size plus one tensor. Measured
    in a fresh process: peak RSS during the load minus RSS before it, against the loaded weights
    plus the largest tensor in float32 (the embeddings) plus 96 MiB (metadata, tokenizer, heap;
    measured 269-286 MiB against 225 MiB of weights and tensor)."""
    import subprocess
    import sys

    from specontext.assets import default_model_path
    from specontext.errors import ModelFileError

    try:
        default_model_path()
    except ModelFileError:
        pytest.skip("the default model's package is not installed")
    # peak_rss_bytes is VmHWM: ru_maxrss would carry over the forked test process's across exec
    code = ("import psutil, specontext, json\n"
            "from specontext.stats import peak_rss_bytes\n"
            "before = psutil.Process().memory_info().rss\n"
            "llm = specontext.load(device='cpu')\n"
            "cfg = llm.config\n"
            "print(json.dumps({'before': before, 'peak': peak_rss_bytes(),"
            " 'weights': llm.model.weight_bytes(), 'largest': cfg.vocab_size * cfg.hidden_size * 4}))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    import json

    m = json.loads(out.stdout.strip().splitlines()[-1])
    grew = m["peak"] - m["before"]
    print(f"load grew RSS by {grew / 2**20:.0f} MiB; weights {m['weights'] / 2**20:.0f} MiB, "
          f"largest tensor {m['largest'] / 2**20:.0f} MiB")
    assert grew <= m["weights"] + m["largest"] + 96 * 2**20


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("n,k", [(96, 576), (64, 256), (40, 96)])  # inner K tiles 4, 8 and 2
def test_cuda_int4_kernel_matches_a_dequantize_then_matmul_reference(n, k):
    """The CUDA int4 packing (two values a byte, the even one high) and scales: the tensor-core
    kernel against bf16 activations times the dequantized weight, within bf16 rounding."""
    torch.manual_seed(0)
    qw = quantize(torch.randn(n, k), "int4")
    b = torch.randn(n)
    module = Int4Linear(qw, b, device="cuda")
    x = torch.randn(3, 7, k, device="cuda", dtype=torch.bfloat16)
    ref = x.float() @ qw.dequantize().cuda().t() + b.cuda()
    y = module(x)
    assert y.dtype == torch.bfloat16 and y.shape == (3, 7, n)
    assert ((y.float() - ref).abs().max() / ref.abs().max()).item() <= 0.02


@pytest.mark.cuda
@needs_cuda
def test_a_q4_1_gguf_runs_int4_on_cuda(tiny_q4):
    """--weights int4 on CUDA: the GGUF's Q4_1 blocks on the tensor-core kernel, against the same
    file loaded in bfloat16 on the GPU."""
    ids = list(range(3, 40))
    ref = _logits(specontext.load(tiny_q4, device="cuda", weights="bf16"), ids).float()
    llm = specontext.load(tiny_q4, device="cuda", weights="int4")
    assert isinstance(llm.model.model.layers[0].mlp.down_proj, Int4Linear)
    got = _logits(llm, ids).float()
    assert (got - ref).abs().max().item() <= 0.05 * ref.abs().max().item()
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean().item() >= 0.9
    with pytest.raises(InputError, match="runs in bfloat16"):
        specontext.load(tiny_q4, device="cuda", weights="int4", dtype="float16")
    with pytest.raises(InputError, match="int8 runs on the CPU"):
        specontext.load(tiny_q4, device="cuda", weights="int8")
