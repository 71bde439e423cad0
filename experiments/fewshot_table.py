"""Markdown tables of the few-shot comparison written by ``experiments/fewshot_cpu.sh``.

Usage: ``python experiments/fewshot_table.py [OUT_DIR]`` (default ``runs/fewshot-cpu``). Reads every
``eval-<dataset>-<kind>[-s<seed>]-<W>w<S>s.json`` (``nsl fewshot eval --compare ... --json``: the NSL model
as ``a``, the conv baseline of the same training seed as ``b``, on the same test episodes; no ``-s`` means
training seed 0) and prints:

1. one row per dataset and setting for training seed 0: baseline accuracy, each NSL kind's accuracy and
   its paired difference to the baseline, with 95% CIs over the test episodes;
2. where a kind was trained with several seeds, the spread over training seeds: per-seed accuracy, the
   mean with its 95% CI over training seeds (Student t, n - 1 degrees of freedom) beside the mean 95% CI
   over test episodes, and the per-seed paired differences to conv with their mean and CI over seeds.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

NAME = re.compile(r"eval-(?P<ds>cifar-fs|fc100|omniglot|mini-imagenet)-(?P<kind>[a-z-]+?)(?:-s(?P<seed>\d+))?"
                  r"-(?P<w>\d+)w(?P<s>\d+)s\.json")


def load(out: Path) -> dict[tuple, dict[int, dict]]:
    """``{(dataset, ways, shots): {seed: {"episodes": n, "conv": acc, kind: (acc, paired), ...}}}``."""
    rows: dict[tuple, dict[int, dict]] = {}
    for f in sorted(out.glob("eval-*.json")):
        m = NAME.fullmatch(f.name)
        if not m:
            continue
        res = json.loads(f.read_text())
        seed = int(m["seed"] or 0)
        row = rows.setdefault((m["ds"], int(m["w"]), int(m["s"])), {}).setdefault(
            seed, {"episodes": res["paired"]["episodes"]})
        row["conv"] = res["b"]
        if m["kind"] != "conv":  # the baseline against itself: only its accuracy is used
            row[m["kind"]] = (res["a"], res["paired"])
    return rows


def _kinds(rows: dict) -> list[str]:
    from nsl.layers import LAYER_KINDS

    kinds = {k for per_seed in rows.values() for row in per_seed.values() for k in row if k not in ("episodes",
                                                                                                    "conv")}
    return sorted(kinds, key=lambda k: (list(LAYER_KINDS).index(k) if k in LAYER_KINDS else len(LAYER_KINDS), k))


def _order(rows: dict) -> list[tuple]:
    return sorted(rows, key=lambda key: (key[0] != "cifar-fs", key))


def seed0_table(rows: dict) -> list[str]:
    """Training seed 0: one row per dataset and setting (empty when no seed-0 results exist)."""
    if not any(0 in per_seed for per_seed in rows.values()):
        return []
    kinds = _kinds(rows)
    lines = ["| dataset | setting | episodes | conv (baseline) | " + " | ".join(
        f"{k} | {k} - conv (paired)" for k in kinds) + " |", "|---|---|---:|---:|" + "---:|---:|" * len(kinds)]
    for ds, w, s in _order(rows):
        row = rows[(ds, w, s)].get(0)
        if row is None:
            continue
        base = row["conv"]
        cells = []
        for k in kinds:
            if k in row:
                a, p = row[k]
                cells += [f"{100 * a['mean']:.2f} +- {100 * a['ci95']:.2f}",
                          f"{100 * p['mean_diff']:+.2f} +- {100 * p['ci95']:.2f}"]
            else:
                cells += ["-", "-"]
        lines.append(f"| {ds} | {w}-way {s}-shot | {row['episodes']} | {100 * base['mean']:.2f} +- "
                     f"{100 * base['ci95']:.2f} | " + " | ".join(cells) + " |")
    return lines


def seeds_table(rows: dict) -> list[str]:
    """The spread over training seeds, for every kind (conv included) evaluated with 2 or more seeds."""
    from nsl.stats import mean_ci

    lines = ["| dataset | setting | kind | training seeds | accuracy per seed | mean +- 95% CI over training seeds "
             "| mean 95% CI over test episodes | difference to conv per seed (paired episodes) "
             "| mean difference +- 95% CI over training seeds |", "|---|---|---|---|---|---:|---:|---|---:|"]
    for ds, w, s in _order(rows):
        per_seed = rows[(ds, w, s)]
        for kind in ["conv", *_kinds(rows)]:
            seeds = sorted(sd for sd, row in per_seed.items() if kind in row)
            if len(seeds) < 2:
                continue
            accs = [per_seed[sd][kind] if kind == "conv" else per_seed[sd][kind][0] for sd in seeds]
            mean, ci = mean_ci([a["mean"] for a in accs])
            episode_ci = sum(a["ci95"] for a in accs) / len(accs)
            per_seed_accs = ", ".join(f"{100 * a['mean']:.2f}" for a in accs)
            diff_cells = ["", ""]
            if kind != "conv":
                diffs = [per_seed[sd][kind][1]["mean_diff"] for sd in seeds]
                dm, dci = mean_ci(diffs)
                diff_cells = [", ".join(f"{100 * d:+.2f}" for d in diffs), f"{100 * dm:+.2f} +- {100 * dci:.2f}"]
            lines.append(f"| {ds} | {w}-way {s}-shot | {kind} | {', '.join(map(str, seeds))} | "
                         f"{per_seed_accs} | "
                         f"{100 * mean:.2f} +- {100 * ci:.2f} | {100 * episode_ci:.2f} | " + " | ".join(diff_cells)
                         + " |")
    return lines if len(lines) > 2 else []


def main(out: Path) -> int:
    rows = load(out)
    if not rows:
        print(f"no eval-*.json files in {out}", file=sys.stderr)
        return 1
    first, spread = seed0_table(rows), seeds_table(rows)
    if first:
        print("\n".join(first))
    if spread:
        print(("\n" if first else "") + "Spread over training seeds (the test episodes are the same for every seed):\n")
        print("\n".join(spread))
    if not first and not spread:
        print(f"{out}: no seed-0 results and no kind with 2 or more training seeds yet", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/fewshot-cpu")))
