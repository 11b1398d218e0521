"""The real default model (SmolLM2-135M-Instruct GGUF) against llama.cpp, and end-to-end answers.

The llama.cpp comparisons skip when the optional llama-cpp-python extra is not installed.
"""

from __future__ import annotations

import pytest
import torch

from specontext import assets

TOKENIZER_CASES = [
    "Hello, world!",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "naïve café, Zürich — 東京 🚀👩‍💻 Ελληνικά русский",
    "spaces:    four,\t\ttabs, \n\n\nnewlines  \n  and trailing   ",
    "numbers 1234567 3.14159 and 2026-11-23",
    "<|endoftext|>code: def f(x):\n    return x**2  # comment",
    "",
]


@pytest.fixture(scope="module")
def llama_cpp_model():
    llama_cpp = pytest.importorskip("llama_cpp")
    return llama_cpp.Llama(model_path=assets.default_model_path(), n_ctx=1024, n_threads=2, n_batch=512,
                           logits_all=True, verbose=False)


@pytest.mark.parametrize("text", TOKENIZER_CASES)
def test_token_ids_equal_llama_cpp(default_llm, llama_cpp_model, text):
    ours = default_llm.tokenizer.encode(text, add_bos=False)
    theirs = llama_cpp_model.tokenize(text.encode("utf-8"), add_bos=False, special=True)
    assert ours == theirs


def test_next_token_distributions_agree_with_llama_cpp(default_llm, llama_cpp_model):
    text = open(assets.essay_files()[0], encoding="utf-8").read()
    ids = default_llm.tokenizer.encode(text, add_bos=False)[:300]
    assert len(ids) == 300
    llama_cpp_model.reset()
    llama_cpp_model.eval(ids)
    theirs = torch.tensor(llama_cpp_model.scores[: len(ids)], dtype=torch.float32)
    cache = default_llm.engine.new_cache(len(ids))
    ours = default_llm.engine.prefill(ids, cache, logits_for="all")[0]
    top1 = (ours.argmax(-1) == theirs.argmax(-1)).float().mean().item()
    log_p, log_q = theirs.log_softmax(-1), ours.log_softmax(-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).mean().item()
    print(f"llama.cpp agreement over {len(ids)} tokens: top-1 {top1:.4f}, mean KL {kl:.5f}")
    assert top1 >= 0.95
    assert kl <= 0.01


def test_the_quick_start_question_through_the_cli(tmp_path):
    """The quick start's question, on the default model as it loads by default (int4 from the
    GGUF's Q4_1). Not "the capital of France": there the model's first token is a near-tie ("The"
    25.33 against "L" 25.24 in float32), which llama.cpp on the same file, and our int4, resolve
    the other way ("L'Étoile, ...")."""
    from specontext.cli import main

    out = tmp_path / "answer.txt"
    code = main(["--question", "What is the largest ocean on Earth?", "--max-new-tokens", "24",
                 "--output", str(out), "--quiet", "--device", "cpu"])
    assert code == 0
    assert "Pacific" in out.read_text(encoding="utf-8")


def _haystack_with_needle(tokenizer, num_tokens: int, depth: float) -> str:
    ids = tokenizer.encode(assets.essay_text(), add_bos=False)[:num_tokens]
    cut = int(len(ids) * depth)
    before, after = tokenizer.decode(ids[:cut]), tokenizer.decode(ids[cut:])
    # put the needle at a sentence boundary near the requested depth, as the standard test does
    stop = before.rfind(". ")
    if stop > 0:
        before, after = before[: stop + 1], before[stop + 1:] + after
    return f"{before} {assets.NEEDLE} {after}"


def test_needle_in_2000_tokens_of_essays(default_llm):
    doc = _haystack_with_needle(default_llm.tokenizer, 2000, 0.5)
    prompt = f"{doc}\n\n{assets.NEEDLE_QUESTION} Answer in one sentence."
    result = default_llm.generate(prompt, max_new_tokens=40)
    answer = result.text.lower()
    assert "sandwich" in answer and "dolores park" in answer, result.text


def test_readme_api_example_runs_as_written():
    import pathlib
    import re

    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Python API", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert "Pacific" in namespace["result"].text
