"""The lm-eval model adapter and the offline RULER builder (bench_edge/ruler.py), on tiny models.

Needs the ``eval`` extra (lm-eval with its RULER dependencies); skipped without it. References:
the tiny model in Hugging Face transformers (float32) for greedy text and log-likelihoods, and
lm-eval's own task metric for RULER answers.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("wonderwords")  # lm-eval's RULER tasks need it (the eval extra installs it)

from lm_eval.api.instance import Instance  # noqa: E402

from specontext.errors import InputError  # noqa: E402
from specontext.evaluation import generation_config, hf_tokenizer_dir, render_chat  # noqa: E402
from specontext.evaluation.lm_eval_adapter import SpecontextLM  # noqa: E402
from specontext.tokenizer import Tokenizer  # noqa: E402

from conftest import CHATML_TEMPLATE, make_hf_model, write_tiny_tokenizer  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "bench_edge"))
EOS = 2


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("lm_eval") / "m")
    hf = make_hf_model("llama", folder, max_position_embeddings=256)
    return {"hf": hf, "folder": folder, "lm": SpecontextLM(model=folder, device="cpu")}


def _words(ids: list[int]) -> str:
    return " ".join(f"w{i}" for i in ids)


@torch.no_grad()
def _hf_logprobs(hf, ids: list[int]) -> torch.Tensor:
    """[T - 1] float32 log-probabilities of ids[1:] given the ones before, by transformers."""
    logits = hf(torch.tensor([ids])).logits[0, :-1].float()
    return torch.log_softmax(logits, dim=-1).gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1)


@torch.no_grad()
def _hf_greedy(hf, ids: list[int], n: int) -> list[int]:
    out = []
    for _ in range(n):
        token = int(hf(torch.tensor([ids + out])).logits[0, -1].argmax())
        if token == EOS:
            break
        out.append(token)
    return out


def _generate(lm, context: str, **gen_kwargs) -> str:
    return lm.generate_until([Instance("generate_until", doc={}, arguments=(context, gen_kwargs), idx=0)],
                             disable_tqdm=True)[0]


def test_the_model_is_registered_and_unknown_args_are_one_line_errors(tiny):
    from lm_eval.api.registry import get_model

    assert get_model("specontext") is SpecontextLM
    with pytest.raises(InputError) as err:
        SpecontextLM(model=tiny["folder"], budget=5)
    assert "unknown specontext model_args 'budget'" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(InputError, match="batch_size must be a positive integer"):
        SpecontextLM(model=tiny["folder"], batch_size="auto")


def test_generate_until_is_greedy_and_cut_at_the_first_stop_string(tiny):
    lm, hf = tiny["lm"], tiny["hf"]
    prompt = [5, 17, 33, 8, 61, 12, 40]
    reference = _words(_hf_greedy(hf, prompt, 12))
    assert _generate(lm, _words(prompt), max_gen_toks=12, until=[]) == reference
    stop = " " + reference.split(" ")[3]  # the fourth generated word
    assert _generate(lm, _words(prompt), max_gen_toks=12, until=[stop, "never"]) == reference.split(stop)[0]
    # several requests decode together and keep their own stop strings and lengths
    lm.batch_size = 2
    try:
        requests = [Instance("generate_until", doc={}, arguments=(_words(prompt), {"max_gen_toks": 12, "until": stop}),
                             idx=0),
                    Instance("generate_until", doc={}, arguments=(_words(prompt[:4]), {"max_gen_toks": 3}), idx=0)]
        assert lm.generate_until(requests, disable_tqdm=True) == [reference.split(stop)[0],
                                                                  _words(_hf_greedy(hf, prompt[:4], 3))]
    finally:
        lm.batch_size = 1


@pytest.mark.parametrize("settings", [{}, {"sparsity": "streaming", "budget_tokens": 200}],
                         ids=["dense-prefill", "teacher-forced"])
def test_loglikelihood_equals_the_float32_reference(tiny, settings):
    """Dense scores by prefill; a sparse method teacher-forces (a budget above the context is exact)."""
    hf = tiny["hf"]
    lm = tiny["lm"] if not settings else SpecontextLM(model=tiny["folder"], device="cpu", **settings)
    context = [4, 9, 22, 31, 7, 50, 11, 63]
    pairs = [(context, [14, 3, 27]), (context, [88]), ([], [6, 19, 44])]  # two share a context; one has none
    requests = [Instance("loglikelihood", doc={}, arguments=(_words(c), " " + _words(x) if c else _words(x)), idx=0)
                for c, x in pairs]
    got = lm.loglikelihood(requests, disable_tqdm=True)
    for (c, x), (logprob, greedy) in zip(pairs, got):
        ids = (c or [lm.prefix_token_id]) + x
        ref = _hf_logprobs(hf, ids)[-len(x):]
        assert logprob == pytest.approx(float(ref.sum()), abs=1e-4)
        with torch.no_grad():
            argmax = hf(torch.tensor([ids])).logits[0, :-1].argmax(-1)[-len(x):]
        assert greedy == bool((argmax == torch.tensor(x)).all())
    # the greedy continuation is greedy
    greedy_cont = _hf_greedy(hf, context, 3)
    (_, is_greedy), = lm.loglikelihood([Instance("loglikelihood", doc={},
                                                 arguments=(_words(context), " " + _words(greedy_cont)), idx=0)],
                                       disable_tqdm=True)
    assert is_greedy


def test_a_small_budget_changes_teacher_forced_scores(tiny):
    long_context = [3 + (7 * i) % 90 for i in range(120)]
    request = [Instance("loglikelihood", doc={}, arguments=(_words(long_context), " w5 w6 w7 w8"), idx=0)]
    dense = tiny["lm"].loglikelihood(request, disable_tqdm=True)[0][0]
    sparse = SpecontextLM(model=tiny["folder"], device="cpu", sparsity="streaming", budget_tokens=16,
                          sink_tokens=2).loglikelihood(request, disable_tqdm=True)[0][0]
    assert abs(dense - sparse) > 1e-3


def test_loglikelihood_rolling_scores_every_token_once(tiny):
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    lm, hf = tiny["lm"], tiny["hf"]
    ids = [3 + (11 * i) % 90 for i in range(40)]
    request = [Instance("loglikelihood_rolling", doc={}, arguments=(_words(ids),), idx=0)]
    whole = float(_hf_logprobs(hf, [lm.prefix_token_id] + ids).sum())
    assert lm.loglikelihood_rolling(request, disable_tqdm=True)[0] == pytest.approx(whole, abs=1e-4)
    lm.max_length = 16
    try:
        windows = [make_disjoint_window(w) for w in get_rolling_token_windows(ids, lm.prefix_token_id, 16, 1)]
        expected = sum(float(_hf_logprobs(hf, c + p)[-len(p):].sum()) for c, p in windows)
        assert lm.loglikelihood_rolling(request, disable_tqdm=True)[0] == pytest.approx(expected, abs=1e-4)
    finally:
        lm.max_length = lm.llm.engine.context_tokens - 1


def test_chat_rendering_continues_lm_evals_answer_prefix(tmp_path):
    write_tiny_tokenizer(str(tmp_path), 96, chat_template=CHATML_TEMPLATE)
    tok = Tokenizer.from_hf_folder(str(tmp_path))
    messages = [{"role": "user", "content": "w5 w6"}, {"role": "assistant", "content": "w7 is"}]
    assert render_chat(tok, messages, add_generation_prompt=False) == \
        "<|im_start|>user\nw5 w6<|im_end|>\n<|im_start|>assistant\nw7 is"
    assert render_chat(tok, messages[:1]) == "<|im_start|>user\nw5 w6<|im_end|>\n<|im_start|>assistant\n"


def test_generation_keywords_map_to_the_engine():
    gen = generation_config({"until": "\n\n", "max_gen_toks": 7, "do_sample": False, "temperature": 0.8})
    assert (gen.stop, gen.max_new_tokens, gen.temperature) == (("\n\n",), 7, 0.0)
    gen = generation_config({"until": ["a", ""], "do_sample": True, "temperature": 0.5, "top_p": 0.9})
    assert (gen.stop, gen.max_new_tokens, gen.temperature, gen.top_p) == (("a",), 256, 0.5, 0.9)
    with pytest.raises(InputError, match="'num_beams' is not supported"):
        generation_config({"num_beams": 4})


def test_ruler_niah_builds_offline_and_is_scored_by_the_task_metric(tiny, tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    import ruler

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # punkt_tab is trained afresh, here
    tok = tiny["lm"].llm.tokenizer
    tok_dir = hf_tokenizer_dir(tok, str(tmp_path / "tok"))
    samples = ruler.ruler_samples("niah_single_1", 512, 2, tok_dir)
    assert len(samples) == 2
    for s in samples:
        (answer,) = s.answers
        assert answer in s.prompt_text and s.prompt_text.endswith("mentioned in the provided text is")
        assert len(tok.encode(s.prompt_text)) + s.gen_kwargs["max_gen_toks"] <= 512
        assert ruler.score(s, f" {answer}.") == 1.0
        assert ruler.score(s, " 0000000.") == 0.0
    again = ruler.ruler_samples("niah_single_1", 512, 2, tok_dir)  # seeds fixed: the same instances
    assert [s.prompt_text for s in again] == [s.prompt_text for s in samples]
    with pytest.raises(InputError, match="cannot be built offline"):
        ruler.ruler_samples("ruler_qa_squad", 512, 1, tok_dir)
