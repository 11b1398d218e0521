"""--compile-decode aot: the decode step built ahead of time by AOTInductor, against the eager model."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import specontext

from conftest import make_hf_model

# int4-capable (inputs in groups of 32) and tiny, so the build takes seconds
SHAPE = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256)
PROMPT = [1, 5, 9, 17, 33, 8, 40, 12, 60, 7, 3, 22, 51, 14, 70, 31, 29, 44, 18, 90]
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("aot")
    make_hf_model("llama", str(root / "a"), seed=0, **SHAPE)
    make_hf_model("llama", str(root / "b"), seed=1, **SHAPE)  # the same shapes, other weights
    threads = torch.get_num_threads()  # the tests load with threads=1 (a built step is keyed by it)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPECONTEXT_AOT_DIR", str(root / "built"))
        yield root
    torch.set_num_threads(threads)


def _greedy(path: str, **opts) -> list[int]:
    llm = specontext.load(path, device="cpu", threads=1, weights="int4", **opts)
    return llm.generate(PROMPT, chat=False, max_new_tokens=NEW_TOKENS, ignore_eos=True).token_ids


_CHILD = """
import json, sys
import specontext
llm = specontext.load(sys.argv[1], device="cpu", threads=1, weights="int4", compile_decode="aot")
ids = llm.generate(json.loads(sys.argv[2]), chat=False, max_new_tokens=int(sys.argv[3]), ignore_eos=True).token_ids
print(json.dumps({"ids": ids, "aot_used": llm.engine._aot is not None,
                  "torch_compile_imported": "torch._dynamo" in sys.modules or "torch._inductor" in sys.modules}))
"""


def test_aot_step_decodes_as_the_eager_model_without_torch_compile(models):
    """The built step gives the eager model's greedy tokens (int4 layers, bf16 head where the CPU
    takes bf16), and the serving process never imports torch.compile's machinery (a fresh process:
    this one has)."""
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(models / "a"), json.dumps(PROMPT), str(NEW_TOKENS)],
                          capture_output=True, text=True, env={**os.environ, "SPECONTEXT_AOT_DIR": str(models / "built")})
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "compiling the decode step ahead of time" in proc.stderr  # the first use builds it, and says so
    assert got["aot_used"] and not got["torch_compile_imported"]
    assert got["ids"] == _greedy(str(models / "a"))
    assert len(os.listdir(models / "built")) == 1


def test_one_built_step_serves_every_model_of_the_same_shapes(models, capfd):
    """The weights are inputs of the built step, not constants: a model with the same shapes and
    other weights reuses it (no second build) and still gives its own eager tokens; so does a
    longer cache (the length is dynamic)."""
    if not os.path.isdir(models / "built"):
        pytest.skip("runs after the build above")
    capfd.readouterr()
    llm = specontext.load(str(models / "b"), device="cpu", threads=1, weights="int4", compile_decode="aot")
    ids = llm.generate(PROMPT, chat=False, max_new_tokens=NEW_TOKENS, ignore_eos=True).token_ids
    assert llm.engine._aot is not None
    assert "compiling" not in capfd.readouterr().err
    assert len(os.listdir(models / "built")) == 1
    assert ids == _greedy(str(models / "b"))
    longer = llm.generate(PROMPT * 4, chat=False, max_new_tokens=40, ignore_eos=True).token_ids
    llm.set_sparsity(compile_decode="off")
    assert longer == llm.generate(PROMPT * 4, chat=False, max_new_tokens=40, ignore_eos=True).token_ids


def test_a_built_step_that_differs_from_the_eager_model_is_refused(models):
    """Each built step is checked against the eager model when it is loaded: one for other
    shapes' graph (here: a model whose norm epsilon differs, under the same key) is refused with
    what to do."""
    from specontext.model.aot_step import AOTStep

    if not os.path.isdir(models / "built"):
        pytest.skip("runs after the build above")
    (package,) = [os.path.join(d, "step.pt2") for d in (models / "built").iterdir()]
    llm = specontext.load(str(models / "a"), device="cpu", threads=1, weights="int4")
    step = AOTStep(package, llm.model)
    assert step.check() <= step.tolerance()
    with torch.no_grad():
        for layer in llm.model.model.layers:  # the eager model changes; the built graph does not know
            layer.input_layernorm.eps = 0.5
    with pytest.raises(specontext.InputError, match="differs from the eager model.*--compile-decode off"):
        step.check()


def test_aot_refuses_what_it_does_not_run(models):
    """At load, where the step would be built: int8 activations (the int8 x int8 kernel) are refused."""
    with pytest.raises(specontext.InputError, match="aot takes float activations"):
        specontext.load(str(models / "a"), device="cpu", weights="int8", activations="int8", compile_decode="aot")


def test_the_load_check_reads_rotary_and_the_past(models):
    """The check decodes after a prefilled past, so a built step whose rotary differs from the
    eager model's (a change at position 0 would not show) is refused."""
    from specontext.model.aot_step import AOTStep

    if not os.path.isdir(models / "built"):
        pytest.skip("runs after the build above")
    (package,) = [os.path.join(d, "step.pt2") for d in (models / "built").iterdir()]
    llm = specontext.load(str(models / "a"), device="cpu", threads=1, weights="int4")
    step = AOTStep(package, llm.model)
    llm.model.rotary.inv_freq *= 1.5
    with pytest.raises(specontext.InputError, match="differs from the eager model"):
        step.check()


def test_a_cache_folder_others_can_write_is_refused(models, tmp_path, monkeypatch):
    """A built step is native code this process runs: it is never loaded from a folder anyone else
    can write."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    monkeypatch.setenv("SPECONTEXT_AOT_DIR", str(shared))
    with pytest.raises(specontext.InputError, match="not yours alone.*SPECONTEXT_AOT_DIR"):
        specontext.load(str(models / "a"), device="cpu", threads=1, weights="int4", compile_decode="aot")
