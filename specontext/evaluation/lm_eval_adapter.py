"""The ``specontext`` model for lm-evaluation-harness (registered when this module is imported).

Run lm-eval's CLI through this module (``python -m specontext.evaluation.lm_eval_adapter
--model specontext ...``; see :mod:`specontext.evaluation`), or import it before
``lm_eval.simple_evaluate(model="specontext", ...)``.

Shape letters: T tokens, V vocabulary.

* ``generate_until``: each prompt is prefilled (dense) and decoded with the model's sparsity
  settings, ``batch_size`` requests at a time; stop strings are cut from the text, as lm-eval
  expects.
* ``loglikelihood`` / ``loglikelihood_rolling``: each distinct context is prefilled once. With
  ``sparsity=dense`` the continuation is scored by a prefill over it; with a sparse method it is
  teacher-forced, one decode step per token under that method, so the score is what the sparse
  decoder would assign (and costs a decode step per scored token).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import fields

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from ..api import LLM, load
from ..cli.common import run_main
from ..errors import InputError, SpecontextError
from ..settings import RuntimeSettings
from . import MODEL_NAME, generation_config, hf_tokenizer_dir, read_tokenizer, render_chat

log = logging.getLogger(__name__)


@register_model(MODEL_NAME)
class SpecontextLM(TemplateLM):
    """An lm-eval model backed by a specontext :class:`~specontext.api.LLM`.

    Args (lm-eval ``--model_args``):
        model: a ``.gguf`` file or Hugging Face folder; default SmolLM2-135M-Instruct.
        max_length: the most tokens a scored or generated sequence may hold; default one less
            than the model's context (the engine keeps room for a generated token). Longer
            prompts lose their start, as in lm-eval's own models.
        batch_size: requests generated together (an integer; lm-eval passes its ``--batch_size``).
        device: lm-eval's ``--device``; a CUDA device on a machine without one falls back to
            ``auto`` (lm-eval's CLI passes ``cuda:0`` unless told otherwise).
        **settings: :class:`RuntimeSettings` fields, e.g. ``sparsity=quest,budget_tokens=512``.

    Example::

        lm = SpecontextLM(sparsity="streaming", budget_tokens=256, device="cpu")
        lm.generate_until([Instance("generate_until", doc={}, arguments=("Q: 2+2=", {"until": ["\\n"]}), idx=0)])
    """

    def __init__(self, model: str | None = None, max_length: int | None = None, batch_size: int | str = 1,
                 max_batch_size: int | None = None, device: str | None = None, **settings):
        super().__init__()
        allowed = {f.name for f in fields(RuntimeSettings)}
        unknown = sorted(set(settings) - allowed)
        if unknown:
            raise InputError(f"unknown specontext model_args {unknown[0]!r}; valid: model, max_length, batch_size, "
                             f"{', '.join(sorted(allowed))}")
        if device is not None:
            if device.startswith("cuda") and not torch.cuda.is_available():
                log.warning("device %s requested but no CUDA GPU is available; using auto", device)
                device = "auto"
            settings["device"] = device
        if not str(batch_size).isdigit() or int(batch_size) < 1:
            raise InputError(f"batch_size must be a positive integer for the specontext model, got {batch_size!r}")
        self.batch_size = int(batch_size)
        self.llm: LLM = load(model, **settings)
        limit = self.llm.engine.context_tokens - 1
        if max_length is not None and not 1 < int(max_length) <= limit:
            raise InputError(f"max_length must be in [2, {limit}] for this model, got {max_length}")
        self.max_length = int(max_length) if max_length is not None else limit
        self._warned_truncation = False

    # -- what lm-eval asks of a model -------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        tok = self.llm.tokenizer
        return (tok.eos_token_ids or self.llm.config.eos_token_ids)[0]

    @property
    def prefix_token_id(self) -> int:
        # an empty context is conditioned on BOS where the model has one, else on EOS
        bos = self.llm.tokenizer.bos_token_id
        return bos if bos is not None else self.eot_token_id

    @property
    def tokenizer_name(self) -> str:
        return f"{MODEL_NAME}-{os.path.basename(os.path.normpath(self.llm.path))}"

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.llm.tokenizer.chat_template if chat_template else None

    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
        return render_chat(self.llm.tokenizer, chat_history, add_generation_prompt)

    def get_model_info(self) -> dict:
        opts = self.llm.settings
        return {"specontext_model": self.llm.path, "max_length": self.max_length,
                **{f.name: getattr(opts, f.name) for f in fields(RuntimeSettings)}}

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.llm.tokenizer.encode(string, add_bos=add_special_tokens)

    def tok_decode(self, tokens: list[int]) -> str:
        return self.llm.tokenizer.decode(tokens)

    # -- generation --------------------------------------------------------------------------

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (unless a request samples) continuations, cut at the first ``until`` string."""
        out: list[str] = []
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="specontext generate_until")
        for start in range(0, len(requests), self.batch_size):
            group = requests[start:start + self.batch_size]
            gens = [generation_config(dict(r.args[1])) for r in group]
            ids = [self._fit(self.tok_encode(r.args[0]), g.max_new_tokens) for r, g in zip(group, gens)]
            if len(group) == 1:
                g = self.llm.engine.generate(ids[0], gens[0])
                for _ in g:
                    pass
                texts = [g.result().text]
            else:
                batch = self.llm.engine.generate_batch(ids, gens)
                for _ in batch:
                    pass
                texts = [r.text for r in batch.results()]
            for r, text in zip(group, texts):
                self.cache_hook.add_partial("generate_until", r.args, text)
            out.extend(texts)
            bar.update(len(group))
        bar.close()
        return out

    def _fit(self, ids: list[int], max_new_tokens: int) -> list[int]:
        """Drop the start of a prompt that leaves no room for ``max_new_tokens`` within ``max_length``."""
        keep = max(self.max_length - max_new_tokens, 1)
        if len(ids) > keep:
            if not self._warned_truncation:
                log.warning("prompt of %d tokens cut to its last %d (max_length %d, max_gen_toks %d)",
                            len(ids), keep, self.max_length, max_new_tokens)
                self._warned_truncation = True
            ids = ids[-keep:]
        return ids

    # -- scoring -----------------------------------------------------------------------------

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(sum of log-probabilities, whether greedy decoding yields it) per (key, context, continuation).

        Requests sharing a context share its prefill.
        """
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        by_context: dict[tuple[int, ...], list[int]] = {}
        for i, (_, ctx, cont) in enumerate(requests):
            if not cont:
                raise InputError("loglikelihood: the continuation encodes to no tokens")
            if len(cont) > self.max_length:
                raise InputError(f"loglikelihood: the continuation is {len(cont)} tokens, more than max_length "
                                 f"({self.max_length})")
            # the model reads (context + continuation)[:-1]; keep its last max_length tokens
            keep = self.max_length + 1 - len(cont)
            by_context.setdefault(tuple(ctx[-keep:]), []).append(i)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="specontext loglikelihood")
        for ctx, members in by_context.items():
            conts = [requests[i][2] for i in members]
            for i, scored in zip(members, self._score(list(ctx), conts)):
                results[i] = scored
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], scored)
            bar.update(len(members))
        bar.close()
        return results

    @torch.inference_mode()
    def _score(self, prefix: list[int], continuations: list[list[int]]) -> list[tuple[float, bool]]:
        """Score each continuation after one shared prefill of ``prefix``."""
        engine = self.llm.engine
        state = engine.prefill_state(prefix, len(prefix) + max(len(c) for c in continuations))
        scored = []
        for cont in continuations:
            if engine.sparsity.method == "dense":
                state.cache.rewind(len(prefix))
                logits = [state.logits.float()]  # [1, V] predicts cont[0]
                chunk = engine.settings.prefill_chunk_tokens
                for start in range(0, len(cont) - 1, chunk):
                    logits.append(engine.prefill(cont[start:min(start + chunk, len(cont) - 1)], state.cache,
                                                 logits_for="all")[0].float())
                logits = torch.cat(logits, dim=0)  # [T, V], row t predicts cont[t]
            else:
                logits, _ = engine.teacher_forced(prefix, cont, state=state)
            target = torch.tensor(cont, device=logits.device)
            logprobs = torch.log_softmax(logits, dim=-1).gather(-1, target[:, None]).squeeze(-1)
            scored.append((float(logprobs.sum()), bool((logits.argmax(dim=-1) == target).all())))
        return scored

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of each whole text, in windows of ``max_length`` tokens (lm-eval's rolling scheme)."""
        out = []
        for r in tqdm(requests, disable=disable_tqdm, desc="specontext loglikelihood_rolling"):
            (text,) = r.args
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)]
            total = sum(lp for lp, _ in self._loglikelihood_tokens([(None, c, p) for c, p in windows],
                                                                   disable_tqdm=True))
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
            out.append(total)
        return out


def main(argv: list[str] | None = None) -> int:
    """lm-eval's command line with the ``specontext`` model registered; returns the exit status.

    When ``--model specontext`` is chosen and neither ``--model_args`` nor ``--metadata`` names a
    ``tokenizer``, the metadata gets one: a Hugging Face folder made from the model's own
    tokenizer, which the synthetic RULER tasks size their prompts with (no hub access).

    Errors end as every specontext command's do (:func:`specontext.cli.common.run_main`): one
    line, with lm-eval's ValueErrors counted as bad input; ``--debug`` (ours, taken out before
    lm-eval parses the rest) shows the traceback instead.
    """
    from lm_eval._cli import HarnessCLI
    from lm_eval.utils import setup_logging

    setup_logging()
    harness = HarnessCLI()

    def parse_args(argv: list[str] | None) -> argparse.Namespace:
        given = sys.argv[1:] if argv is None else list(argv)
        sys.argv = [sys.argv[0], *(a for a in given if a != "--debug")]  # lm-eval parses sys.argv itself
        args = harness.parse_args()
        args.debug = "--debug" in given
        return args

    def run(args: argparse.Namespace) -> int:
        del args.debug  # run_main has read it; lm-eval turns every option it is given into its config
        if getattr(args, "model", None) == MODEL_NAME:
            model_args, metadata = args.model_args or {}, args.metadata or {}
            if "tokenizer" not in model_args and "tokenizer" not in metadata:
                args.metadata = {**metadata, "tokenizer": hf_tokenizer_dir(read_tokenizer(model_args.get("model")))}
        harness.execute(args)
        return 0

    return run_main("lm-eval", parse_args, run, argv, errors=(SpecontextError, ValueError))


if __name__ == "__main__":
    sys.exit(main())
