"""Benchmark the fused CPU kernel of dynamic NS convolution against nn.Conv2d and plain PyTorch.

For each shape (N, C -> C, H x W, k x k, padding k // 2) and each implementation:

* ``conv``        nn.Conv2d without bias (the lower bound: a dynamic layer does this and more);
* ``cpp-diag``    ``nsl._cpp.dynamic_ns_conv2d`` with a diagonal ``m [N, P, H, W]``;
* ``cpp-full``    the same with a full ``M [N, P, P, H, W]``;
* ``torch-diag``  / ``torch-full``: plain PyTorch, ``F.unfold`` + einsum with autograd.

it reports forward + backward time (all three gradients; min over ``--repeat`` rounds after
warm-up, the rounds interleaving the implementations so that load from elsewhere hits all alike),
the ratio to ``conv`` measured in the same run, the bytes autograd saves for backward
(``saved_tensors_hooks``, unique storages; for the kernel these are its inputs x, W and m) and,
unless ``--no-rss``, the peak resident-memory increase of one forward + backward measured in a
fresh subprocess (peak RSS minus RSS before; this also sees the kernel's own malloc'd workspaces,
which the torch profiler would not).

    python benchmarks/dynamic_kernel.py [--threads 2] [--out benchmarks/results/dynamic_kernel.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, rss_child, rss_delta, saved_bytes, time_cases  # noqa: E402

sys.path.insert(0, str(ROOT / "src"))

from nsl import _cpp  # noqa: E402

SHAPES = [  # (N, C, H, k)
    (64, 32, 32, 3),
    (64, 64, 16, 3),
    (128, 128, 8, 3),
    (64, 32, 32, 5),
]
IMPLS = ["conv", "cpp-diag", "cpp-full", "torch-diag", "torch-full"]


def torch_dynamic(x, weight, sim, padding):
    """Plain PyTorch dynamic NS conv (stride 1): unfold, modulate, one contraction with W.

    Full M: a batched (P x P) @ (P x C) matmul per location (3-5x faster here than an einsum or a
    loop over q)."""
    n, c, h, w = x.shape
    c_out, _, kh, kw = weight.shape
    p, l = kh * kw, h * w
    cols = F.unfold(x, (kh, kw), padding=padding).view(n, c, p, l)
    if sim.dim() == 4:
        mod = cols * sim.reshape(n, 1, p, l)
        return torch.einsum("ocp,ncpl->nol", weight.reshape(c_out, c, p), mod).view(n, c_out, h, w)
    m = sim.reshape(n, p, p, l).permute(0, 3, 1, 2)  # [n, l, p, q]
    mod = torch.matmul(m, cols.permute(0, 3, 2, 1))  # [n, l, p, c]
    w2 = weight.reshape(c_out, c, p).permute(0, 2, 1).reshape(c_out, p * c)
    return (mod.reshape(n, l, p * c) @ w2.t()).permute(0, 2, 1).reshape(n, c_out, h, w)


def make_case(impl: str, shape, seed: int = 0):
    """Return a closure running one forward + backward, and the leaf tensors it uses."""
    n, c, h, k = shape
    p, pad = k * k, k // 2
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, h, generator=gen).requires_grad_(True)
    gout = torch.randn(n, c, h, h, generator=gen)
    if impl == "conv":
        conv = torch.nn.Conv2d(c, c, k, padding=pad, bias=False)

        def run():
            conv(x).backward(gout)

        return run
    weight = (torch.randn(c, c, k, k, generator=gen) / (c * p) ** 0.5).requires_grad_(True)
    full = impl.endswith("full")
    if full:
        sim = torch.eye(p).reshape(1, p, p, 1, 1) + 0.1 * torch.randn(n, p, p, h, h, generator=gen)
    else:
        sim = 1 + 0.1 * torch.randn(n, p, h, h, generator=gen)
    sim.requires_grad_(True)
    if impl.startswith("cpp"):

        def run():
            _cpp.dynamic_ns_conv2d(x, weight, sim, (1, 1), (pad, pad), (1, 1), 1).backward(gout)

    else:

        def run():
            torch_dynamic(x, weight, sim, pad).backward(gout)

    return run


def rss_child_case(impl: str, shape) -> None:
    rss_child(make_case(impl, shape))


def rss_of(impl: str, shape, threads: int) -> int | None:
    return rss_delta([__file__, "--rss-child", impl, ",".join(map(str, shape)), "--threads", str(threads)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "dynamic_kernel.json"))
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--no-rss", action="store_true", help="skip the per-case subprocess memory runs")
    ap.add_argument("--no-torch", action="store_true", help="skip the (slow) plain-PyTorch rows")
    ap.add_argument("--shapes", default=None, help="e.g. '64,32,32,3;64,64,16,3' (N,C,H,k)")
    ap.add_argument("--rss-child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.rss_child:
        rss_child_case(args.rss_child[0], tuple(int(v) for v in args.rss_child[1].split(",")))
        return
    if not _cpp.is_available():
        sys.exit(f"nsl CPU kernel unavailable: {_cpp.unavailable_reason()}")
    shapes = SHAPES
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split(",")) for s in args.shapes.split(";")]
    impls = [i for i in IMPLS if not (args.no_torch and i.startswith("torch"))]
    threads = torch.get_num_threads()

    rows = []
    header = (f"{'N':>4} {'C':>4} {'HxW':>6} {'k':>2} {'impl':<11} {'fwd+bwd ms':>10} {'x conv':>7} "
              f"{'saved MiB':>9} {'peak RSS MiB':>12}")
    print(f"torch {torch.__version__}, {threads} threads, {platform.processor() or platform.machine()}")
    print(header)
    print("-" * len(header))
    for shape in shapes:
        n, c, h, k = shape
        times = time_cases({impl: make_case(impl, shape) for impl in impls}, args.repeat, args.warmup)
        conv_t = times["conv"]
        for impl in impls:
            t = times[impl]
            saved = saved_bytes(make_case(impl, shape))
            rss = None if args.no_rss else rss_of(impl, shape, threads)
            row = dict(N=n, C=c, H=h, W=h, k=k, impl=impl, ms=t * 1e3, ratio_vs_conv=t / conv_t,
                       saved_bytes=saved, peak_rss_delta_bytes=rss)
            rows.append(row)
            rss_s = "-" if rss is None else f"{rss / 2**20:.1f}"
            print(f"{n:>4} {c:>4} {f'{h}x{h}':>6} {k:>2} {impl:<11} {t * 1e3:>10.2f} {t / conv_t:>7.2f} "
                  f"{saved / 2**20:>9.1f} {rss_s:>12}", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(torch=torch.__version__, threads=threads, machine=platform.machine(),
                processor=platform.processor(), repeat=args.repeat, warmup=args.warmup,
                timing="min over repeats of forward + backward (all three gradients)")
    out.write_text(json.dumps(dict(meta=meta, rows=rows), indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
