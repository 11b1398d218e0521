"""Why a retrieval head misses the needle: compare its choice with the global oracle's while the
model answers, teacher-forced on dense's own answer.

    python bench_edge/needle_diagnosis.py                          # 2k context, needle at 50%, B = 1024
    python bench_edge/needle_diagnosis.py --depth 0.2 --retrieval-head PATH.json

Prints dense's answer; the top-1 agreement with dense over the answer tokens for the head and
for oracle-global (global_oracle.py: the same one-set-for-all-layers selection, from the model's
own layer-mean attention); and, at each answer step, the layer-mean attention mass on the needle
per KV head and how many needle tokens each selection holds (KV head 0).
"""

from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--depth", type=float, default=0.5)
    p.add_argument("--budget", type=int, default=1024)
    p.add_argument("--retrieval-head", default="auto")
    p.add_argument("--answer-tokens", type=int, default=24)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    args = p.parse_args(argv)

    import torch

    import global_oracle
    import specontext
    from haystack import TokenSource, needle_prompt_ids, read_text
    from specontext import assets
    from specontext.retrieval.selection import SparsityOptions

    torch.set_num_threads(args.threads)
    llm = specontext.load(sparsity="specontext", retrieval_head=args.retrieval_head)
    eng, cfg = llm.engine, llm.model.config
    source = TokenSource(llm.tokenizer, read_text(None)[0])
    ids = needle_prompt_ids(llm, source, assets.NEEDLE, assets.NEEDLE_QUESTION, args.context, args.depth)
    dense = SparsityOptions()
    run = eng.generate(ids, specontext.GenerationConfig(max_new_tokens=args.answer_tokens), sparsity=dense)
    for _ in run:
        pass
    answer = run.result().token_ids
    print(f"dense answers: {llm.tokenizer.decode(answer)!r}")
    needle = llm.tokenizer.encode(assets.NEEDLE, add_bos=False)
    start = next((i - 1 for i in range(len(ids)) if ids[i:i + 5] == needle[1:6]), None)
    if start is None:
        raise SystemExit("the needle's tokens were not found in the prompt")
    needle_pos = set(range(start, start + len(needle)))

    state = eng.prefill_state(ids, len(ids) + len(answer) + 1)
    dense_logits, _ = eng.teacher_forced(ids, answer, state=state, sparsity=dense)
    recorder = global_oracle.AttentionRecorder(cfg.num_layers, cfg.num_kv_heads)
    eng.teacher_forced(ids, answer, state=state, sparsity=dense, selector=recorder)
    head_sets = []
    eng.on_select = lambda sel, plan: head_sets.append(None if sel is None else set(sel.indices[0, 0, :-1].tolist()))
    opts = SparsityOptions(method="specontext", budget_tokens=args.budget)
    head_logits, _ = eng.teacher_forced(ids, answer, state=state, sparsity=opts)
    eng.on_select = None
    oracle = global_oracle.ReplayedGlobalOracle(recorder.scores, args.budget, opts.sink_tokens, opts.window_tokens,
                                                cfg.num_kv_heads)
    oracle_logits, _ = eng.teacher_forced(ids, answer, state=state, selector=oracle)

    def agreement(logits):
        return float((logits.argmax(-1) == dense_logits.argmax(-1)).float().mean())
    print(f"top-1 agreement with dense over the answer: head {agreement(head_logits):.3f}, "
          f"oracle-global {agreement(oracle_logits):.3f}")
    for step in range(len(answer) - 1):
        past = len(ids) + step
        scores = recorder.scores[past][0]  # [G, P]
        chosen = set(scores[0].masked_fill(torch.tensor([i < opts.sink_tokens or i >= past - opts.window_tokens
                                                         for i in range(past)]), 2.0).topk(args.budget).indices.tolist())
        mass = scores[:, sorted(needle_pos)].sum(-1)
        head = head_sets[step] or set(range(past))
        print(f"input {llm.tokenizer.decode([answer[step]])!r:>12} -> {llm.tokenizer.decode([answer[step + 1]])!r:<12} "
              f"needle mass per KV head {', '.join(f'{m:.3f}' for m in mass.tolist())}; needle tokens held: "
              f"oracle-global {len(needle_pos & chosen)}/{len(needle_pos)}, head {len(needle_pos & head)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
