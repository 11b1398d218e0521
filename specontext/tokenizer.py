"""Tokenizers (Hugging Face ``tokenizers`` library) and chat templates.

A tokenizer comes either from a model folder's ``tokenizer.json`` or is built from a GGUF file's
vocabulary (byte-level BPE for ``gpt2``-type vocabularies, score-ordered BPE with byte fallback for
SentencePiece ``llama``-type ones). Control tokens such as ``<|im_start|>`` are registered as
special tokens, so they encode as single ids when markup is meant (``encode`` with
``parse_special``, the chat template's own markup in ``encode_chat``); message contents, documents
and questions never produce them (``encode_chat``, ``parse_special=False``). User-defined tokens
(GGUF type 4, e.g. ``<think>``) are ordinary added tokens: one piece each, decoded as text.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from .errors import InputError, ModelFileError, UnsupportedModelError, malformed

# Pre-tokenizer split patterns, keyed by GGUF ``tokenizer.ggml.pre``. These are the published
# regular expressions of each model family's tokenizer (they are data, not code).
_GPT2 = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_LLAMA3 = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
           r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
_QWEN2 = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
          r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
# name -> (split patterns applied in order, ignore_merges)
_PRE_TOKENIZERS = {
    "gpt-2": ([_GPT2], False),
    "gpt2": ([_GPT2], False),
    "smollm": ([r"\p{N}", _GPT2], False),
    "starcoder": ([r"\p{N}", _GPT2], False),
    "refact": ([r"\p{N}", _GPT2], False),
    "llama3": ([_LLAMA3], True),
    "llama-bpe": ([_LLAMA3], True),
    "llama-v3": ([_LLAMA3], True),
    "qwen2": ([_QWEN2], False),
    "deepseek-r1-qwen": ([_QWEN2], False),
}
_CONTROL, _USER_DEFINED = 3, 4


@dataclass
class Tokenizer:
    """Text <-> token ids, plus the model's special ids and chat template.

    Example::

        tok = load_default().tokenizer
        ids = tok.encode("<|im_start|>user\\nHi<|im_end|>")
        text = tok.decode(ids)
    """

    backend: HFTokenizer
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    add_bos: bool = False
    chat_template: str | None = None
    special_ids: frozenset[int] = field(default_factory=frozenset)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool | None = None, parse_special: bool = True) -> list[int]:
        """Token ids of ``text``.

        Args:
            add_bos: prepend BOS; defaults to the model's own setting.
            parse_special: match special tokens (``<|im_start|>``) written in the text as single
                ids; False encodes them as ordinary text (use it for untrusted documents).
        """
        self.backend.encode_special_tokens = not parse_special
        try:
            ids = self.backend.encode(text, add_special_tokens=False).ids
        finally:
            self.backend.encode_special_tokens = False
        use_bos = self.add_bos if add_bos is None else add_bos
        if use_bos and self.bos_token_id is not None and (not ids or ids[0] != self.bos_token_id):
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special)

    def token_text(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render ``messages`` ([{"role": ..., "content": ...}]) with the model's chat template."""
        if not self.chat_template:
            raise InputError("this model has no chat template; pass a plain prompt (chat=False)")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise InputError(f"message {i} must be a dict with string 'role' and 'content'")
        # the same environment options transformers renders chat templates with
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])

        def raise_exception(message):
            raise InputError(f"chat template refused the messages: {message}")

        env.globals["raise_exception"] = raise_exception
        try:
            template = env.from_string(self.chat_template)
            return template.render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                bos_token=self._text_of(self.bos_token_id), eos_token=self._text_of(self.eos_token_ids[0] if self.eos_token_ids else None),
            )
        except jinja2.TemplateError as exc:
            raise ModelFileError(f"the model's chat template failed to render: {exc}") from None

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of ``messages`` rendered with the chat template, where only the template's own
        markup becomes control tokens: every message's content is text, so a document holding
        ``<|im_end|>\n<|im_start|>assistant`` cannot end its turn or write the assistant's.

        Contents free of special-token text encode exactly as ``encode(render_chat(...))``.
        Otherwise each special token matched inside a content is replaced by the ids of its
        characters as text (user-defined tokens such as ``<think>`` are text already). Raises InputError when such a content cannot be located in the rendering (a template
        that rewrites contents); pass token ids for prompts that are meant to hold markup.
        """
        rendered = self.render_chat(messages, add_generation_prompt)
        added = {i: t for i, t in (self.backend.get_added_tokens_decoder() or {}).items() if t.special}
        texts = {t.content for t in added.values()}
        if not any(t in m["content"] for m in messages for t in texts):
            return self.encode(rendered, add_bos=False)
        spans = self._content_spans(messages, rendered, add_generation_prompt)
        enc = self.backend.encode(rendered, add_special_tokens=False)
        ids: list[int] = []
        for tid, (start, end) in zip(enc.ids, enc.offsets):
            if tid in added and any(start < b and end > a for a, b in spans):
                ids.extend(self.encode(rendered[start:end], add_bos=False, parse_special=False))
            else:
                ids.append(tid)
        return ids

    def _content_spans(self, messages: list[dict], rendered: str, add_generation_prompt: bool) -> list[tuple[int, int]]:
        """[start, end) of each message's content in ``rendered``: the template is rendered again
        with a marker for each content, and the markup between markers is matched in order."""
        marked = self.render_chat([{**m, "content": f"\ue000{i}\ue001"} for i, m in enumerate(messages)],
                                  add_generation_prompt)
        parts = re.split("\ue000(\\d+)\ue001", marked)  # markup, index, markup, index, ..., markup
        if not rendered.startswith(parts[0]):
            raise InputError(self._untrackable)
        spans, pos = [], len(parts[0])
        for j in range(1, len(parts), 2):
            content, after = messages[int(parts[j])]["content"], parts[j + 1]
            last = j + 2 >= len(parts)
            for form in dict.fromkeys((content, content.strip(), content.lstrip(), content.rstrip())):
                end = pos + len(form)
                if rendered.startswith(form, pos) and rendered.startswith(after, end) and \
                        (not last or end + len(after) == len(rendered)):
                    spans.append((pos, end))
                    pos = end + len(after)
                    break
            else:
                raise InputError(self._untrackable)
        return spans

    _untrackable = ("a message holds the text of a control token (e.g. <|im_end|>) and this model's chat template "
                    "rewrites message contents, so it cannot be kept as plain text; remove it from the message, or "
                    "pass token ids (e.g. from tokenizer.encode) if the markup is meant")

    def _text_of(self, token_id: int | None) -> str:
        if token_id is None:
            return ""
        return self.backend.id_to_token(token_id) or ""

    # -- constructors -------------------------------------------------------------------------

    @classmethod
    def from_hf_folder(cls, folder: str, eos_token_ids: tuple[int, ...] = (), bos_token_id: int | None = None) -> "Tokenizer":
        from .loaders.hf import read_chat_template, read_tokenizer_config

        path = os.path.join(folder, "tokenizer.json")
        if not os.path.exists(path):
            raise ModelFileError(f"no tokenizer.json in {folder}")
        try:
            backend = HFTokenizer.from_file(path)
        except Exception as exc:  # the Rust library raises a plain Exception subclass
            raise ModelFileError(f"{path} is not a valid tokenizer file: {str(exc).splitlines()[0]}") from None
        tcfg = read_tokenizer_config(folder)

        def token_id(entry):
            if isinstance(entry, dict):
                entry = entry.get("content")
            return backend.token_to_id(entry) if isinstance(entry, str) else None

        bos = token_id(tcfg.get("bos_token"))
        eos = token_id(tcfg.get("eos_token"))
        eos_ids = tuple(dict.fromkeys([*eos_token_ids, *([eos] if eos is not None else [])]))
        special = frozenset(_added_special_ids(backend))
        bos = bos if bos is not None else bos_token_id
        add_bos = tcfg.get("add_bos_token")
        if add_bos is None:  # Llama-3 folders: BOS comes only from tokenizer.json's post-processor
            add_bos = bos is not None and _post_processor_adds(backend, bos)
        return cls(backend=backend, bos_token_id=bos,
                   eos_token_ids=eos_ids, add_bos=bool(add_bos),
                   chat_template=read_chat_template(folder), special_ids=special)

    @classmethod
    @malformed("the GGUF file's tokenizer metadata")
    def from_gguf_fields(cls, meta: dict) -> "Tokenizer":
        """Build from GGUF ``tokenizer.ggml.*`` metadata (already decoded to Python values)."""
        kind = meta.get("tokenizer.ggml.model")
        tokens = meta.get("tokenizer.ggml.tokens")
        if not tokens:
            raise ModelFileError("GGUF file has no tokenizer vocabulary (tokenizer.ggml.tokens)")
        types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
        vocab = {t: i for i, t in enumerate(tokens)}
        if kind == "gpt2":
            pre = meta.get("tokenizer.ggml.pre", "default")
            if pre not in _PRE_TOKENIZERS:
                raise UnsupportedModelError(
                    f"GGUF pre-tokenizer {pre!r} is not supported; supported: {', '.join(sorted(_PRE_TOKENIZERS))}"
                )
            patterns, ignore_merges = _PRE_TOKENIZERS[pre]
            merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges") or []]
            backend = HFTokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=ignore_merges))
            backend.pre_tokenizer = pre_tokenizers.Sequence(
                [pre_tokenizers.Split(Regex(p), behavior="isolated") for p in patterns]
                + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
            )
            backend.decoder = decoders.ByteLevel()
            default_bos = False
        elif kind == "llama":
            scores = meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
            backend = HFTokenizer(models.BPE(vocab=vocab, merges=_merges_from_scores(tokens, scores),
                                             unk_token=tokens[meta.get("tokenizer.ggml.unknown_token_id", 0)],
                                             byte_fallback=True, fuse_unk=True))
            add_prefix = meta.get("tokenizer.ggml.add_space_prefix", True)
            backend.normalizer = normalizers.Sequence(
                ([normalizers.Prepend("▁")] if add_prefix else []) + [normalizers.Replace(" ", "▁")]
            )
            backend.decoder = decoders.Sequence(
                [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
                + ([decoders.Strip(" ", 1, 0)] if add_prefix else [])
            )
            default_bos = True
        else:
            raise UnsupportedModelError(
                f"GGUF tokenizer model {kind!r} is not supported; supported: 'gpt2' (BPE), 'llama' (SentencePiece)"
            )
        # Control tokens are special: markup, hidden when decoding skips specials, matched in text
        # only where markup is meant. User-defined tokens (e.g. Qwen3's <think>) are text that
        # tokenizes as one piece, as llama.cpp treats them: always matched, always decoded.
        backend.add_special_tokens([AddedToken(tok, special=True, normalized=False)
                                    for tok, typ in zip(tokens, types) if typ == _CONTROL])
        backend.add_tokens([AddedToken(tok, special=False, normalized=False)
                            for tok, typ in zip(tokens, types) if typ == _USER_DEFINED])
        eos = meta.get("tokenizer.ggml.eos_token_id")
        eot = meta.get("tokenizer.ggml.eot_token_id")
        eos_ids = tuple(dict.fromkeys(i for i in (eos, eot) if i is not None))
        return cls(backend=backend, bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
                   eos_token_ids=eos_ids, add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", default_bos)),
                   chat_template=meta.get("tokenizer.chat_template"),
                   special_ids=frozenset(i for i, t in enumerate(types) if t == _CONTROL))


def _post_processor_adds(backend: HFTokenizer, token_id: int) -> bool:
    """Whether the tokenizer's post-processor puts ``token_id`` first (as Llama-3's does with BOS)."""
    try:
        with_specials = backend.encode("a", add_special_tokens=True).ids
        without = backend.encode("a", add_special_tokens=False).ids
    except Exception:  # noqa: BLE001 - a post-processor that cannot run adds nothing we can use
        return False
    return with_specials[:1] == [token_id] and without[:1] != [token_id]


def _added_special_ids(backend: HFTokenizer) -> list[int]:
    decoder = backend.get_added_tokens_decoder()  # {id: AddedToken}
    return [i for i, tok in decoder.items() if tok.special] if decoder else []


def _merges_from_scores(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    # SentencePiece BPE merges pieces by the score of the merged piece; express that as an
    # ordered merge list: every split of a vocabulary piece into two vocabulary pieces, ranked
    # by the piece's score (higher first), ties broken by the parts' ids.
    ids = {t: i for i, t in enumerate(tokens)}
    ranked = []
    for piece, score in zip(tokens, scores):
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in ids and right in ids:
                ranked.append((-score, ids[left], ids[right], left, right))
    ranked.sort()
    return [(left, right) for _, _, _, left, right in ranked]
