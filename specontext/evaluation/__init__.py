"""Evaluation with lm-evaluation-harness: the ``specontext`` model for lm-eval, and what it shares.

lm-eval 0.4.x finds a model by name in its registry; it has no plugin entry points for models, so
the module that registers ours must be imported first. Two ways, both offline-safe (install the
``eval`` extra: ``pip install "specontext[eval]"``):

* **Command line**: lm-eval's own CLI, run through our module, which registers the model and
  points the synthetic RULER tasks at a tokenizer folder made from the model's own tokenizer::

      python -m specontext.evaluation.lm_eval_adapter --model specontext \\
          --model_args sparsity=specontext,budget_tokens=1024 \\
          --tasks niah_single_1 --metadata '{"max_seq_lengths": [4096]}' --limit 20

  Every lm-eval option works as with ``lm_eval``; ``--model_args`` takes ``model=PATH`` (a
  ``.gguf`` or Hugging Face folder; default SmolLM2-135M-Instruct), ``max_length=N`` and any
  :class:`~specontext.settings.RuntimeSettings` field (``sparsity``, ``budget_tokens``,
  ``retrieval_head``, ``offload_layers``, ``device``, ``dtype``, ``threads``, ...).

* **Python**::

      import lm_eval
      import specontext.evaluation.lm_eval_adapter  # registers "specontext"
      from specontext.evaluation import hf_tokenizer_dir, read_tokenizer

      tok_dir = hf_tokenizer_dir(read_tokenizer(None))      # for the RULER tasks
      out = lm_eval.simple_evaluate(model="specontext", model_args={"sparsity": "quest"},
                                    tasks=["niah_single_1"], limit=10,
                                    metadata={"tokenizer": tok_dir, "max_seq_lengths": [4096]})

Prompts are encoded as lm-eval renders them. lm-eval applies a chat template only when asked
(``--apply_chat_template``); the model then renders it with :func:`render_chat`. Generation is
greedy unless a task asks to sample; prefill is always dense, so the first generated token always
comes from the full context, whatever the sparsity method.
"""

from __future__ import annotations

import hashlib
import json
import os

from ..errors import InputError
from ..settings import GenerationConfig
from ..tokenizer import Tokenizer

MODEL_NAME = "specontext"  # the name lm-eval knows the model by
DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's default when a task gives no max_gen_toks
# lm-eval generation keywords this runtime honours; any other one is refused, not ignored
GEN_KWARGS = ("until", "max_gen_toks", "do_sample", "temperature", "top_p", "top_k", "seed")


def read_tokenizer(model: str | None) -> Tokenizer:
    """The tokenizer of ``model`` (a ``.gguf`` file, a Hugging Face folder, or None for the default
    model), read without loading the weights."""
    from .. import assets
    from ..loaders.gguf_loader import GGUFFile
    from ..loaders.hf import load_hf_config, read_generation_eos

    path = model or assets.default_model_path()
    if os.path.isdir(path):
        cfg = load_hf_config(path)
        return Tokenizer.from_hf_folder(path, eos_token_ids=cfg.eos_token_ids + read_generation_eos(path),
                                        bos_token_id=cfg.bos_token_id)
    return Tokenizer.from_gguf_fields(GGUFFile(path).meta)


def hf_tokenizer_dir(tokenizer: Tokenizer, folder: str | None = None) -> str:
    """A Hugging Face tokenizer folder (``tokenizer.json`` and ``tokenizer_config.json``) for ``tokenizer``.

    lm-eval's synthetic tasks (RULER) size their prompts with ``transformers.AutoTokenizer``;
    given this folder they count exactly the tokens our engine will see, without any hub access.

    Args:
        tokenizer: the model's :class:`Tokenizer`.
        folder: where to write; default ``$XDG_CACHE_HOME/specontext/hf_tokenizers/<digest>``,
            keyed by the tokenizer's content, written once.
    Returns:
        the folder's path.
    """
    body = tokenizer.backend.to_str()
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": tokenizer.add_bos,
              "bos_token": _token_text(tokenizer, tokenizer.bos_token_id),
              "eos_token": _token_text(tokenizer, tokenizer.eos_token_ids[0] if tokenizer.eos_token_ids else None)}
    if tokenizer.chat_template:
        config["chat_template"] = tokenizer.chat_template
    config_text = json.dumps(config, indent=1, sort_keys=True)
    if folder is None:
        digest = hashlib.sha256((body + config_text).encode()).hexdigest()[:16]
        cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        folder = os.path.join(cache, "specontext", "hf_tokenizers", digest)
    os.makedirs(folder, exist_ok=True)
    for name, text in (("tokenizer.json", body), ("tokenizer_config.json", config_text)):
        path = os.path.join(folder, name)
        if _read_text(path) != text:
            tmp = f"{path}.{os.getpid()}.tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)
            os.replace(tmp, path)  # readers never see a half-written file
    return folder


def _read_text(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError:
        return None


def _token_text(tokenizer: Tokenizer, token_id: int | None) -> str | None:
    return tokenizer.token_text(token_id) if token_id is not None else None


def render_chat(tokenizer: Tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> str:
    """Render lm-eval's chat history with the model's template.

    With ``add_generation_prompt=False`` and an assistant message last (lm-eval's ``gen_prefix``,
    the start of the answer), the answer is continued rather than closed: the earlier messages
    are rendered with the generation prompt and the assistant text is appended as it is, the
    ``continue_final_message`` behaviour of Hugging Face tokenizers.
    """
    if not add_generation_prompt and messages and messages[-1].get("role") == "assistant":
        return tokenizer.render_chat(messages[:-1], add_generation_prompt=True) + messages[-1]["content"]
    return tokenizer.render_chat(messages, add_generation_prompt=add_generation_prompt)


def generation_config(gen_kwargs: dict, default_max_gen_toks: int = DEFAULT_MAX_GEN_TOKS) -> GenerationConfig:
    """lm-eval's generation keywords as a :class:`GenerationConfig`.

    ``until`` (a string or a list) become stop strings, ``max_gen_toks`` the token limit;
    ``do_sample`` false (the default) means greedy whatever the temperature. Unknown keywords
    raise InputError naming the supported ones.
    """
    unknown = sorted(set(gen_kwargs) - set(GEN_KWARGS))
    if unknown:
        raise InputError(f"generation keyword {unknown[0]!r} is not supported by the specontext model; "
                         f"supported: {', '.join(GEN_KWARGS)}")
    until = gen_kwargs.get("until") or ()
    stop = tuple(s for s in ([until] if isinstance(until, str) else until) if s)
    sample = bool(gen_kwargs.get("do_sample", False))
    temperature = float(gen_kwargs.get("temperature", 1.0)) if sample else 0.0
    return GenerationConfig(max_new_tokens=int(gen_kwargs.get("max_gen_toks", default_max_gen_toks)),
                            temperature=temperature, top_p=float(gen_kwargs.get("top_p", 1.0)) if sample else 1.0,
                            top_k=int(gen_kwargs.get("top_k", 0)) if sample else 0,
                            seed=int(gen_kwargs.get("seed", 0)), stop=stop)
