"""Training images/s of CNN-9: our input pipeline vs a plain DataLoader, same data and model.

For each layer kind (``--layers``; default ``conv,static-full,dynamic-diagonal``) it trains CNN-9
(``nsl.models.build_model('cnn9', layer, num_classes=10)``, SGD with momentum, cross-entropy) from
the same initial weights in two pipelines over the same images, in one run:

* ``ours``: :class:`nsl.data.GPULoader` holding the uint8 images on ``--device`` and producing
  augmented batches (zero-pad 4 random crop + horizontal flip, raw 0..255 float input) with one
  gather per batch;
* ``dataloader``: a plain ``torch.utils.data.DataLoader`` (``--workers`` processes, default 2 on
  the CPU) over a Dataset that pads, crops and flips each image in Python, then collates, copies
  the batch to ``--device`` and feeds the same training step.

Each pipeline runs ``--warmup`` steps, then ``--repeat`` rounds of ``--steps`` timed steps
(batch ``--batch-size``); images/s is from the fastest round. The ``ratio`` column is ours over
DataLoader. Data: the CIFAR-10 training split found under ``--data-dir`` (``--subset`` images
drawn with seed 0).
Writes JSON to ``--out``.

    python benchmarks/train_throughput.py --data-dir ~/.cache/nsl-test-data [--layers conv,static-full]
        [--device cpu|cuda] [--steps 10] [--warmup 3] [--subset 2048] [--workers 2] [--channels-last]
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, environment, print_table, write_json  # noqa: E402

sys.path.insert(0, str(ROOT / "src"))
from nsl.data import get_dataset  # noqa: E402
from nsl.data.tensor_data import GPULoader, TensorImageDataset  # noqa: E402
from nsl.layers import LAYER_KINDS  # noqa: E402
from nsl.models import build_model  # noqa: E402

DEFAULT_LAYERS = "conv,static-full,dynamic-diagonal"


class PerImageCropFlip(torch.utils.data.Dataset):
    """The usual per-sample transform: zero-pad, random crop, random horizontal flip, to float."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, padding: int = 4):
        self.images, self.labels, self.padding = images, labels, padding

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        img = self.images[i]  # uint8 [C, H, W]
        _, h, w = img.shape
        p = self.padding
        padded = F.pad(img, (p, p, p, p))
        y, x = (int(v) for v in torch.randint(0, 2 * p + 1, (2,)))
        out = padded[:, y:y + h, x:x + w]
        if torch.rand(()) < 0.5:
            out = out.flip(-1)
        return out.float(), self.labels[i]  # raw 0..255, as ours


def load_images(data_dir: str, subset: int) -> tuple[TensorImageDataset, str]:
    """``subset`` CIFAR-10 training images (a seeded random sample) on the CPU."""
    ds = get_dataset("cifar10", Path(data_dir).expanduser(), "train")
    if subset and subset < len(ds):  # a seeded random subset: a file may be sorted by class
        ds = ds.subset(torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[:subset])
    return ds, "cifar10"


def endless(loader):
    """Batches of ``loader`` across epochs, forever."""
    while True:
        yield from loader


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(layer: str, pipeline: str, ds: TensorImageDataset, init_state: dict, args,
            device: torch.device) -> dict:
    """Warm up, then time ``args.repeat`` rounds of ``args.steps`` training steps; return a table row."""
    mf = torch.channels_last if args.channels_last else torch.contiguous_format
    model = build_model("cnn9", layer, num_classes=10)
    model.load_state_dict(init_state)
    model = model.to(device, memory_format=mf).train()
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)

    dl = None
    if pipeline == "ours":
        loader = GPULoader(ds, args.batch_size, shuffle=True, drop_last=True, augment=True, padding=4, flip=True,
                           output="raw", channels_last=args.channels_last, device=device, seed=0)
        batches = endless(loader)
    else:
        dl = torch.utils.data.DataLoader(
            PerImageCropFlip(ds.images, ds.labels), batch_size=args.batch_size, shuffle=True, drop_last=True,
            num_workers=args.workers, pin_memory=device.type == "cuda", persistent_workers=args.workers > 0)

        def to_device(it):
            for x, y in it:
                x = x.to(device, non_blocking=True)
                if args.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                yield x, y.to(device, non_blocking=True)

        batches = to_device(endless(dl))

    loss = torch.zeros(())

    def step():
        nonlocal loss
        x, y = next(batches)
        out = model(x)
        loss = F.cross_entropy(out.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(args.warmup):
        step()
    sync(device)
    best = float("inf")
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    final_loss = float(loss.detach())
    batches.close()  # the DataLoader (and its workers) go when this function returns
    return {"layer": layer, "pipeline": pipeline, "images_per_s": args.steps * args.batch_size / best,
            "seconds": best, "loss": final_loss}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", default=DEFAULT_LAYERS,
                    help=f"comma-separated layer kinds of {', '.join(LAYER_KINDS)} (default: {DEFAULT_LAYERS})")
    ap.add_argument("--data-dir", required=True, help="folder holding CIFAR-10 (python or binary layout)")
    ap.add_argument("--subset", type=int, default=2048, help="training images used (default 2048)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per round (default 10)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    ap.add_argument("--repeat", type=int, default=1, help="timed rounds; the fastest counts (default 1)")
    ap.add_argument("--workers", type=int, default=None,
                    help="DataLoader worker processes (default 2 on cpu, min(8, cpus) on cuda)")
    ap.add_argument("--channels-last", action="store_true", help="channels_last model and input")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in the main process")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "train_throughput.json"))
    args = ap.parse_args(argv)

    layers = [s.strip() for s in args.layers.split(",") if s.strip()]
    bad = [k for k in layers if k not in LAYER_KINDS]
    if bad or not layers:
        ap.error(f"unknown layer kind(s) {', '.join(bad) or '(none)'}; valid: {', '.join(LAYER_KINDS)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda requested but CUDA is not available")
    if args.workers is None:
        args.workers = 2 if args.device == "cpu" else min(8, os.cpu_count() or 1)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    ds, source = load_images(args.data_dir, args.subset)
    if len(ds) < args.batch_size:
        ap.error(f"--subset {len(ds)} is smaller than --batch-size {args.batch_size}")
    print(f"data: {source}, {len(ds)} images; device {device}; batch {args.batch_size}; warm-up {args.warmup}, "
          f"{args.repeat} x {args.steps} timed steps; DataLoader workers {args.workers}; "
          f"channels_last {args.channels_last}", flush=True)

    rows = []
    for layer in layers:
        torch.manual_seed(0)
        init_state = copy.deepcopy(build_model("cnn9", layer, num_classes=10).state_dict())
        pair = {}
        for pipeline in ("ours", "dataloader"):
            torch.manual_seed(1)
            pair[pipeline] = measure(layer, pipeline, ds, init_state, args, device)
            print(f"  {layer:24s} {pipeline:10s} {pair[pipeline]['images_per_s']:9.1f} img/s", flush=True)
        ratio = pair["ours"]["images_per_s"] / pair["dataloader"]["images_per_s"]
        for r in pair.values():
            r["ratio"] = ratio
            rows.append(r)

    print()
    print_table(rows, [("layer", "layer", "s"), ("pipeline", "pipeline", "s"), ("images_per_s", "img/s", ".1f"),
                       ("ratio", "ours/DataLoader", ".2f")])
    payload = {"benchmark": "train_throughput", "model": "cnn9", "data": source, "images": len(ds),
               "device": str(device), "args": vars(args), "environment": environment(), "results": rows}
    if device.type == "cuda":
        payload["environment"]["gpu"] = torch.cuda.get_device_name(device)
    write_json(Path(args.out), payload)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
