"""Retrieval tasks that teach the retrieval head where the model looks while it *answers*.

``specontext-distill --task-mix`` trains on these next to plain text: reading text teaches the
head where the model attends while it reads, but answering a question about a detail buried in
a long document leans on the few layers that fetch that detail, which the layer mean of plain
reading underweights. Each generator here is a pure function of a seeded ``random.Random`` and a
haystack text (any prose: distill cuts it from its training text), and returns a
:class:`TaskExample`: the document (the haystack with generated material placed in it), a
question about that material, and the answer the document supports. distill renders the
example with the model's chat template and appends the model's *own* greedy answer, so the
expected answer here is only what a correct answer would hold (the tests check it is there).

Kinds (:data:`KINDS`):

* ``needle``: one fact sentence (several templates, random people, made-up places, numbers and
  codes) at a random depth, sometimes with distractor facts of the same template about other
  subjects, so the question's subject decides which one answers it.
* ``kv``: a key-value lookup: a block of random keys and values (lines ``key: value``, a JSON
  object, ``key = value`` or a table), the whole document or embedded in the haystack.
* ``vt``: multi-hop variable tracking: a chain of assignments (a number, then copies of it)
  scattered in order through the haystack with distractor chains; the question asks for every
  variable that ends up holding the number.
* ``passage``: a short generated passage (a town, a firm, an expedition, a club) with several
  details, placed in the haystack; the question asks for one detail. Or a sentence of the
  haystack itself is quoted and the question asks which sentence follows it.

What keeps the benchmarks out (bench_edge/needles.py, and RULER as lm-eval generates it): no
template or vocabulary entry here holds any of the benchmark needles' answer keywords; numbers
have at least five digits (the numeric needle answers have four); made-up names are built from
:data:`SYLLABLES`, which spell none of those keywords; and no surface form is RULER's (no
"special magic number", no ``VAR X = Y``). ``tests/test_tasks.py`` checks all of this against
the needles file itself, exhaustively over the made-up names.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from typing import Callable

VERSION = "tasks-v1"  # in distill's cache keys: bump when any generator's output changes


@dataclass(frozen=True)
class TaskExample:
    """One generated retrieval task.

    Attributes:
        kind: the generator's name (a key of :data:`KINDS`).
        document: the haystack with the generated material in it.
        question: asked after the document.
        answer: what a correct answer holds (for ``vt`` the variable names, comma-separated).
        instruction: how to answer (appended to the question).
        inserts: the generated sentences or blocks placed in the document, in document order.
    """

    kind: str
    document: str
    question: str
    answer: str
    instruction: str
    inserts: tuple[str, ...]


# --- vocabularies (checked by tests/test_tasks.py against the benchmark needles) ---

FIRST_NAMES = ("Amara", "Bjorn", "Chiara", "Dmitri", "Esther", "Farid", "Greta", "Hiroshi", "Ilse", "Joaquin",
               "Kalani", "Lucien", "Mireille", "Nikolai", "Oona", "Pavel", "Quentin", "Rosalind", "Soren",
               "Thandiwe", "Ulrich", "Valentina", "Wendell", "Ximena", "Yusuf", "Zofia", "Anneli", "Cormac")
LAST_NAMES = ("Abernathy", "Bellweather", "Castellanos", "Dunmore", "Eriksen", "Fairclough", "Gutierrez",
              "Hargreaves", "Iwasaki", "Jovanovic", "Kowalczyk", "Lindgren", "Mbeki", "Nakashima", "Oyelaran",
              "Pellegrini", "Quarshie", "Rautio", "Szabo", "Takahashi", "Underhill", "Varga", "Whitcombe", "Zeller")
# two or three of these make a place, vessel or pet name; none of the needle keywords can be spelled
SYLLABLES = ("ka", "lo", "ver", "min", "dra", "sel", "tor", "qua", "ben", "ril", "os", "fen", "gal", "lum", "pe",
             "zan")
VEHICLES = ("canoe", "motorbike", "caravan", "tractor", "sailboat", "scooter")
FOODS = ("cheese", "olive oil", "rye bread", "smoked fish", "plum jam", "goat yoghurt")
INSTRUMENTS = ("organ", "harpsichord", "cello", "grand piano", "church bell")
BUILDINGS = ("town hall", "old chapel", "railway museum", "concert barn", "seminary")
DEVICES = ("laptop", "camera", "telescope", "sewing machine", "radio")
ANIMALS = ("heron", "lynx", "tortoise", "walrus", "kingfisher", "badger", "ibex")
GAMES = ("crossword", "treasure hunt", "escape room", "word ladder")
PROFESSIONS = ("surveyor", "glassblower", "clockmaker", "ferry pilot", "botanist", "bookbinder")
PRODUCTS = ("wool blankets", "copper kettles", "dried apricots", "slate tiles", "wax candles")
EVENTS = ("kite race", "chess marathon", "harvest fair", "rowing regatta", "poetry night")
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "November",
          "December")


def _made_up_name(rng: random.Random) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()


def _person(rng: random.Random) -> str:
    return f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}"


def _number(rng: random.Random, min_digits: int = 5, max_digits: int = 7) -> str:
    digits = rng.randint(min_digits, max_digits)
    return str(rng.randint(10 ** (digits - 1), 10 ** digits - 1))


def _code(rng: random.Random) -> str:
    letters = "ABCDEFGHJKLMNPRSTUVWXYZ"
    return f"{rng.choice(letters)}{rng.choice(letters)}-{_number(rng, 5, 6)}"


_FILLERS: dict[str, Callable[[random.Random], str]] = {
    "person": _person, "person2": _person, "town": _made_up_name, "town2": _made_up_name, "name": _made_up_name,
    "number": _number, "code": _code, "count": lambda r: str(r.randint(12, 99)),
    "year": lambda r: str(r.randint(1720, 1990)), "platform": lambda r: str(r.randint(2, 19)),
    "time": lambda r: f"{r.randint(5, 22)}:{r.choice(('05', '20', '35', '50'))}",
    "vehicle": lambda r: r.choice(VEHICLES), "food": lambda r: r.choice(FOODS),
    "instrument": lambda r: r.choice(INSTRUMENTS), "building": lambda r: r.choice(BUILDINGS),
    "device": lambda r: r.choice(DEVICES), "animal": lambda r: r.choice(ANIMALS), "game": lambda r: r.choice(GAMES),
    "profession": lambda r: r.choice(PROFESSIONS), "product": lambda r: r.choice(PRODUCTS),
    "event": lambda r: r.choice(EVENTS), "month": lambda r: r.choice(MONTHS),
}

# (fact, ((question, answer slot), ...), slots that tell distractor facts apart)
NEEDLE_TEMPLATES = (
    ("{person} was born in the mountain village of {town} in {year}.",
     (("In which village was {person} born?", "town"), ("In which year was {person} born?", "year")), ("person",)),
    ("The {vehicle} that {person} bought last spring cost {number} dollars.",
     (("How much did the {vehicle} that {person} bought cost?", "number"),), ("person",)),
    ("The reference number of {person}'s insurance claim is {code}.",
     (("What is the reference number of {person}'s insurance claim?", "code"),), ("person",)),
    ("{person} buys the best {food} from a small shop in {town}.",
     (("Where does {person} buy the best {food}?", "town"),), ("person",)),
    ("The research vessel {name} carries exactly {count} scientists.",
     (("How many scientists does the research vessel {name} carry?", "count"),), ("name",)),
    ("The {instrument} in the {building} of {town} was restored by {person}.",
     (("Who restored the {instrument} in the {building} of {town}?", "person"),), ("town",)),
    ("{person} named the family dog {name} after a character in a novel.",
     (("What is the name of {person}'s dog?", "name"),), ("person",)),
    ("The night train from {town} to {town2} leaves from platform {platform} at {time}.",
     (("From which platform does the night train from {town} to {town2} leave?", "platform"),
      ("At what time does the night train from {town} to {town2} leave?", "time")), ("town",)),
    ("The solution to the {game} that {person} designed is the word {name}.",
     (("What is the solution to the {game} that {person} designed?", "name"),), ("person",)),
    ("The {profession} guild of {town} was founded by {person} in {year}.",
     (("Who founded the {profession} guild of {town}?", "person"),
      ("In which year was the {profession} guild of {town} founded?", "year")), ("town",)),
    ("The serial number engraved on {person}'s {device} is {code}.",
     (("What is the serial number engraved on {person}'s {device}?", "code"),), ("person",)),
    ("{person} learned to play the {instrument} from a neighbour called {person2}.",
     (("From whom did {person} learn to play the {instrument}?", "person2"),), ("person",)),
    ("The rarest stamp in {person}'s collection shows a {animal} and was printed in {year}.",
     (("Which animal is shown on the rarest stamp in {person}'s collection?", "animal"),), ("person",)),
    ("Every {month}, the people of {town} hold a {event} on the frozen lake.",
     (("In which month do the people of {town} hold their {event}?", "month"),), ("town",)),
)

# (intro sentence, sentences with slots, ((question, answer slot), ...)) for the ``passage`` kind
PASSAGE_SCHEMAS = (
    ("Here is a note from a regional almanac.",
     ("The village of {town} lies {count} kilometres north of {town2}.",
      "It was founded in {year} by {person}, a {profession}.", "Its main export is {product}.",
      "Every {month} it holds a {event}.", "The village school has {number} books in its library."),
     (("How far is {town} from {town2}?", "count"), ("Who founded the village of {town}?", "person"),
      ("What is the main export of {town}?", "product"), ("Which event does {town} hold every {month}?", "event"),
      ("How many books does the school library in {town} have?", "number"))),
    ("The following is taken from a company register.",
     ("{name} Works was registered in {year} by {person}.", "It makes {product} in a workshop in {town}.",
      "Its licence number is {code}.", "The firm employs {count} people."),
     (("Who registered {name} Works?", "person"), ("Where is the workshop of {name} Works?", "town"),
      ("What is the licence number of {name} Works?", "code"), ("How many people does {name} Works employ?",
                                                                 "count"))),
    ("A logbook entry from a small expedition reads as follows.",
     ("The expedition to {town} was led by {person} and left port in {month} {year}.",
      "Its ship, the {name}, carried {count} crew.", "On the way they sighted a {animal}.",
      "They buried a time capsule marked {code}."),
     (("Who led the expedition to {town}?", "person"), ("What was the name of the ship of the expedition to {town}?",
                                                         "name"),
      ("Which animal did the expedition to {town} sight?", "animal"),
      ("How was the time capsule of the expedition to {town} marked?", "code"))),
    ("From the minutes of a local club.",
     ("The {game} club of {town} meets in the {building}.", "Its chair is {person} and its treasurer {person2}.",
      "Members pay {number} cents a year.", "The club mascot is a {animal}."),
     (("Where does the {game} club of {town} meet?", "building"), ("Who chairs the {game} club of {town}?", "person"),
      ("Who is the treasurer of the {game} club of {town}?", "person2"),
      ("What is the mascot of the {game} club of {town}?", "animal"))),
)

NEEDLE_INSTRUCTIONS = ("Answer in one sentence.", "Answer briefly.", "Answer using the document.")


def _fill(rng: random.Random, templates: tuple[str, ...], fixed: dict[str, str] | None = None) -> dict[str, str]:
    """A value for every {slot} the templates use (``fixed`` kept), in a deterministic order."""
    slots = sorted({m for t in templates for m in re.findall(r"\{(\w+)\}", t)})
    values = dict(fixed or {})
    for slot in slots:
        if slot not in values:
            values[slot] = _FILLERS[slot](rng)
    return values


def _boundaries(text: str) -> list[int]:
    """Character offsets where a sentence may be inserted: the start, after ". " or a blank line, the end."""
    cuts = {0, len(text)}
    cuts.update(m.end() for m in re.finditer(r"(?<=[.!?])\s+|\n\s*\n", text))
    return sorted(cuts)


def place(rng: random.Random, haystack: str, inserts: list[str], ordered: bool = True) -> str:
    """``haystack`` with each of ``inserts`` at a random sentence boundary (in list order when ``ordered``)."""
    cuts = _boundaries(haystack)
    at = sorted(rng.choice(cuts) for _ in inserts)
    if not ordered:
        rng.shuffle(at)
    out, prev = [], 0
    for pos, piece in sorted(zip(at, range(len(inserts)))):
        out.append(haystack[prev:pos])
        out.append(("" if pos == 0 or haystack[pos - 1].isspace() else " ") + inserts[piece] + " ")
        prev = pos
    out.append(haystack[prev:])
    return "".join(out).strip()


def _shorten(haystack: str, num_chars: int) -> str:
    """The haystack without its last ``num_chars`` characters (cut at a sentence boundary), so
    material the size of those characters can be added and the document keeps its length."""
    keep = max(len(haystack) - num_chars, 0)
    cuts = [c for c in _boundaries(haystack) if c <= keep]
    return haystack[:cuts[-1]] if cuts else ""


# --- generators ---

def needle(rng: random.Random, haystack: str) -> TaskExample:
    """A fact sentence at a random depth (with 0-3 distractors of the same template); the question asks for it."""
    fact_t, questions, distinct = rng.choice(NEEDLE_TEMPLATES)
    question_t, answer_slot = rng.choice(questions)
    values = _fill(rng, (fact_t, question_t))
    facts = [fact_t.format(**values)]
    for _ in range(rng.choice((0, 0, 1, 2, 3))):
        other = _fill(rng, (fact_t,), {k: v for k, v in values.items() if k not in distinct and k != answer_slot})
        if all(other[k] != values[k] for k in distinct):
            facts.append(fact_t.format(**other))
    inserts = list(facts)
    rng.shuffle(inserts)
    doc = place(rng, _shorten(haystack, sum(len(f) + 2 for f in inserts)), inserts, ordered=True)
    return TaskExample("needle", doc, question_t.format(**values), values[answer_slot],
                       rng.choice(NEEDLE_INSTRUCTIONS), tuple(inserts))


def _kv_key(rng: random.Random, style: str) -> str:
    if style == "words":
        return f"{_made_up_name(rng).lower()}-{_made_up_name(rng).lower()}"
    if style == "ident":
        return f"item_{rng.getrandbits(24):06x}"
    return f"{rng.getrandbits(48):012x}"


def _kv_value(rng: random.Random, style: str) -> str:
    if style == "number":
        return _number(rng)
    if style == "code":
        return _code(rng)
    return _made_up_name(rng).lower()


def _kv_block(pairs: list[tuple[str, str]], layout: str) -> str:
    if layout == "json":
        return json.dumps(dict(pairs), indent=None)
    if layout == "table":
        return "\n".join(["| key | value |", "| --- | --- |"] + [f"| {k} | {v} |" for k, v in pairs])
    sep = ": " if layout == "lines" else " = "
    return "\n".join(f"{k}{sep}{v}" for k, v in pairs)


KV_INTROS = ("The configuration of the {name} service is listed below.", "An export from the {name} inventory system:",
             "The lookup table used by the {name} project follows.")


def kv(rng: random.Random, haystack: str) -> TaskExample:
    """Random unique keys and values, the whole document or a block in the haystack; the question names one key."""
    key_style = rng.choice(("words", "ident", "hex"))
    value_style = rng.choice(("number", "code", "word"))
    layout = rng.choice(("lines", "json", "equals", "table"))
    share = rng.choice((1.0, 0.5, 0.25, 0.1))  # of the haystack's characters the block replaces
    room = max(int(len(haystack) * share), 200)
    pairs: list[tuple[str, str]] = []
    keys: set[str] = set()
    num_chars = 0
    while num_chars < room or len(pairs) < 4:
        k = _kv_key(rng, key_style)
        if k not in keys:
            keys.add(k)
            pairs.append((k, _kv_value(rng, value_style)))
            num_chars += len(k) + len(pairs[-1][1]) + 8  # the separators of the widest layout
    key, value = rng.choice(pairs)
    block = _kv_block(pairs, layout)
    if share < 1.0:
        block = KV_INTROS[rng.randrange(len(KV_INTROS))].format(name=_made_up_name(rng)) + "\n" + block + "\n"
        doc = place(rng, _shorten(haystack, len(block)), [block])
    else:
        doc = block
    question = rng.choice(('What is the value for the key "{k}"?', "Which value belongs to {k} in the list above?",
                           "Look up {k}: what is its value?")).format(k=key)
    return TaskExample("kv", doc, question, value, rng.choice(("Answer with the value only.", "Answer briefly.")),
                       (block,))


# (assign a number, copy a variable, question)
VT_FORMS = (
    ("let {x} = {v};", "let {x} = {y};", "Which variables end up equal to {v}?"),
    ("{x} := {v}", "{x} := {y}", "Which variables hold the value {v} after these assignments?"),
    ("Set {x} to {v}.", "Set {x} to the value of {y}.", "List every variable that is set to {v}, directly or through "
                                                        "another variable."),
    ("The variable {x} is given the value {v}.", "The variable {x} is given the value of {y}.",
     "Which variables have the value {v}?"),
)


def _var_name(rng: random.Random, style: int) -> str:
    if style == 0:
        return "".join(rng.choice("abcdefghjkmnpqrstuvwxyz") for _ in range(rng.randint(3, 5)))
    return f"{_made_up_name(rng).lower()}_{rng.randint(1, 99)}"


def vt(rng: random.Random, haystack: str) -> TaskExample:
    """Chains of assignments (a number, then copies) scattered in order; which variables hold the number?"""
    assign_t, copy_t, question_t = rng.choice(VT_FORMS)
    style = rng.randrange(2)
    num_chains = rng.randint(1, 4)
    names: set[str] = set()
    chains = []
    for _ in range(num_chains):
        value = _number(rng, 5, 5)
        chain, length = [], rng.randint(2, 5)
        while len(chain) < length:
            name = _var_name(rng, style)
            if name not in names:
                names.add(name)
                chain.append(name)
        chains.append((value, chain))
    if len({v for v, _ in chains}) < num_chains:  # equal values would merge chains: keep the first
        chains = chains[:1]
    statements: list[list[str]] = [[assign_t.format(x=c[0], v=v)] + [copy_t.format(x=c[i], y=c[i - 1])
                                                                     for i in range(1, len(c))] for v, c in chains]
    # interleave the chains, each in its own order, so a copy always follows what it copies
    order = [i for i, s in enumerate(statements) for _ in s]
    rng.shuffle(order)
    inserts = [statements[i].pop(0) for i in order]
    doc = place(rng, _shorten(haystack, sum(len(s) + 2 for s in inserts)), inserts, ordered=True)
    value, chain = chains[0]
    return TaskExample("vt", doc, question_t.format(v=value), ", ".join(chain),
                       "Answer with the variable names only.", tuple(inserts))


def _quote(rng: random.Random, haystack: str) -> TaskExample | None:
    """A sentence of the haystack itself quoted; which sentence follows it? None if no fitting pair."""
    spans = [(m.start(), m.end()) for m in re.finditer(r"[A-Z][^.!?\n]{30,200}[.!?]", haystack)]
    pairs = [(a, b) for a, b in zip(spans, spans[1:]) if haystack[a[1]:b[0]] == " "]  # inside a paragraph
    if not pairs:
        return None
    (s0, e0), (s1, e1) = rng.choice(pairs)
    sentence, following = haystack[s0:e0], haystack[s1:e1]
    if haystack.count(sentence) != 1:
        return None
    question = rng.choice(('Which sentence comes right after "{s}" in the document?',
                           'The document contains the sentence "{s}" Quote the sentence that follows it.'))
    return TaskExample("passage", haystack, question.format(s=sentence), following, "Quote it exactly.", ())


def passage(rng: random.Random, haystack: str) -> TaskExample:
    """A generated passage with several details in the haystack (a question about one), or a quote question."""
    if rng.random() < 0.25:
        quoted = _quote(rng, haystack)
        if quoted is not None:
            return quoted
    intro, sentences, questions = rng.choice(PASSAGE_SCHEMAS)
    question_t, answer_slot = rng.choice(questions)
    values = _fill(rng, sentences + (question_t,))
    while values.get("town2") == values.get("town") or values.get("person2") == values.get("person"):
        values = _fill(rng, sentences + (question_t,))
    text = " ".join([intro] + [s.format(**values) for s in sentences])
    doc = place(rng, _shorten(haystack, len(text) + 2), [text])
    return TaskExample("passage", doc, question_t.format(**values), values[answer_slot],
                       rng.choice(NEEDLE_INSTRUCTIONS), (text,))


KINDS: dict[str, Callable[[random.Random, str], TaskExample]] = {"needle": needle, "kv": kv, "vt": vt,
                                                                 "passage": passage}

# how the document and question reach the model: a plain user turn, a labelled one, or with a system turn
FRAMINGS = ("plain", "labelled", "system")


def chat_messages(example: TaskExample, framing: str) -> list[dict[str, str]]:
    """The example as chat messages (for ``LLM.encode_prompt``) in one of :data:`FRAMINGS`."""
    if framing == "plain":
        return [{"role": "user", "content": f"{example.document}\n\n{example.question} {example.instruction}"}]
    labelled = f"Document:\n{example.document}\n\nQuestion: {example.question}\n{example.instruction}"
    if framing == "labelled":
        return [{"role": "user", "content": labelled}]
    if framing == "system":
        return [{"role": "system", "content": "Answer the question using only the document."},
                {"role": "user", "content": labelled}]
    raise ValueError(f"framing must be one of {', '.join(FRAMINGS)}, got {framing!r}")


def pydoc_text() -> str:
    """The Python language reference topics shipped with CPython (``pydoc_data.topics``), joined as
    bench_edge/needles.py joins them, so token offsets into it mean the same in both places."""
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    return "\n\n".join(topics[k].strip() for k in sorted(topics))
