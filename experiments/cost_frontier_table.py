"""The iso-cost frontier (issue 25): is an NSL kind worth its cost against a wider plain CNN-9?

Usage::

    python experiments/cost_frontier_table.py [OUT_DIR ...] [--previous RESULTS.json ...]
        [--known NAME=KIND[,KEY=VALUE...]:ACC0,ACC1,...] [--bench NETWORK.json]
        [--json experiments/results/cost_frontier.json] [--figure docs/figures/cost_frontier.png]

Reads the finished runs ``OUT_DIR/VARIANT-sSEED`` (a ``done`` file; ``experiments/cost_frontier_cpu.sh``), the runs
recorded in earlier ``--json`` files of this script or of ``predictor_study_table.py`` (``--previous``, their run
directories gone; a finished run in an OUT_DIR replaces the record of the same variant, seed and machine) and runs
given by hand (``--known``: final test accuracies in percent for seeds 0, 1, ...; e.g. the README's full-data study).

Runs pair only with runs of the same machine: a seed fixes the data order, but a CPU with other vector units rounds
differently and the run's trajectory follows (conv seed 0 of the same code: 82.11 on the machine of the earlier
studies, 81.47 on an AVX2 one; each machine repeats its own runs exactly). Every run carries a machine label: runs
read from OUT_DIRs get ``--machine`` (default: this machine's, e.g. ``x86_64 AMD EPYC, AVX2``), recorded runs keep
theirs (``an earlier machine`` where a record has none, as in ``predictor_study.json``), ``--known`` runs get
``--known-machine``. The conv width curve and the positions against it use ``--machine``'s runs only; a variant of
another machine is shown as ``NAME [MACHINE]``, paired with conv of its own machine. Every
run is CIFAR-10, CNN-9, protocol ``fast``, batch 128, all 10,000 test images; a variant is its layer kind plus the
config options that differ from the defaults (``width``, ``epochs``, the predictor options). A variant without a
``width`` option has width 16, without ``epochs`` 5 epochs (the studies' protocol).

For every variant it prints, and writes to ``--json``:

* the test accuracy per seed, the mean with its 95% Student-t interval (:func:`nsl.stats.mean_ci`);
* the seed-paired difference to conv **at the same width and number of epochs** (a seed fixes the data order and
  the augmentation), with its 95% interval and whether that interval excludes zero;
* the cost, from one ``benchmarks/network.py`` run (``--bench``; rows matched to variants by layer kind, width and
  predictor options, so a 20-epoch variant takes its 5-epoch twin's step time): parameters, MACs per image, the
  eager training step at batch 128 (and the training time of a whole run, step time x steps), inference at batch 1
  and 128, each also as a ratio to conv at width 16 in that benchmark run. A static kind (``static-*``, which
  ``nsl.fold`` turns into a plain convolution) is deployed folded: its inference costs are those of conv at the same
  width (the same network once folded), marked "folded" in the table, not the benchmark's unfolded eval-mode row
  (which refolds the weight at every call);
* its position against **the conv width curve** (conv at every width on the shortest schedule among the conv
  runs: 5 epochs in the study; a longer schedule is one more way to spend compute, shown as a point) at equal
  training time and at equal inference time at batch 128 (:data:`INFER`: CNN-9's batch-1 times, 2-3 ms, are mostly
  per-call overhead and not even monotone in width, conv-w12 measuring slower than conv-16; they stay in the cost
  table), and at equal MACs per image (where a kind's operators run less efficiently than a convolution's, as the
  dynamic kinds' do on a CPU, equal MACs is kinder to it than equal time: it is the position that kernels as
  efficient as a convolution's would give it). The curve is interpolated linearly in log cost between the two conv
  widths that bracket the candidate's cost (fraction ``f``), each seed paired with the nearer of the two: per seed
  ``s`` the difference is
  ``acc(s) - conv_lo(s) - f * mean_step`` (``f < 0.5``) or ``acc(s) - conv_hi(s) + (1 - f) * mean_step``, where
  ``mean_step`` is the mean over seeds of ``conv_hi(s) - conv_lo(s)``; its 95% interval adds the interval of the
  ``mean_step`` term in quadrature (the step is estimated from fewer seeds than the candidate may have). A candidate
  cheaper than the narrowest conv or dearer than the widest is compared with that end of the curve, paired by seed,
  and marked so.

The figure (``--figure``): test accuracy against training time per run (log x), and against inference time at
batch 128 (log x); the conv width curve as a line through its means with the 95% bands, every other variant as a
point with its 95% interval. A point above the curve is worth its cost; a point below it is beaten by a wider plain
network.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from predictor_study_table import OPTIONS, load_study, merge  # noqa: E402

from nsl.layers.kinds import layer_kind  # noqa: E402
from nsl.report import RunError  # noqa: E402
from nsl.stats import mean_ci  # noqa: E402

#: the config fields that make a variant here: the predictor study's and the budget's
BUDGET = ("width", "epochs", "iters")  #: the options that set a run's size and length, not its kind
STUDY_OPTIONS = (*OPTIONS, *BUDGET)
DEFAULT_WIDTH, DEFAULT_EPOCHS, STEPS_PER_EPOCH = 16, 5, 390  # 50,000 images, batch 128, last partial batch dropped
PHASES = ("train", "infer-b1", "infer-b128")
INFER = "infer-b128"  # the inference axis of the curve and the figure (see the module docstring)
AXES = ("train", "infer", "macs")  #: training time per run, inference ms at batch 128, MACs per image
#: the field of a conv curve point (and of its JSON record) that holds its cost on each axis of AXES
POINT_COST = {"train": "train_run_s", "infer": "infer", "macs": "macs"}
PROTOCOL = ("CIFAR-10 (all 50,000 training images), CNN-9, protocol fast, batch 128, 10,000 test images; width 16 "
            "and 5 epochs unless the options say otherwise")


EARLIER = "an earlier machine"


def this_machine() -> str:
    """A label for this CPU: architecture, model name and widest vector extension (what changes the rounding)."""
    import platform

    model, flags = "", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and not model:
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else ""
    return ", ".join(t for t in (f"{platform.machine()} {model}".strip(), isa) if t)


def keyed(variants: dict, machine: str, primary: str) -> dict:
    """``variants`` labelled with ``machine``, keyed ``NAME`` (the primary machine) or ``NAME [MACHINE]``."""
    return {(n if machine == primary else f"{n} [{machine}]"): {**v, "name": n, "machine": machine}
            for n, v in variants.items()}


def load_record(path: Path, primary: str) -> dict:
    """The runs of an earlier ``--json`` (this script's or ``predictor_study_table.py``'s), keyed by
    :func:`keyed` with each run's machine; ``ValueError`` names what is wrong with the file."""
    try:
        payload = json.loads(path.read_text())
        out: dict[str, dict] = {}
        for r in payload["runs"]:
            info = payload["variants"].get(r.get("key", r["variant"]), {})
            one = {r["variant"]: {"layer": r["layer"], "options": dict(r["options"]), "params": info.get("params"),
                                  "macs": info.get("macs"),
                                  "runs": {int(r["seed"]): {"acc": float(r["test_acc"]),
                                                            "s_per_step": r.get("s_per_step")}}}}
            merge(out, keyed(one, r.get("machine") or EARLIER, primary))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"--previous {path}: not a results JSON of cost_frontier_table.py or "
                         f"predictor_study_table.py ({type(e).__name__}: {e})") from e
    return out


def _norm(value) -> str:
    """An option value as text, so that ``2``, ``2.0`` and ``'2'``, or ``True`` and ``'true'``, compare equal."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).lower()


def budget(v: dict) -> tuple[int, float]:
    """``(width, epochs)`` of a variant (``epochs`` from ``iters`` where a run set its length in steps)."""
    opts = v["options"]
    if opts.get("iters") is not None:
        return int(opts.get("width", DEFAULT_WIDTH)), float(opts["iters"]) / STEPS_PER_EPOCH
    return int(opts.get("width", DEFAULT_WIDTH)), float(opts.get("epochs") or DEFAULT_EPOCHS)


def schedule(variants: dict) -> float:
    """The epochs of the conv width curve: the shortest schedule of any conv variant (5 in the study)."""
    return min((budget(v)[1] for v in variants.values() if is_conv(v)), default=DEFAULT_EPOCHS)


def primary_of(variants: dict) -> str | None:
    """The machine whose conv runs make the curve: the one of the variants keyed without a ``[MACHINE]``."""
    return next((v["machine"] for k, v in variants.items() if k == v["name"]), None)


def is_conv(v: dict) -> bool:
    """A plain CNN-9 (layer kind ``conv``, no option but its width and epochs)."""
    return v["layer"] == "conv" and set(v["options"]) <= set(BUDGET)


def cost_key(layer: str, options: dict, width: int) -> tuple:
    """What a run's cost depends on: the layer kind, the width and the predictor options (not the epochs)."""
    opts = {k: _norm(val) for k, val in options.items() if k not in BUDGET}
    return layer, int(width), tuple(sorted(opts.items()))


def add_known(variants: dict, spec: str, machine: str, primary: str) -> None:
    """``NAME=KIND[,KEY=VALUE...]:ACC0,ACC1,...`` (percent, seeds 0, 1, ...) of ``machine`` merged into
    ``variants``."""
    name, _, rest = spec.partition("=")
    head, _, accs = rest.rpartition(":")
    kind, *sets = head.split(",")
    try:
        values = [float(a) for a in accs.split(",") if a]
        options = dict(kv.split("=", 1) for kv in sets)
    except ValueError:
        values, options = [], {}
    if not name or not kind or not values:
        raise SystemExit(f"cost_frontier_table.py: --known expects NAME=KIND[,KEY=VALUE...]:ACC0,ACC1,... "
                         f"(percent), got {spec!r}")
    merge(variants, keyed({name: {"layer": kind, "options": options, "params": None, "macs": None,
                                  "runs": {s: {"acc": a, "s_per_step": None} for s, a in enumerate(values)}}},
                          machine, primary))


def paired(variants: dict) -> None:
    """Per variant: ``mean``/``ci95`` of its accuracies and, against conv of the same width, epochs and machine (its
    ``baseline``), the per-seed ``diffs``, ``diff_mean``, ``diff_ci95`` and ``excludes_zero``."""
    convs = {(budget(v), v["machine"]): name for name, v in variants.items() if is_conv(v)}
    for v in variants.values():
        accs = [r["acc"] for _, r in sorted(v["runs"].items())]
        if accs:
            v["mean"], ci = mean_ci(accs)
            v["ci95"] = None if math.isnan(ci) else ci
        base = convs.get((budget(v), v["machine"]))
        if is_conv(v) or base is None:
            continue
        v["baseline"] = base
        runs = variants[base]["runs"]
        v["diffs"] = {s: r["acc"] - runs[s]["acc"] for s, r in sorted(v["runs"].items()) if s in runs}
        if v["diffs"]:
            mean, ci = mean_ci(list(v["diffs"].values()))
            v["diff_mean"], v["diff_ci95"] = mean, None if math.isnan(ci) else ci
            v["excludes_zero"] = None if math.isnan(ci) else abs(mean) > ci


def add_bench(variants: dict, bench: dict) -> None:
    """Each variant's ``train`` / ``infer-b1`` / ``infer-b128`` eager ms from the ``benchmarks/network.py`` row of
    the same layer kind, width and predictor options, with ``x_conv`` against conv at width 16 of that run; and the
    ``train_run_s`` of a whole run (step time x steps). MACs and parameters come from the row when the runs gave
    none."""
    width = int(bench.get("width", DEFAULT_WIDTH))
    specs = bench.get("variants", {})
    rows: dict[tuple, dict] = {}
    for r in bench["rows"]:
        if r["mode"] != "eager":
            continue
        kind, *sets = specs.get(r["kind"], r["kind"]).split(",")
        opts = dict(kv.split("=", 1) for kv in sets)
        key = cost_key(kind, opts, int(opts.get("width", width)))
        rows.setdefault(key, {})[r["phase"]] = r
    ref = rows.get(cost_key("conv", {}, DEFAULT_WIDTH), {})
    for v in variants.values():
        w, epochs = budget(v)
        found = rows.get(cost_key(v["layer"], v["options"], w), {})
        for phase in PHASES:
            r = found.get(phase)
            if r is None:
                continue
            base = ref.get(phase, {}).get("ms")
            v[phase] = {"ms": r["ms"], "x_conv": None if not base else r["ms"] / base}
            if v.get("macs") is None:
                v["macs"], v["params"] = r["macs"], r.get("params")
        if layer_kind(v["layer"]).foldable:  # deployed folded: the same network as conv at this width
            conv_rows = rows.get(cost_key("conv", {}, w), {})
            for phase in PHASES[1:]:
                r, base = conv_rows.get(phase), ref.get(phase, {}).get("ms")
                if r is not None:
                    v[phase] = {"ms": r["ms"], "x_conv": None if not base else r["ms"] / base, "folded": True}
        if "train" in v:
            v["train_run_s"] = v["train"]["ms"] * epochs * STEPS_PER_EPOCH / 1000


def curve(variants: dict) -> list[dict]:
    """The conv width curve: conv at each width on the curve's :func:`schedule`, by width: ``{"name", "width",
    "mean", "ci95", "runs": {seed: acc}, "train_run_s", "infer", "macs"}`` (cost fields None when not benchmarked;
    ``infer``: the :data:`INFER` ms)."""
    points, sched, primary = [], schedule(variants), primary_of(variants)
    for name, v in variants.items():
        w, epochs = budget(v)
        if is_conv(v) and epochs == sched and v["runs"] and v["machine"] == primary:
            points.append({"name": name, "machine": v["machine"], "width": w, "mean": v["mean"], "ci95": v.get("ci95"),
                           "runs": {s: r["acc"] for s, r in v["runs"].items()},
                           **{POINT_COST[a]: _cost(v, a) for a in AXES}})
    return sorted(points, key=lambda p: p["width"])


def _cost(v: dict, axis: str):
    """Variant ``v``'s cost on ``axis`` (one of :data:`AXES`), None when unknown."""
    return {"train": v.get("train_run_s"), "infer": v.get(INFER, {}).get("ms"), "macs": v.get("macs")}[axis]


def against_curve(v: dict, points: list[dict], axis: str) -> dict | None:
    """Where variant ``v`` stands against the conv curve at equal cost on ``axis`` (``'train'``: training time per
    run; ``'infer'``: inference at batch 128, :data:`INFER`; ``'macs'``: MACs per image): ``{"lo", "hi", "f", "seeds",
    "mean", "ci95", "where"}``, ``where`` one of ``'between'``, ``'cheaper than the narrowest'``, ``'dearer than the
    widest'``; None without costs."""
    c = _cost(v, axis)
    pts = [p for p in points if _cost_of_point(p, axis) is not None]
    if c is None or not pts or not v["runs"] or v["machine"] != points[0]["machine"]:
        return None
    pts.sort(key=lambda p: _cost_of_point(p, axis))
    costs = [_cost_of_point(p, axis) for p in pts]
    accs = {s: r["acc"] for s, r in v["runs"].items()}
    if c <= costs[0] or c >= costs[-1] or len(pts) == 1:
        end, where = (pts[0], "cheaper than the narrowest") if c <= costs[0] else (pts[-1], "dearer than the widest")
        diffs = [a - end["runs"][s] for s, a in sorted(accs.items()) if s in end["runs"]]
        if not diffs:
            return None
        mean, ci = mean_ci(diffs)
        return {"lo": end["name"], "hi": end["name"], "f": 0.0, "seeds": len(diffs), "mean": mean,
                "ci95": None if math.isnan(ci) else ci, "where": where}
    i = next(k for k in range(1, len(costs)) if costs[k] >= c)
    lo, hi = pts[i - 1], pts[i]
    f = math.log(c / costs[i - 1]) / math.log(costs[i] / costs[i - 1])
    steps = [hi["runs"][s] - lo["runs"][s] for s in lo["runs"] if s in hi["runs"]]
    if not steps:
        return None
    step, step_ci = mean_ci(steps)
    near, shift = (lo, f * step) if f < 0.5 else (hi, -(1 - f) * step)  # each seed paired with the nearer width
    diffs = [a - near["runs"][s] - shift for s, a in sorted(accs.items()) if s in near["runs"]]
    if not diffs:
        return None
    mean, ci = mean_ci(diffs)
    ci = None if math.isnan(ci) or math.isnan(step_ci) else math.hypot(ci, min(f, 1 - f) * step_ci)
    return {"lo": lo["name"], "hi": hi["name"], "f": f, "seeds": len(diffs), "mean": mean, "ci95": ci,
            "where": "between"}


def _cost_of_point(p: dict, axis: str) -> float | None:
    return p.get(POINT_COST[axis])


def _pm(mean, ci, n=None) -> str:
    if mean is None:
        return ""
    tail = f" (n={n})" if n is not None else ""
    return f"{mean:+.2f} +- {ci:.2f}{tail}" if ci is not None else f"{mean:+.2f} +- n/a (1 seed)"


def _label(v: dict) -> str:
    opts = ", ".join(f"{k}={val}" for k, val in v["options"].items() if k not in BUDGET)
    return f"`{v['layer']}`" + (f" {opts}" if opts else "")


def _position(pos: dict | None) -> str:
    if pos is None:
        return ""
    ref = pos["lo"] if pos["lo"] == pos["hi"] else f"{pos['lo']}..{pos['hi']} (f={pos['f']:.2f})"
    verdict = ("above" if pos["mean"] > pos["ci95"] else "below" if pos["mean"] < -pos["ci95"] else "on") \
        if pos["ci95"] is not None else "n/a"
    where = "" if pos["where"] == "between" else f", {pos['where']}"
    return f"{_pm(pos['mean'], pos['ci95'], pos['seeds'])} vs {ref}{where}: **{verdict}**"


def _seed_text(seeds: list[int], span: int) -> str:
    """``'0-8'`` for at least ``span`` consecutive seeds, else ``'0,2'``."""
    consecutive = seeds == list(range(seeds[0], seeds[-1] + 1))
    return f"{seeds[0]}-{seeds[-1]}" if consecutive and len(seeds) >= span else ",".join(map(str, seeds))


def _size(v: dict) -> tuple[str, str]:
    """The params and MACs cells."""
    return ("" if v.get("params") is None else f"{v['params']:,}",
            "" if v.get("macs") is None else f"{v['macs'] / 1e6:.1f}M")


def _positions(v: dict, points: list[dict], sched: float) -> list[str]:
    """The cells of ``v``'s position against the conv curve, one per axis of :data:`AXES`; empty for the curve's own
    points, and only the training cell for a longer schedule (per image, inference and MACs are its shorter twin's,
    whose row says it)."""
    epochs = budget(v)[1]
    if is_conv(v) and epochs == sched:
        return ["" for _ in AXES]
    return [_position(against_curve(v, points, a)) if a == "train" or epochs == sched else "" for a in AXES]


def markdown(variants: dict, points: list[dict]) -> str:
    """Two tables: accuracy paired by seed, and cost with the position against the conv curve."""
    acc = ["| variant | layer kind, options | width | epochs | test accuracy per seed (seeds) | mean, 95% CI | "
           "difference to conv, same width and epochs, per seed (points) | paired mean difference, 95% CI | "
           "CI excludes 0 |",
           "| --- | --- | ---: | ---: | --- | ---: | --- | ---: | --- |"]
    cost = ["| variant | params | MACs / image | train step ms (x conv-16) | training time per run, s | "
            "infer b1 ms (x conv-16) | infer b128 ms (x conv-16) | vs conv curve at equal training time | "
            "vs conv curve at equal b128 inference time | vs conv curve at equal MACs |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- | --- |"]
    sched = schedule(variants)
    for name, v in variants.items():
        w, epochs = budget(v)
        seeds = sorted(v["runs"])
        accs = ", ".join(f"{v['runs'][s]['acc']:.2f}" for s in seeds)
        seed_text = _seed_text(seeds, 3)
        diffs = ", ".join(f"{d:+.2f}" for d in v.get("diffs", {}).values())
        excl = {True: "yes", False: "no", None: "n/a"}[v.get("excludes_zero")] if "diff_mean" in v else ""
        acc.append(f"| {name} | {_label(v)} | {w} | {epochs:.3g} | {accs} ({seed_text}) | "
                   f"{v['mean']:.2f} +- {_fmt(v.get('ci95'))} | {diffs} | "
                   f"{_pm(v.get('diff_mean'), v.get('diff_ci95'))} | {excl} |")
        cells = [f"{v[p]['ms']:.1f} ({_fmt(v[p]['x_conv'])}x{', folded' if v[p].get('folded') else ''})"
                 if p in v else "" for p in PHASES]
        run_s = f"{v['train_run_s']:,.0f}" if "train_run_s" in v else ""
        params, macs = _size(v)
        positions = _positions(v, points, sched)
        cost.append(f"| {name} | {params} | {macs} | {cells[0]} | {run_s} | {cells[1]} | {cells[2]} | "
                    + " | ".join(positions) + " |")
    return "\n".join(acc) + "\n\n" + "\n".join(cost)


def compact(variants: dict, points: list[dict]) -> str:
    """One table of the curve's machine only (the README's): per variant its seeds, mean accuracy, paired difference
    to conv at the same width and epochs, params, MACs, cost ratios to conv-16 and its positions on the curve."""
    rows = ["| variant | seeds | test accuracy, mean +- 95% CI | paired difference to conv, same width and epochs "
            "(CI excludes 0?) | params | MACs | train step (x conv-16) | infer b1 / b128 (x conv-16) | "
            "vs conv curve, equal training time | vs conv curve, equal b128 inference | vs conv curve, equal MACs |",
            "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | --- | --- | --- |"]
    sched, primary = schedule(variants), primary_of(variants)
    for name, v in variants.items():
        if v["machine"] != primary or not v["runs"]:
            continue
        seeds = sorted(v["runs"])
        seed_text = _seed_text(seeds, 2)
        acc = f"{v['mean']:.2f}" + (f" +- {v['ci95']:.2f}" if v.get("ci95") is not None else "")
        excl = {True: "yes", False: "no", None: "n/a"}[v.get("excludes_zero")]
        diff = f"{_pm(v['diff_mean'], v.get('diff_ci95'))} ({excl})" if "diff_mean" in v else ""
        train = f"{_fmt(v['train']['x_conv'])}x" if "train" in v else ""
        infer = " / ".join(f"{_fmt(v[p]['x_conv'])}x" for p in PHASES[1:] if p in v)
        if infer and all(v[p].get("folded") for p in PHASES[1:] if p in v):
            infer += " (folded)"
        params, macs = _size(v)
        positions = _positions(v, points, sched)
        rows.append(f"| {name} | {seed_text} | {acc} | {diff} | {params} | {macs} | {train} | {infer} | "
                    + " | ".join(positions) + " |")
    return "\n".join(rows)


def _fmt(x, spec: str = ".2f") -> str:
    return "n/a" if x is None else format(x, spec)


def figure(variants: dict, points: list[dict], path: Path) -> Path:
    """Two panels (training time per run; inference time at batch 128), log x: the conv width curve with its 95%
    band, every other variant a point with its 95% interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12.5, 5.4), sharey=True)
    sched, primary = schedule(variants), primary_of(variants)
    others = [(n, v) for n, v in variants.items()
              if not (is_conv(v) and budget(v)[1] == sched) and v["machine"] == primary]
    for ax, axis, xlabel in ((axes[0], "train", "training time per run, s (benchmark step time x steps, 1 thread)"),
                             (axes[1], "infer", "inference at batch 128, ms (eval mode, 1 thread)")):
        pts = [p for p in points if _cost_of_point(p, axis) is not None]
        if pts:
            xs = [_cost_of_point(p, axis) for p in pts]
            ys = [p["mean"] for p in pts]
            cis = [p["ci95"] or 0.0 for p in pts]
            ax.plot(xs, ys, "-", color="k", lw=1.6, label="conv, widths " + ", ".join(str(p["width"]) for p in pts))
            ax.fill_between(xs, [y - c for y, c in zip(ys, cis)], [y + c for y, c in zip(ys, cis)], color="k",
                            alpha=0.12, lw=0)
            for p, x in zip(pts, xs):
                ax.annotate(f"w{p['width']}", (x, p["mean"]), textcoords="offset points", xytext=(4, -11), fontsize=8)
        for i, (name, v) in enumerate(others):
            x = _cost(v, axis)
            if x is None or "mean" not in v or (axis == "infer" and budget(v)[1] != sched):
                continue
            long = budget(v)[1] != sched
            ci = v.get("ci95") or 0.0
            n = len(v["runs"])
            ax.errorbar([x], [v["mean"]], yerr=[[ci], [ci]], color=f"C{i % 10}", marker="s" if long else "o",
                        mfc="none" if long else f"C{i % 10}", ms=6, capsize=3, lw=1.2,
                        label=f"{name} ({n} seed{'s' if n > 1 else ''})")
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("CIFAR-10 test accuracy, % (mean, 95% CI)")
    axes[0].legend(fontsize=7, loc="lower right", ncol=2)
    fig.suptitle("Is NSL worth its cost? CNN-9 on CIFAR-10, 5 epochs (hollow squares: a longer schedule), all runs "
                 f"on one machine ({primary}).\nAbove the conv width curve: worth it; below: a wider plain CNN is "
                 "better at equal cost", fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=90, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(path)
    return path


def payload(variants: dict, points: list[dict], bench: dict | None) -> dict:
    """The ``--json`` record: every run (so a machine without the run directories can rebuild the table with
    ``--previous``), every variant's numbers and the curve."""
    return {"protocol": PROTOCOL,
            "runs": [{"variant": v["name"], "key": n, "machine": v["machine"], "seed": s, "layer": v["layer"],
                      "options": v["options"], "test_acc": r["acc"], "s_per_step": r["s_per_step"]}
                     for n, v in variants.items() for s, r in sorted(v["runs"].items())],
            "variants": {n: {**{k: val for k, val in v.items() if k != "runs"},
                             "vs_curve": {a: against_curve(v, points, a) for a in AXES}}
                         for n, v in variants.items()},
            "curve": points,
            "bench_environment": None if bench is None else bench.get("environment")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, nargs="*", help="run folders holding VARIANT-sSEED run directories")
    parser.add_argument("--previous", type=Path, action="append", default=[],
                        help="an earlier --json of this script or of predictor_study_table.py (repeatable)")
    parser.add_argument("--known", action="append", default=[], metavar="NAME=KIND[,KEY=VALUE...]:ACC0,ACC1,...")
    parser.add_argument("--machine", default=None, help="the machine of the OUT_DIR runs and of the curve "
                                                        "(default: this machine's label)")
    parser.add_argument("--known-machine", default=EARLIER, help=f"the machine of --known runs (default: {EARLIER})")
    parser.add_argument("--bench", type=Path, help="benchmarks/network.py JSON (eager, --variant names free)")
    parser.add_argument("--json", type=Path, help="write the runs, the table's numbers and the curve here")
    parser.add_argument("--figure", type=Path, help="write the two-panel frontier figure (PNG) here")
    parser.add_argument("--compact", action="store_true", help="print one table of this machine's variants "
                        "(the README's) instead of the two full tables")
    args = parser.parse_args(argv)
    for out in args.out:
        if not out.is_dir():
            parser.error(f"{out} is not a directory (a run folder of experiments/cost_frontier_cpu.sh)")
    variants: dict[str, dict] = {}
    primary = args.machine or this_machine()
    try:
        for prev in args.previous:
            merge(variants, load_record(prev, primary))
        for spec in args.known:
            add_known(variants, spec, args.known_machine, primary)
        for out in args.out:
            merge(variants, keyed(load_study(out, STUDY_OPTIONS), primary, primary))
    except (RunError, ValueError) as e:
        parser.error(str(e))
    if not variants:
        parser.error("no runs: give run folders, --previous or --known")
    bench = None
    if args.bench is not None:
        try:
            bench = json.loads(args.bench.read_text())
            add_bench(variants, bench)
        except (OSError, ValueError, KeyError, TypeError) as e:
            parser.error(f"--bench {args.bench}: not a benchmarks/network.py JSON ({type(e).__name__}: {e})")
    variants = dict(sorted(variants.items(), key=lambda kv: (not is_conv(kv[1]), budget(kv[1])[1],
                                                             budget(kv[1])[0], kv[0])))
    paired(variants)
    points = curve(variants)
    print(compact(variants, points) if args.compact else markdown(variants, points))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.json.with_suffix(".tmp")
        tmp.write_text(json.dumps(payload(variants, points, bench), indent=1, default=str) + "\n")
        tmp.replace(args.json)
    if args.figure is not None:
        figure(variants, points, args.figure)
    return 0


if __name__ == "__main__":
    sys.exit(main())
