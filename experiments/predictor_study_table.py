"""The predictor study's table, per-run JSON and gain-vs-cost figure (``experiments/predictor_study_cpu.sh``).

Usage::

    python experiments/predictor_study_table.py OUT_DIR [--bench NETWORK.json] [--known NAME=KIND:ACC,ACC,...]
        [--previous experiments/results/predictor_study.json]
        [--json experiments/results/predictor_study.json] [--figure docs/figures/predictor_study.png]

Reads every finished run ``OUT_DIR/VARIANT-sSEED`` (one with a ``done`` file, written when ``nsl train`` ended)
and prints a markdown table, one row per variant: layer kind and the options that make it a variant
(its config fields that differ from the defaults among ``predictor_width``, ``predictor_norm``,
``predictor_stride``, ``share_prediction``, ``share_predictor``), parameters and MACs per image
(:func:`nsl.report.report_rows`), final test accuracy per seed, the seed-paired difference to ``conv``
(``OUT_DIR/conv-sSEED``) per seed and its mean with the 95% Student-t interval (:func:`nsl.stats.mean_ci`),
and, from ``--bench`` (``benchmarks/network.py --variant NAME=...`` with the same names), the eager training
step and eval-mode inference latency at batch 1 and 128 with their ratios to conv in that benchmark run.

``--known NAME=KIND:ACC0,ACC1,...`` adds a variant measured elsewhere under the same protocol and seeds
(final test accuracies in percent, seeds 0, 1, ...), e.g. the README's ``dynamic-diagonal`` runs, shown in
the table and figure (marked) but not in the per-run JSON. ``--previous FILE`` adds the runs recorded in an
earlier ``--json`` of this script (its run directories gone, e.g. on another machine); a run finished in
``OUT_DIR`` replaces the recorded one of the same variant and seed. The figure: difference to conv (points) against
the training-step time ratio to conv (MACs ratio where the benchmark lacks the variant), every seed a dot,
the mean with its 95% CI as a bar.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

from nsl.report import RunError, load_run, report_rows
from nsl.stats import mean_ci

RUN = re.compile(r"(?P<name>.+)-s(?P<seed>\d+)")
OPTIONS = ("predictor_width", "predictor_norm", "predictor_stride", "share_prediction", "share_predictor")


def _options(config: dict, options=OPTIONS) -> dict:
    from nsl.train import TrainConfig

    default = TrainConfig().to_dict()
    return {k: config[k] for k in options if k in config and config[k] != default[k]}


def load_study(out: Path, options=OPTIONS) -> dict[str, dict]:
    """``{variant: {"layer", "options", "params", "macs", "runs": {seed: {"acc", "s_per_step"}}}}`` of the
    finished runs in ``out`` (a run directory with a ``done`` file); ``options`` names the config fields that
    make a variant (those that differ from the defaults are its ``options``)."""
    variants: dict[str, dict] = {}
    for d in sorted(out.iterdir()):
        m = RUN.fullmatch(d.name)
        if not m or not (d / "done").is_file():
            continue
        run = load_run(d)
        if run.final_acc is None:
            continue
        row = report_rows([run])[0]
        v = variants.setdefault(m["name"], {"layer": run.config["layer"], "options": _options(run.config, options),
                                            "params": row["params"], "macs": row["macs"], "runs": {}})
        v["runs"][int(m["seed"])] = {"acc": 100 * run.final_acc, "s_per_step": row["s_per_step"]}
    return variants


def load_previous(path: Path) -> dict[str, dict]:
    """The runs of an earlier ``--json`` output as :func:`load_study` returns them; ``ValueError`` names what is
    wrong with the file."""
    try:
        payload = json.loads(path.read_text())
        variants: dict[str, dict] = {}
        for r in payload["runs"]:
            info = payload["variants"].get(r["variant"], {})
            v = variants.setdefault(r["variant"], {"layer": r["layer"], "options": dict(r["options"]),
                                                   "params": info.get("params"), "macs": info.get("macs"),
                                                   "runs": {}})
            v["runs"][int(r["seed"])] = {"acc": float(r["test_acc"]), "s_per_step": r["s_per_step"]}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        what = f"{type(e).__name__}: {e}"
        raise ValueError(f"--previous {path}: not a predictor_study_table.py --json file ({what})") from e
    return variants


def merge(variants: dict, newer: dict) -> None:
    """Add ``newer``'s variants and runs to ``variants``; a run of the same variant and seed is replaced."""
    for name, v in newer.items():
        if name in variants:
            variants[name]["runs"].update(v["runs"])
            variants[name].update({k: v[k] for k in ("layer", "options", "params", "macs")})
        else:
            variants[name] = v


def add_known(variants: dict, spec: str) -> None:
    """``NAME=KIND:ACC0,ACC1,...`` as a variant with ``known=True`` and no params/MACs of its own."""
    name, _, rest = spec.partition("=")
    kind, _, accs = rest.partition(":")
    try:
        values = [float(a) for a in accs.split(",") if a]
    except ValueError:
        values = []
    if not name or not kind or not values:
        raise SystemExit(f"predictor_study_table.py: --known expects NAME=KIND:ACC0,ACC1,... (percent), got {spec!r}")
    variants[name] = {"layer": kind, "options": {}, "params": None, "macs": None, "known": True,
                      "runs": {seed: {"acc": a, "s_per_step": None} for seed, a in enumerate(values)}}


def paired(variants: dict) -> None:
    """Add ``diffs`` ({seed: points}), ``mean`` and ``ci95`` against ``conv`` to every other variant."""
    if "conv" not in variants:
        raise SystemExit("predictor_study_table.py: no finished conv run (OUT_DIR/conv-sSEED) to compare with")
    base = variants["conv"]["runs"]
    for name, v in variants.items():
        if name == "conv":
            continue
        v["diffs"] = {s: r["acc"] - base[s]["acc"] for s, r in sorted(v["runs"].items()) if s in base}
        if v["diffs"]:
            mean, ci = mean_ci(list(v["diffs"].values()))
            v["mean"], v["ci95"] = mean, None if math.isnan(ci) else ci  # None: one seed


def add_bench(variants: dict, bench: dict) -> None:
    """Eager ``train`` / ``infer-b1`` / ``infer-b128`` ms and x conv of ``benchmarks/network.py`` rows named as the
    variants (or as a known variant's layer kind); a benchmarked name without finished runs gets a cost-only row."""
    rows = {(r["kind"], r["phase"]): r for r in bench["rows"] if r["mode"] == "eager"}
    covered = set(variants) | {v["layer"] for v in variants.values() if v.get("known")}
    for name in dict.fromkeys(k for k, _ in rows):  # benchmarked, no finished run yet: a cost-only row
        if name not in covered:
            kind, *sets = bench.get("variants", {}).get(name, name).split(",")  # KIND,KEY=VALUE,... (--variant)
            variants[name] = {"layer": kind, "options": dict(kv.split("=", 1) for kv in sets), "params": None,
                              "macs": None, "runs": {}, "diffs": {}}
    for name, v in variants.items():
        key = name if (name, "train") in rows else v["layer"] if v.get("known") or name == "conv" else name
        for phase in ("train", "infer-b1", "infer-b128"):
            r = rows.get((key, phase))
            if r is not None:
                v[phase] = {"ms": r["ms"], "x_conv": r["x_conv"]}
                if v["macs"] is None:
                    v["macs"], v["params"] = r["macs"], r.get("params")


def _fmt(x, spec: str, missing: str = "") -> str:
    return missing if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def markdown(variants: dict) -> str:
    conv_macs = variants["conv"]["macs"]
    lines = ["| variant | layer kind, options | params | MACs / image (x conv) | train step ms (x conv) | "
             "infer b1 ms (x conv) | infer b128 ms (x conv) | test acc per seed | difference to conv per seed "
             "(points) | mean difference, 95% CI |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- | --- | ---: |"]
    for name, v in variants.items():
        opts = ", ".join(f"{k}={val}" for k, val in v["options"].items())
        label = f"`{v['layer']}`" + (f" {opts}" if opts else "")
        macs = "" if v["macs"] is None else f"{v['macs'] / 1e6:.1f}M ({v['macs'] / conv_macs:.2f}x)"
        cost = [f"{v[p]['ms']:.1f} ({v[p]['x_conv']:.2f}x)" if p in v else "" for p in
                ("train", "infer-b1", "infer-b128")]
        accs = ", ".join(f"{r['acc']:.2f}" for _, r in sorted(v["runs"].items()))
        seeds = ",".join(str(s) for s in sorted(v["runs"]))
        accs = f"{accs} (seeds {seeds})" if v["runs"] else "no finished run"
        diffs = ", ".join(f"{d:+.2f}" for d in v.get("diffs", {}).values())
        mean = (f"{v['mean']:+.2f} +- {_fmt(v['ci95'], '.2f', 'n/a (1 seed)')}" if "mean" in v else "")
        known = " (known)" if v.get("known") else ""
        lines.append(f"| {name}{known} | {label} | {_fmt(v['params'], ',d')} | {macs} | {' | '.join(cost)} | "
                     f"{accs} | {diffs} | {mean} |")
    return "\n".join(lines)


def figure(variants: dict, path: Path) -> Path:
    """Difference to conv against the cost ratio: dots per seed, the mean with its 95% CI bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conv_macs = variants["conv"]["macs"]
    fig, ax = plt.subplots(figsize=(7.2, 4.6))
    shown = [(n, v) for n, v in variants.items() if v.get("diffs") and ("train" in v or v["macs"] is not None)]
    timed = all("train" in v for _, v in shown)
    for i, (name, v) in enumerate(shown):
        x = v["train"]["x_conv"] if timed else v["macs"] / conv_macs
        colour = f"C{i % 10}"
        ds = list(v["diffs"].values())
        ax.scatter([x] * len(ds), ds, color=colour, s=14, alpha=0.6, marker="o" if not v.get("known") else "s")
        ci = v["ci95"] or 0.0
        ax.errorbar([x], [v["mean"]], yerr=[[ci], [ci]], color=colour, marker="D", ms=6, capsize=4, lw=1.5,
                    label=f"{name} ({len(ds)} seed{'s' if len(ds) > 1 else ''})" + (" *" if v.get("known") else ""))
    ax.axhline(0, color="0.4", lw=0.8)
    ax.axhline(0.5, color="C3", lw=0.8, ls=":")
    ax.axvline(1.5, color="C3", lw=0.8, ls=":")
    ax.set(xlabel=("training-step time" if timed else "multiply-adds") + " / conv's (CNN-9 width 16)",
           ylabel="test accuracy - conv's, same seed (points)")
    ax.set_xlim(left=min(1.0, ax.get_xlim()[0]))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    ax.set_title("CIFAR-10, 5 epochs: gain vs cost of dynamic predictors (dots: seeds; bar: mean, 95% CI)\n"
                 "dotted: the goal (>= +0.5 points at <= 1.5x); * measured in the README's full-data study",
                 fontsize=8.5)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=90, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(path)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="the study's OUT_DIR (run directories VARIANT-sSEED)")
    parser.add_argument("--bench", type=Path, help="benchmarks/network.py JSON with the variants' names")
    parser.add_argument("--known", action="append", default=[], metavar="NAME=KIND:ACC0,ACC1,...")
    parser.add_argument("--previous", type=Path, help="an earlier --json output whose runs to include")
    parser.add_argument("--json", type=Path, help="write the per-run results and the table's numbers here")
    parser.add_argument("--figure", type=Path, help="write the gain-vs-cost figure (PNG) here")
    args = parser.parse_args(argv)
    if not args.out.is_dir():
        parser.error(f"{args.out} is not a directory (the study's OUT_DIR)")
    try:
        variants = {} if args.previous is None else load_previous(args.previous)
        merge(variants, load_study(args.out))
    except (RunError, ValueError) as e:
        parser.error(str(e))
    for spec in args.known:
        add_known(variants, spec)
    paired(variants)
    bench = None
    if args.bench is not None:
        try:
            bench = json.loads(args.bench.read_text())
        except (OSError, ValueError) as e:
            parser.error(f"--bench {args.bench}: cannot read a benchmarks/network.py JSON ({e})")
        add_bench(variants, bench)
    print(markdown(variants))
    if args.json is not None:
        payload = {"protocol": "CIFAR-10, CNN-9 width 16, protocol fast, 5 epochs of batch 128, 10,000 test images",
                   "runs": [{"variant": n, "seed": s, "layer": v["layer"], "options": v["options"],
                             "test_acc": r["acc"], "s_per_step": r["s_per_step"]}
                            for n, v in variants.items() if not v.get("known") for s, r in sorted(v["runs"].items())],
                   "variants": {n: {k: val for k, val in v.items() if k != "runs"} for n, v in variants.items()},
                   "bench_environment": None if bench is None else bench.get("environment")}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.json.with_suffix(".tmp")
        tmp.write_text(json.dumps(payload, indent=1, default=str) + "\n")
        tmp.replace(args.json)
    if args.figure is not None and any(v.get("diffs") for v in variants.values()):
        figure(variants, args.figure)
    return 0


if __name__ == "__main__":
    sys.exit(main())
