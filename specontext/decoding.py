"""A request's output side, apart from the step: sampling, incremental detokenising, stop strings.

Shape letters: B batch, V vocabulary.
"""

from __future__ import annotations

import torch

from .config import ModelConfig
from .settings import GenerationConfig
from .tokenizer import Tokenizer


class Sampler:
    """Greedy or temperature / top-k / top-p sampling with a seeded generator.

    Example::

        sampler = Sampler(GenerationConfig(temperature=0.7, top_p=0.9, seed=1), device)
        next_ids = sampler(logits)    # logits [B, V] float32 -> [B] int64
    """

    def __init__(self, gen: GenerationConfig, device: torch.device):
        self.gen = gen
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(gen.seed)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        gen = self.gen
        if gen.temperature == 0:
            return logits.argmax(dim=-1)
        logits = logits / gen.temperature
        if gen.top_k > 0 and gen.top_k < logits.shape[-1]:
            kth = torch.topk(logits, gen.top_k, dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if gen.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
            probs = sorted_logits.softmax(dim=-1)
            # drop a token when the tokens ranked above it already reach top_p
            drop = probs.cumsum(dim=-1) - probs >= gen.top_p
            sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
            logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
        probs = logits.softmax(dim=-1)
        return torch.multinomial(probs, 1, generator=self.generator).squeeze(-1)


class IncrementalDetokenizer:
    """Turns a growing list of ids into text pieces without re-decoding everything each step.

    Decodes a short window of recent ids and holds text back while it ends in an incomplete
    UTF-8 sequence (shown by the tokenizer as U+FFFD).
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # ids[prefix:read] decode to text already emitted
        self.read = 0

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self.tokenizer.decode(self.ids[self.prefix:self.read])
        after = self.tokenizer.decode(self.ids[self.prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            piece = after[len(before):]
            self.prefix, self.read = self.read, len(self.ids)
            return piece
        return ""


class StopMatcher:
    """Finds stop strings in streamed text, holding back text that may begin one."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = stops
        self.text = ""
        self.emitted = 0

    def feed(self, piece: str) -> tuple[str, bool]:
        """Add ``piece``; return (text safe to emit now, whether a stop string was hit)."""
        self.text += piece
        if not self.stops:
            out, self.emitted = self.text[self.emitted:], len(self.text)
            return out, False
        window_start = max(0, self.emitted - max(len(s) for s in self.stops))
        hits = [i for i in (self.text.find(s, window_start) for s in self.stops) if i >= 0]
        if hits:
            cut = min(hits)
            out = self.text[self.emitted:cut]
            self.text = self.text[:cut]
            self.emitted = cut
            return out, True
        hold = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.text)), 0, -1):
                if self.text.endswith(s[:n]):
                    hold = max(hold, n)
                    break
        safe = len(self.text) - hold
        out = self.text[self.emitted:safe] if safe > self.emitted else ""
        self.emitted = max(self.emitted, safe)
        return out, False

    def flush(self) -> str:
        out, self.emitted = self.text[self.emitted:], len(self.text)
        return out


class RequestStream:
    """One request's output side: its ids, text (detokenized, stop strings applied) and stop reason.

    ``accept(token)`` takes each sampled token and returns the text now safe to emit; once the
    request is finished (``eos``, ``stop_string``, ``length`` or ``context``), ``stop_reason``
    says why and ``flush()`` returns any text held back.
    """

    def __init__(self, tokenizer: Tokenizer, gen: GenerationConfig, num_prompt_tokens: int, capacity_tokens: int,
                 eos_ids: set[int]):
        self.gen, self.num_prompt_tokens, self.capacity_tokens, self.eos_ids = gen, num_prompt_tokens, capacity_tokens, eos_ids
        self.token_ids: list[int] = []
        self.stop_reason = "running"
        self._detok = IncrementalDetokenizer(tokenizer)
        self._stops = StopMatcher(gen.stop)

    @property
    def text(self) -> str:
        return self._stops.text

    @property
    def finished(self) -> bool:
        return self.stop_reason != "running"

    def accept(self, token: int) -> str:
        if token in self.eos_ids:
            self.stop_reason = "eos"
            return ""
        self.token_ids.append(token)
        piece, hit = self._stops.feed(self._detok.push(token))
        if hit:
            self.stop_reason = "stop_string"
        elif len(self.token_ids) >= self.gen.max_new_tokens:
            self.stop_reason = "length"
        elif self.num_prompt_tokens + len(self.token_ids) >= self.capacity_tokens:
            self.stop_reason = "context"
        return piece

    def flush(self) -> str:
        return self._stops.flush() if self.stop_reason != "stop_string" else ""


def eos_ids(tokenizer: Tokenizer, config: ModelConfig, gen: GenerationConfig) -> set[int]:
    """The ids that end a request under ``gen`` (none with ``ignore_eos``)."""
    if gen.ignore_eos:
        return set()
    return set(tokenizer.eos_token_ids) | set(config.eos_token_ids)
