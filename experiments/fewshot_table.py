"""Markdown table of the few-shot comparison written by ``experiments/fewshot_cpu.sh``.

Usage: ``python experiments/fewshot_table.py [OUT_DIR]`` (default ``runs/fewshot-cpu``). Reads every
``eval-<dataset>-<kind>-<W>w<S>s.json`` (``nsl fewshot eval --compare ... --json``: the NSL model as
``a``, the conv baseline as ``b``, on the same episodes) and prints one row per dataset and setting:
baseline accuracy, each NSL kind's accuracy and its paired difference to the baseline, 95% CIs.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

NAME = re.compile(r"eval-(?P<ds>cifar-fs|fc100|omniglot|mini-imagenet)-(?P<kind>[a-z-]+)-(?P<w>\d+)w(?P<s>\d+)s\.json")


def main(out: Path) -> int:
    rows: dict[tuple, dict] = {}
    kinds: list[str] = []
    for f in sorted(out.glob("eval-*.json")):
        m = NAME.fullmatch(f.name)
        if not m:
            continue
        res = json.loads(f.read_text())
        key = (m["ds"], int(m["w"]), int(m["s"]))
        row = rows.setdefault(key, {"episodes": res["paired"]["episodes"]})
        row["conv"] = res["b"]
        if m["kind"] == "conv":  # the baseline against itself: only its accuracy is used
            continue
        row[m["kind"]] = (res["a"], res["paired"])
        if m["kind"] not in kinds:
            kinds.append(m["kind"])
    from nsl.models import LAYER_KINDS

    kinds.sort(key=lambda k: list(LAYER_KINDS).index(k) if k in LAYER_KINDS else len(LAYER_KINDS))
    if not rows:
        print(f"no eval-*.json files in {out}", file=sys.stderr)
        return 1
    print("| dataset | setting | episodes | conv (baseline) | " + " | ".join(
        f"{k} | {k} - conv (paired)" for k in kinds) + " |")
    print("|---|---|---:|---:|" + "---:|---:|" * len(kinds))
    for (ds, w, s), row in sorted(rows.items(), key=lambda kv: (kv[0][0] != "cifar-fs", kv[0])):
        base = row["conv"]
        cells = []
        for k in kinds:
            if k in row:
                a, p = row[k]
                cells += [f"{100 * a['mean']:.2f} +- {100 * a['ci95']:.2f}",
                          f"{100 * p['mean_diff']:+.2f} +- {100 * p['ci95']:.2f}"]
            else:
                cells += ["-", "-"]
        print(f"| {ds} | {w}-way {s}-shot | {row['episodes']} | {100 * base['mean']:.2f} +- {100 * base['ci95']:.2f} | "
              + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/fewshot-cpu")))
