"""Merge accuracy results: rows of later files replace rows of earlier ones with the same
(context, method, budget), e.g. a re-measured method with a new retrieval head over an earlier
full run. The merged JSON lists its sources, so where each row came from stays traceable.

    python bench_edge/merge_results.py OUT.json BASE.json NEWER.json [...]
    python bench_edge/bench_accuracy.py --from-json OUT.json     # tables, targets, plot
"""

from __future__ import annotations

import json
import sys


def main(argv: list[str]) -> int:
    if len(argv) < 3:
        print(__doc__.strip().splitlines()[-2].strip(), file=sys.stderr)
        return 2
    out_path, sources = argv[0], argv[1:]
    merged, rows, order = None, {}, []
    for path in sources:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if merged is None:
            merged = {k: v for k, v in data.items() if k != "rows"}
            merged["merged_from"] = []
        merged["merged_from"].append({"file": path, "settings": data.get("settings"),
                                      "retrieval_head": data.get("retrieval_head"), "machine": data.get("machine"),
                                      "rows": [[r["context"], r["method"], r["budget_tokens"]] for r in data["rows"]]})
        for ctx, info in data.get("contexts", {}).items():
            merged["contexts"].setdefault(ctx, {}).update(info)
        for r in data["rows"]:
            key = (r["context"], r["method"], r["budget_tokens"])
            if key not in rows:
                order.append(key)
            rows[key] = {**rows.get(key, {}), **r}
        merged["retrieval_head"] = data.get("retrieval_head") or merged.get("retrieval_head")
    settings = merged["settings"]
    settings["contexts"] = sorted({k[0] for k in order})
    settings["methods"] = list(dict.fromkeys(["dense"] + [k[1] for k in order if k[1] != "dense"]))
    settings["budgets"] = sorted({k[2] for k in order if k[2] is not None})
    merged["rows"] = [rows[k] for k in order]
    with open(out_path, "w", encoding="utf-8") as f:
        json.dump(merged, f, indent=1)
        f.write("\n")
    print(f"merged {len(order)} rows from {len(sources)} files into {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
