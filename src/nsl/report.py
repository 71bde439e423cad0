"""``nsl report``: a markdown table and learning curves for one or more training runs.

::

    nsl report runs/cnn9-conv runs/cnn9-dd-s0 runs/cnn9-dd-s1 --out reports/cnn9

writes ``reports/cnn9/report.md`` (one row per run: model, layer kind, dataset, parameters, MACs
per image, final and best test accuracy, wall time, iterations; runs that differ only by their
seed are also grouped into mean +- 95% confidence interval rows; s / step is wall time over
iterations), ``reports/cnn9/curves.png`` (training loss and test accuracy against the step, one line
per run) and, for more than one variant or seed, ``reports/cnn9/accuracy.png`` (final test accuracy
per variant, each seed a point).

Multiply-adds (MACs) per image are counted with forward hooks for one input image
(:func:`count_macs`):

* ``nn.Conv2d`` (and :class:`nsl.NSConv2d`, whose static ``M`` folds into the weight):
  ``C_out * C_in/groups * kh * kw`` per output location; the fold ``W M`` itself is a per-model,
  not per-image, cost and is not counted.
* :class:`nsl.SphereConv2d` (the predictors' normalised convolutions): the convolution plus the
  patch norm ``conv(x*x, 1)``, ``C_in/groups * kh * kw`` per output location.
* :class:`nsl.DynamicNSConv2d`: the convolution ``C_out * C_in/groups * P`` plus the modulation of
  every input patch by ``M(y)``: ``C_in * P`` (diagonal) or ``C_in * P * P`` (full) per output
  location; the predictor's convolutions are counted by their own hooks.
* :class:`nsl.models.DynamicFilterConv2d`: the convolution plus the dynamic filtering
  ``C_in * P`` per output location; its predictor and 1x1 mixing convolution are counted by their
  own hooks.
* ``nn.Linear``: ``in * out``. Batch norm, activations, pooling and additions are not counted.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn as nn

from .stats import mean_ci

__all__ = ["RunRecord", "RunError", "load_run", "count_macs", "write_report", "plot_curves", "add_parser"]

# config fields that do not change what a run computes (besides the seed) when grouping runs
_NOT_A_VARIANT = {"seed", "out", "progress", "device", "data_dir", "stop_at", "num_workers", "eval_batch_size"}


class RunError(ValueError):
    """A run directory is missing or does not hold an ``nsl train`` run."""


class RunRecord:
    """What :func:`load_run` reads from a run directory."""

    def __init__(self, path: Path, config: dict, records: list[dict], meta: dict | None, params: int | None):
        self.path, self.config, self.records, self.meta, self.params = path, config, records, meta, params
        self.name = path.name

    @property
    def train(self) -> list[dict]:
        return [r for r in self.records if r.get("kind") == "train"]

    @property
    def evals(self) -> list[dict]:
        return [r for r in self.records if r.get("kind") == "eval"]

    @property
    def final_acc(self) -> float | None:
        ev = self.evals
        return ev[-1]["test_acc"] if ev else None

    @property
    def best_acc(self) -> float | None:
        ev = self.evals
        return max(r["test_acc"] for r in ev) if ev else None

    @property
    def final_active(self) -> float | None:
        """Fraction of active kernel positions at the last evaluation (1.0 for runs without a kernel shape)."""
        if not self.config.get("shape_active"):
            return 1.0
        ev = [r for r in self.evals if "active" in r]
        return ev[-1]["active"] if ev else None

    @property
    def iterations(self) -> int:
        return max((int(r.get("step", 0)) for r in self.records), default=0)

    @property
    def wall_time(self) -> float | None:
        """Seconds of training: ``time`` restarts at 0 when a run is resumed, so segments are summed."""
        total, seg_max, last = 0.0, 0.0, None
        for r in self.records:
            t = r.get("time")
            if t is None:
                continue
            if last is not None and t < last:
                total += seg_max
                seg_max = 0.0
            seg_max, last = max(seg_max, t), t
        return total + seg_max if last is not None else None

    def variant_key(self) -> str:
        return json.dumps({k: v for k, v in self.config.items() if k not in _NOT_A_VARIANT}, sort_keys=True)


def load_run(path: str | Path) -> RunRecord:
    """Read ``RUN_DIR/config.json``, ``RUN_DIR/metrics.jsonl`` and (if present) a checkpoint's meta."""
    path = Path(path).expanduser()
    if not path.exists():
        raise RunError(f"run directory {path} does not exist")
    if not path.is_dir():
        raise RunError(f"{path} is not a directory; expected a run directory written by `nsl train` "
                       "(holding config.json and metrics.jsonl)")
    cfg_path, met_path = path / "config.json", path / "metrics.jsonl"
    for p in (cfg_path, met_path):
        if not p.is_file():
            raise RunError(f"{path} is not an nsl run directory: {p.name} is missing (expected config.json and "
                           "metrics.jsonl, written by `nsl train --out RUN_DIR`)")
    try:
        config = json.loads(cfg_path.read_text())
        if not isinstance(config, dict) or "model" not in config or "layer" not in config:
            raise ValueError("not a training config (no 'model' / 'layer')")
    except ValueError as e:
        raise RunError(f"{cfg_path} is not a valid run config: {e}") from None
    records = []
    for i, line in enumerate(met_path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            raise RunError(f"{met_path} line {i} is not valid JSON: {line[:80]!r}") from None
        if isinstance(rec, dict):
            records.append(rec)
    meta, params = None, None
    for name in ("last.pt", "best.pt"):
        ck = path / "checkpoints" / name
        if ck.is_file():
            try:
                state = torch.load(ck, map_location="cpu", weights_only=True)
                meta, params = state.get("meta"), state.get("params")
                break
            except Exception:  # a corrupt checkpoint only costs the MACs column
                continue
    return RunRecord(path, config, records, meta, params)


# -- multiply-adds -------------------------------------------------------------------------------
def count_macs(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-adds of one forward pass on a single input of shape ``input_shape`` (``[C, H, W]``).

    See the module docstring for what is counted. The model is run in eval mode on the CPU with
    the default backend; its mode is restored.
    """
    from .layers import DynamicNSConv2d, SphereConv2d
    from .models import DynamicFilterConv2d

    total = [0]

    def hook(m, inputs, out):
        x = inputs[0]
        locs = out.shape[-2] * out.shape[-1] if out.dim() == 4 else 1
        if isinstance(m, nn.Conv2d):
            kh, kw = m.kernel_size
            P = kh * kw
            cin = m.in_channels // m.groups
            macs = m.out_channels * cin * P * locs
            if isinstance(m, SphereConv2d):
                macs += cin * P * locs
            elif isinstance(m, DynamicNSConv2d):
                macs += x.shape[1] * P * (P if m.similarity_kind == "full" else 1) * locs
            elif isinstance(m, DynamicFilterConv2d):
                macs += x.shape[1] * P * locs
            total[0] += macs
        elif isinstance(m, nn.Linear):
            total[0] += m.in_features * m.out_features * (out.numel() // max(1, out.shape[-1]))

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    was_training = model.training
    model.eval()
    try:
        p = next(model.parameters(), None)
        x = torch.zeros(1, *input_shape, device=p.device if p is not None else "cpu")
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return total[0]


def _model_of(run: RunRecord) -> tuple[nn.Module, tuple[int, int, int]] | None:
    from .data import dataset_info
    from .train import TrainConfig, build_model_for

    cfg = TrainConfig.from_dict(run.config)
    meta = run.meta
    if meta is None:
        info = dataset_info(cfg.dataset)
        if not info.num_classes:
            return None
        meta = dict(num_classes=info.num_classes, in_channels=info.channels,
                    image_size=cfg.image_size if info.name == "imagefolder" else info.image_size)
    return build_model_for(cfg, meta), (meta["in_channels"], meta["image_size"], meta["image_size"])


# -- output --------------------------------------------------------------------------------------
def _fmt_int(n) -> str:
    if n is None:
        return "n/a"
    for unit, d in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= d:
            return f"{n / d:.2f}{unit}"
    return str(int(n))


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.2f}%"


def _secs(v) -> str:
    return "n/a" if v is None else f"{v:.1f} s"


def _per_step(seconds, iters) -> float | None:
    return seconds / iters if seconds is not None and iters else None


def _pyplot():
    """``matplotlib.pyplot`` on the file-only Agg backend (imported when a figure is drawn, not at start-up)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> Path:
    """Lay out ``fig``, write it to ``path`` as a PNG, close it; returns the path."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_curves(runs: list[RunRecord], path: str | Path, title: str | None = None) -> Path:
    """Training loss and test accuracy against the step, one line per run, as a PNG."""
    plt = _pyplot()

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, run in enumerate(runs):
        colour = f"C{i % 10}"
        layer = str(run.config.get("layer"))
        label = run.name if layer in run.name else f"{run.name} ({layer})"
        tr = run.train
        if tr:
            ax_loss.plot([r["step"] for r in tr], [r["loss"] for r in tr], color=colour, label=label, lw=1.3)
        ev = run.evals
        if ev:
            ax_acc.plot([r["step"] for r in ev], [100 * r["test_acc"] for r in ev], color=colour, label=label,
                        marker="o", ms=3, lw=1.3)
    ax_loss.set(title="Training loss (mean over each logging window)", xlabel="optimizer step",
                ylabel="cross-entropy (with the run's label smoothing)")
    ax_acc.set(title="Test accuracy", xlabel="optimizer step", ylabel="test accuracy (%)")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no records", ha="center", va="center", transform=ax.transAxes)
    datasets = sorted({str(r.config.get("dataset")) for r in runs})
    fig.suptitle(title or f"Learning curves on {', '.join(datasets)}")
    return _save(fig, path)


def plot_accuracy_by_variant(runs: list[RunRecord], groups: list[list[int]], labels: list[str],
                             path: str | Path) -> Path | None:
    """Final test accuracy per variant, every seed as a point (labelled with its seed) and the mean as a
    bar across, as a PNG; ``None`` when no run has a final accuracy.

    ``groups``: run indices per variant (runs that differ only by seed), ``labels``: one per group."""
    points = [[(runs[i].config.get("seed"), 100 * runs[i].final_acc) for i in g if runs[i].final_acc is not None]
              for g in groups]
    if not any(points):
        return None
    plt = _pyplot()

    fig, ax = plt.subplots(figsize=(max(6.0, 1.25 * len(groups) + 2.5), 4.6))
    for x, pts in enumerate(points):
        if not pts:
            continue
        accs = [a for _, a in pts]
        offsets = [0.0] if len(pts) == 1 else [-0.12 + 0.24 * j / (len(pts) - 1) for j in range(len(pts))]
        ax.scatter([x + o for o in offsets], accs, color=f"C{x % 10}", s=28, zorder=3)
        for o, (seed, a) in zip(offsets, pts):
            ax.annotate(f"s{seed}", (x + o, a), textcoords="offset points", xytext=(5, -3), fontsize=7, color="0.35")
        mean = sum(accs) / len(accs)
        ax.hlines(mean, x - 0.25, x + 0.25, color=f"C{x % 10}", lw=2)
        ax.annotate(f"{mean:.2f}", (x + 0.26, mean), fontsize=8, va="center")
    ax.set_xticks(range(len(groups)), labels, rotation=20, ha="right", fontsize=8)
    ax.set(ylabel="final test accuracy (%)", xlim=(-0.6, len(groups) - 0.2))
    ax.grid(alpha=0.3, axis="y")
    datasets = sorted({str(r.config.get("dataset")) for r in runs})
    ax.set_title(f"{', '.join(datasets)}: final test accuracy per variant (dots: seeds, bar: mean)", fontsize=10)
    return _save(fig, path)


def _short_labels(runs: list[RunRecord], groups: list[list[int]], labels: list[str]) -> list[str]:
    """The layer kind alone when the groups differ only by it, else the full variant labels."""
    if len({str(runs[g[0]].config.get("layer")) for g in groups}) == len(groups) and all(
            "(" not in label for label in labels):
        return [str(runs[g[0]].config.get("layer")) for g in groups]
    return labels


def parse_baseline(text: str) -> dict[str, str]:
    """``"layer=conv,shape_active=0"`` -> ``{"layer": "conv", "shape_active": "0"}`` (RunError when malformed)."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise RunError("--baseline expects KEY=VALUE[,KEY=VALUE...] (config fields, e.g. layer=conv), "
                           f"got {text!r}")
        out[key.strip()] = value.strip()
    if not out:
        raise RunError(f"--baseline expects KEY=VALUE[,KEY=VALUE...], got {text!r}")
    return out


def _matches(config: dict, selector: dict[str, str]) -> bool:
    def same(v, want):
        return str(v).lower() == want.lower() or json.dumps(v) == want
    return all(k in config and same(config[k], v) for k, v in selector.items())


def paired_differences(runs: list[RunRecord], groups: list[list[int]], baseline: dict[str, str]) -> list[dict]:
    """Seed-paired accuracy differences of every variant group against the baseline group.

    ``groups``: run indices per variant (runs that differ only by seed). The baseline is the one group
    whose config matches every ``KEY=VALUE`` of ``baseline``. For each other group, runs are paired
    with baseline runs of the same seed; the result per group: ``seeds``, ``diffs`` (final test
    accuracy minus the baseline's, per seed), ``mean`` and ``ci95`` (Student t over the seeds).
    """
    for key in baseline:
        if not any(key in r.config for r in runs):
            raise RunError(f"--baseline: {key!r} is not a config field of these runs")
    base = [g for g in groups if _matches(runs[g[0]].config, baseline)]
    if len(base) != 1:
        shown = ", ".join(f"{k}={v}" for k, v in baseline.items())
        raise RunError(f"--baseline {shown} matches {len(base)} variant(s) of these runs; it must match exactly one "
                       "(add KEY=VALUE pairs to narrow it)")
    by_seed = {runs[i].config.get("seed"): runs[i] for i in base[0]}
    out = []
    for g in groups:
        if g is base[0]:
            continue
        pairs = [(runs[i].config.get("seed"), runs[i].final_acc, by_seed[runs[i].config.get("seed")].final_acc)
                 for i in g if runs[i].config.get("seed") in by_seed]
        pairs = [(sd, a, b) for sd, a, b in pairs if a is not None and b is not None]
        if not pairs:
            continue
        diffs = [a - b for _, a, b in pairs]
        mean, ci = mean_ci(diffs)
        out.append({"group": g, "seeds": [sd for sd, _, _ in pairs], "diffs": diffs, "mean": mean, "ci95": ci,
                    "wins": sum(d > 0 for d in diffs)})
    return out


def plot_shape_curve(runs: list[RunRecord], path: str | Path) -> Path | None:
    """Final test accuracy against the fraction of active kernel positions, one line per kernel-shape
    method and schedule (mean over seeds; bars: 95% CI with 3 or more seeds, else the range of the seeds;
    dots: single runs), runs without a kernel shape as the dense reference. ``None`` when no run has a
    kernel shape."""
    if not any(r.config.get("shape_active") for r in runs):
        return None
    plt = _pyplot()

    def series_name(c: dict) -> str:
        if not c.get("shape_active"):
            return "dense (all positions)"
        if c.get("shape_method") == "magnitude":
            return "magnitude pruning of the same number of positions"
        w, f = c.get("shape_warmup", 0.4), c.get("shape_freeze", 0.7)
        return f"learned shape (relaxed to {w:g}, frozen at {f:g} of the shaping part)"

    series: dict[str, dict[float, list[float]]] = {}
    for r in runs:
        if r.final_acc is not None and r.final_active is not None:
            series.setdefault(series_name(r.config), {}).setdefault(round(r.final_active, 4), []).append(
                100 * r.final_acc)
    fig, ax = plt.subplots(figsize=(7.2, 4.6))
    markers = {"dense (all positions)": ("k", "*"), "magnitude pruning of the same number of positions": ("C3", "s")}
    others = iter([("C0", "o"), ("C2", "^"), ("C4", "D"), ("C1", "v")])
    few = False
    for name in sorted(series, key=lambda n: (n.startswith("dense"), n)):
        pts = series[name]
        colour, marker = markers.get(name) or next(others)
        xs = sorted(pts)
        means = [sum(pts[x]) / len(pts[x]) for x in xs]
        lo, hi = [], []
        for x, m in zip(xs, means):
            if len(pts[x]) >= 3:
                h = mean_ci(pts[x])[1]
                lo.append(h)
                hi.append(h)
            else:
                few = True
                lo.append(m - min(pts[x]))
                hi.append(max(pts[x]) - m)
        ax.errorbar(xs, means, yerr=[lo, hi], color=colour, marker=marker, ms=7, capsize=3, lw=1.5, label=name)
        for x in xs:
            ax.scatter([x] * len(pts[x]), pts[x], color=colour, s=12, alpha=0.5)
    ax.set(title="Accuracy vs fraction of active kernel positions",
           xlabel="fraction of active kernel positions (k / 9 per 3x3 NSL layer)", ylabel="final test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7.5, loc="lower right")
    datasets = sorted({str(r.config.get("dataset")) for r in runs})
    bars = "95% CI (3+ seeds) or range of the seeds (fewer)" if few else "95% CI over seeds"
    fig.suptitle(f"{', '.join(datasets)}: mean over seeds, bars {bars}, dots single runs", fontsize=9)
    return _save(fig, path)


def _variant_labels(runs: list[RunRecord], groups: list[list[int]]) -> list[str]:
    """``model / layer / dataset`` plus the config fields that differ between the groups."""
    varying = sorted({k for g in groups for k, v in runs[g[0]].config.items()
                      if k not in _NOT_A_VARIANT and k not in ("model", "layer", "dataset") and
                      any(runs[h[0]].config.get(k) != v for h in groups)})
    labels = []
    for g in groups:
        c = runs[g[0]].config
        # the other shape_* settings mean nothing without a kernel shape
        learned_only = ("shape_warmup", "shape_freeze", "shape_weight", "shape_lr")
        keys = [k for k in varying if (c.get("shape_active") or not k.startswith("shape_") or k == "shape_active")
                and not (c.get("shape_method") == "magnitude" and k in learned_only)]
        extra = ", ".join(f"{k}={c.get(k)}" for k in keys)
        labels.append(f"{c.get('model')} / {c.get('layer')} / {c.get('dataset')}" + (f" ({extra})" if extra else ""))
    return labels


def report_rows(runs: list[RunRecord]) -> list[dict]:
    """One table row per run: its settings, parameters and MACs (built from its config; a model that cannot be
    built is warned about and gets no MACs), accuracies, wall time, iterations and s / step."""
    rows = []
    for r in runs:
        built = None
        try:
            built = _model_of(r)
        except Exception as e:  # an unknown model in an old config: report without params/MACs
            print(f"nsl report: warning: cannot build the model of {r.path} ({e}); params and MACs omitted",
                  file=sys.stderr)
        params = r.params
        macs = None
        if built is not None:
            from .models import count_parameters

            model, shape = built
            params = params if params is not None else count_parameters(model)
            macs = count_macs(model, shape)
        rows.append(dict(run=r.name, model=r.config.get("model"), layer=r.config.get("layer"),
                         dataset=r.config.get("dataset"), seed=r.config.get("seed"), params=params, macs=macs,
                         final_acc=r.final_acc, best_acc=r.best_acc, seconds=r.wall_time, iters=r.iterations,
                         s_per_step=_per_step(r.wall_time, r.iterations), active=r.final_active))
    return rows


def _figures(runs: list[RunRecord], groups: list[list[int]], labels: dict, seed_groups: list, out: Path) -> dict:
    """The report's figures in ``out``: ``{"curves": path, "accuracy": path or None, "shape_curve": path or None}``."""
    accuracy = None
    if len(groups) > 1 or seed_groups:
        accuracy = plot_accuracy_by_variant(runs, groups, _short_labels(runs, groups, [labels[id(g)] for g in groups]),
                                            out / "accuracy.png")
    return {"curves": plot_curves(runs, out / "curves.png"), "accuracy": accuracy,
            "shape_curve": plot_shape_curve(runs, out / "shape_curve.png")}


def _markdown(rows: list[dict], seed_groups: list[list[int]], labels: dict, paired: list[dict],
              selector: dict | None, figures: dict) -> str:
    """``report.md``: the run table, the seed-spread table, the paired table and the figures."""
    lines = ["# Training report", "",
             f"{len(rows)} run(s). Accuracies are on the run's test set (`test_subset` in its config.json if "
             "set). MACs: multiply-adds per image for one forward pass, counted with forward hooks on every "
             "convolution and linear layer (static NSL: as its folded convolution; dynamic NSL: the "
             "convolution, plus the predictor's convolutions (SphereConv: with its patch norm, C_in x k x k "
             "per location), plus the modulation of every input patch by "
             "M(y), C_in x P (diagonal) or C_in x P x P (full) per output location; batch norm, activations "
             "and pooling not counted). Wall time: training seconds recorded in metrics.jsonl "
             "(including evaluations); s / step: wall time / iterations (measured on whatever else the machine "
             "was running).", "",
             "| run | model | layer kind | dataset | seed | params | MACs / image | final test acc | best test acc "
             "| wall time | iterations | s / step |",
             "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['run']} | {row['model']} | {row['layer']} | {row['dataset']} | {row['seed']} | "
                     f"{'n/a' if row['params'] is None else format(row['params'], ',')} | {_fmt_int(row['macs'])} | "
                     f"{_pct(row['final_acc'])} | "
                     f"{_pct(row['best_acc'])} | {_secs(row['seconds'])} | {row['iters']} | "
                     f"{'n/a' if row['s_per_step'] is None else format(row['s_per_step'], '.3f')} |")
    if seed_groups:
        lines += ["", "## Runs that differ only by seed", "",
                  "Mean +- half-width of the 95% confidence interval of the mean (Student t, n - 1 degrees of "
                  "freedom) over the seeds of each variant.", "",
                  "| variant (model / layer kind / dataset) | seeds | runs | final test acc | best test acc "
                  "| wall time | s / step |",
                  "|---|---|---|---:|---:|---:|---:|"]
        for g in seed_groups:

            def stat(key, scale=100.0, unit="%", g=g):
                vals = [rows[i][key] for i in g if rows[i][key] is not None]
                if not vals:
                    return "n/a"
                m, h = mean_ci(vals)
                return f"{scale * m:.2f} +- {scale * h:.2f}{unit}"

            lines.append(f"| {labels[id(g)]} | "
                         f"{', '.join(str(rows[i]['seed']) for i in g)} | {', '.join(rows[i]['run'] for i in g)} | "
                         f"{stat('final_acc')} | {stat('best_acc')} | {stat('seconds', 1.0, ' s')} | "
                         f"{stat('s_per_step', 1.0, '')} |")
    if selector is not None:
        shown = ", ".join(f"{k}={v}" for k, v in selector.items())
        lines += ["", f"## Paired by seed against the baseline ({shown})", "",
                  "Final test accuracy minus the baseline's final test accuracy for the same seed (same data "
                  "order and augmentation), mean +- half-width of the 95% confidence interval (Student t, n - 1 "
                  "degrees of freedom; n/a for one seed). With few seeds the interval is wide: read the "
                  "per-seed differences too.", "",
                  "| variant | seeds | per-seed difference (points) | mean difference | better in |",
                  "|---|---|---|---:|---:|"]
        for p in paired:
            ci = "n/a" if math.isnan(p["ci95"]) else f"{100 * p['ci95']:.2f}"
            lines.append(f"| {labels[id(p['group'])]} | {', '.join(map(str, p['seeds']))} | "
                         f"{', '.join(f'{100 * d:+.2f}' for d in p['diffs'])} | {100 * p['mean']:+.2f} +- {ci} | "
                         f"{p['wins']} of {len(p['diffs'])} |")
    lines += ["", "## Learning curves", "",
              f"![training loss and test accuracy against the step]({figures['curves'].name})", ""]
    if figures["accuracy"] is not None:
        lines += ["## Final test accuracy per variant", "",
                  f"![final test accuracy per variant, every seed a point]({figures['accuracy'].name})", ""]
    if figures["shape_curve"] is not None:
        lines += ["## Kernel shape", "", f"![accuracy against the fraction of active kernel positions]"
                  f"({figures['shape_curve'].name})", ""]
    return "\n".join(lines)


def write_report(run_dirs: list[str | Path], out: str | Path, baseline: str | None = None) -> dict:
    """Write ``out/report.md`` and ``out/curves.png`` for ``run_dirs`` (``out/accuracy.png`` for more than
    one variant or seed, ``out/shape_curve.png`` when runs learned kernel shapes); returns their paths
    and rows.

    ``baseline``: ``"KEY=VALUE[,...]"`` selecting one variant (e.g. ``"layer=conv"``): every other
    variant is compared with it seed by seed (:func:`paired_differences`)."""
    from .train.rundir import write_atomically

    selector = parse_baseline(baseline) if baseline is not None else None
    runs = [load_run(p) for p in run_dirs]
    names = [r.name for r in runs]
    if len(set(names)) != len(names):  # two runs called "seed0" in different folders
        for r in runs:
            r.name = f"{r.path.parent.name}/{r.path.name}"
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise RunError(f"--out {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    rows = report_rows(runs)
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(runs):
        groups.setdefault(r.variant_key(), []).append(i)
    all_groups = list(groups.values())
    labels = dict(zip(map(id, all_groups), _variant_labels(runs, all_groups)))
    seed_groups = [g for g in all_groups if len(g) > 1]
    paired = paired_differences(runs, all_groups, selector) if selector is not None else []
    figures = _figures(runs, all_groups, labels, seed_groups, out)
    md = out / "report.md"
    text = _markdown(rows, seed_groups, labels, paired, selector, figures)
    write_atomically(md, lambda f: f.write(text))
    return {"report": str(md), "curves": str(figures["curves"]), "rows": rows, "seed_groups": len(seed_groups),
            "paired": [{k: v for k, v in p.items() if k != "group"} | {"variant": labels[id(p["group"])]}
                       for p in paired],
            **{k: str(figures[k]) for k in ("accuracy", "shape_curve") if figures[k] is not None}}


# -- command line --------------------------------------------------------------------------------
def _cli(args: argparse.Namespace) -> int:
    try:
        res = write_report(args.run_dirs, args.out, baseline=args.baseline)
    except RunError as e:
        print(f"nsl report: error: {e}", file=sys.stderr)
        return 2
    print(res["report"])
    print(res["curves"])
    if "accuracy" in res:
        print(res["accuracy"])
    if "shape_curve" in res:
        print(res["shape_curve"])
    return 0


def add_parser(sub) -> None:
    """Add ``nsl report`` to the subcommands ``sub`` of the ``nsl`` parser."""
    p = sub.add_parser("report", help="markdown table and learning curves of training runs",
                       description="Summarise runs written by `nsl train`: OUT/report.md (model, layer kind, "
                                   "dataset, params, MACs per image, final/best test accuracy, wall time, "
                                   "iterations, s / step; seeds of one variant grouped as mean +- 95% CI), "
                                   "OUT/curves.png and, for several variants or seeds, OUT/accuracy.png "
                                   "(final accuracy per variant, each seed a point).")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories (config.json + metrics.jsonl)")
    p.add_argument("--out", default="report", help="output folder (default ./report)")
    p.add_argument("--baseline", metavar="KEY=VALUE[,KEY=VALUE]", help="compare every variant with this one, seed "
                   "by seed (config fields, e.g. layer=conv or shape_active=0)")
    p.set_defaults(func=_cli)
