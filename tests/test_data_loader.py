"""Tests of nsl.data's batched crop/flip augmentation and GPULoader (outputs, determinism, shards, resumable
state, CUDA) on real CIFAR-10 and scikit-learn digits, and on synthetic coordinate images."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F

from nsl.data import (
    CIFAR10_CLASSES,
    GPULoader,
    TensorImageDataset,
    dataset_info,
    random_crop_flip,
)


def _reference_crop_flip(x, oy, ox, flips, p, mode):
    pad = F.pad(x.float(), (p, p, p, p), mode={"zeros": "constant"}.get(mode, mode))
    h, w = x.shape[-2:]
    out = [pad[b, :, oy[b]:oy[b] + h, ox[b]:ox[b] + w] for b in range(len(x))]
    return torch.stack([o.flip(-1) if f else o for o, f in zip(out, flips.tolist(), strict=True)])


@pytest.mark.parametrize("mode", ["zeros", "reflect", "replicate"])
def test_random_crop_flip_matches_pad_then_crop(cifar, mode):
    x = cifar("cifar10", "test")[0][:64]
    g = torch.Generator().manual_seed(1)
    oy, ox = torch.randint(0, 9, (64,), generator=g), torch.randint(0, 9, (64,), generator=g)
    flips = torch.rand(64, generator=g) < 0.5
    out = random_crop_flip(x, oy, ox, flips, 4, mode)
    assert out.dtype == torch.uint8
    assert torch.equal(out.float(), _reference_crop_flip(x, oy, ox, flips, 4, mode))
    # a known offset: (4, 4) without flip is the identity, (0, 8) shifts by 4 rows down / 4 columns left
    z = torch.zeros(2, dtype=torch.long)
    assert torch.equal(random_crop_flip(x[:2], z + 4, z + 4, z.bool(), 4, mode), x[:2])
    shifted = random_crop_flip(x[:2], z, z + 8, z.bool(), 4, mode)
    assert torch.equal(shifted[:, :, 4:, :28], x[:2, :, :28, 4:])
    if mode == "zeros":
        assert int(shifted[:, :, :4].abs().sum()) == 0 and int(shifted[:, :, :, 28:].abs().sum()) == 0
    # gathering through an index (the loader's path), and from a non-contiguous source
    idx = torch.tensor([5, 1, 5])
    ref = random_crop_flip(x[idx], oy[:3], ox[:3], flips[:3], 4, mode)
    assert torch.equal(random_crop_flip(x, oy[:3], ox[:3], flips[:3], 4, mode, index=idx), ref)
    nc = x.permute(0, 1, 3, 2).contiguous().permute(0, 1, 3, 2)
    assert torch.equal(random_crop_flip(nc, oy[:3], ox[:3], flips[:3], 4, mode, index=idx), ref)


def _coordinate_images(n, h=32, w=32):
    """Images whose channel 0 holds row + 1 and channel 1 column + 1 (0 only on padding)."""
    rows = torch.arange(1, h + 1, dtype=torch.uint8)[:, None].expand(h, w)
    cols = torch.arange(1, w + 1, dtype=torch.uint8)[None, :].expand(h, w)
    img = torch.stack([rows, cols, torch.full((h, w), 7, dtype=torch.uint8)])
    return img.expand(n, 3, h, w).contiguous(), torch.arange(n)


def test_loader_augmentation_offsets_and_flips():
    x, y = _coordinate_images(4000)
    loader = GPULoader((x, y), 500, augment=True, padding=4, seed=0)
    offsets, flips, seen = [], [], []
    for xb, yb in loader:
        assert xb.dtype == torch.float32 and xb.shape == (500, 3, 32, 32)
        seen.append(yb)
        r, c = xb[:, 0].long(), xb[:, 1].long()
        # the window's centre pixel (16, 16) always lies inside the image for padding 4
        oy = r[:, 16, 16] - 1 - 16 + 4
        fl = c[:, 16, 17] < c[:, 16, 16]
        ox = torch.where(fl, c[:, 16, 16] - 1 - (31 - 16), c[:, 16, 16] - 1 - 16) + 4
        assert int(oy.min()) >= 0 and int(oy.max()) <= 8 and int(ox.min()) >= 0 and int(ox.max()) <= 8
        exp = _reference_crop_flip(x[yb], oy, ox, fl, 4, "zeros")
        assert torch.equal(xb, exp)
        offsets.append(torch.stack([oy, ox], 1))
        flips.append(fl)
    assert torch.equal(torch.sort(torch.cat(seen))[0], y)  # one epoch covers every sample once
    offsets, flips = torch.cat(offsets), torch.cat(flips)
    assert abs(flips.float().mean().item() - 0.5) < 0.03
    counts = torch.bincount(offsets[:, 0] * 9 + offsets[:, 1], minlength=81)
    assert int(counts.min()) > 0 and int(counts.sum()) == 4000
    assert int(counts.max()) < 3 * 4000 / 81  # every offset pair drawn, none dominating
    # reflect padding never shows a zero, augment=False is the identity
    xb, _ = next(iter(GPULoader((x, y), 256, augment=True, padding_mode="reflect")))
    assert bool((xb[:, :2] > 0).all())
    xb, yb = next(iter(GPULoader((x, y), 256, shuffle=False)))
    assert torch.equal(xb, x[:256].float()) and torch.equal(yb, y[:256])


def test_loader_outputs_and_determinism(cifar):
    x, y = cifar("cifar10", "test")
    ds = TensorImageDataset(x, y, CIFAR10_CLASSES, "cifar10")
    info = dataset_info("cifar10")
    norm = GPULoader(ds, 2000, augment=False, output="normalize", mean=info.mean, std=info.std)
    xb, _ = next(iter(norm))
    assert abs(float(xb.mean())) < 0.1 and abs(float(xb.std()) - 1) < 0.1
    unit, _ = next(iter(GPULoader(ds, 64, output="unit", channels_last=True, dtype=torch.float64)))
    assert unit.dtype == torch.float64 and 0 <= float(unit.min()) and float(unit.max()) <= 1
    assert unit.is_contiguous(memory_format=torch.channels_last)
    raw, _ = next(iter(GPULoader(ds, 64, augment=True)))
    assert float(raw.max()) > 200  # raw pixels 0..255 (the NSL paper's CIFAR protocol)

    def epoch(seed):
        return [(a.clone(), b.clone()) for a, b in GPULoader(ds, 1000, augment=True, seed=seed)]

    e1, e2, e3 = epoch(0), epoch(0), epoch(1)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(e1, e2, strict=True))
    assert not torch.equal(e1[0][1], e3[0][1])
    # two epochs differ in order; drop_last
    loader = GPULoader(ds, 3000, seed=0)
    first = torch.cat([b for _, b in loader])
    second = torch.cat([b for _, b in loader])
    assert loader.epoch == 2 and len(first) == len(second) == 10000 and not torch.equal(first, second)
    loader = GPULoader(ds, 3000, drop_last=True)
    assert len(loader) == 3 and [len(b) for _, b in loader] == [3000] * 3
    assert [len(b) for _, b in GPULoader(ds, 3000)] == [3000, 3000, 3000, 1000]


@pytest.mark.parametrize("n,world", [(1000, 3), (999, 3), (10, 4)])
def test_loader_shards_disjoint_and_covering(n, world):
    x, y = _coordinate_images(n, 8, 8)
    for epoch in range(2):
        seen = []
        for rank in range(world):
            loader = GPULoader((x, y), 7, seed=5, rank=rank, world_size=world)
            loader.set_epoch(epoch)
            labels = torch.cat([b for _, b in loader])
            assert len(labels) == n // world
            assert torch.equal(labels, loader.epoch_indices(epoch))
            seen.append(labels)
        allseen = torch.cat(seen)
        assert len(torch.unique(allseen)) == len(allseen) == n - n % world
        # even_shards=False (evaluation) keeps every sample
        ev = [torch.cat([b for _, b in GPULoader((x, y), 7, shuffle=False, rank=r, world_size=world)])
              for r in range(world)]
        assert torch.equal(torch.sort(torch.cat(ev))[0], y)
    with pytest.raises(ValueError, match="rank"):
        GPULoader((x, y), 7, rank=world, world_size=world)


def test_loader_state_save_restore_continues_identically(digits28):
    x, y = digits28
    kw = dict(augment=True, padding=3, seed=11, rank=1, world_size=2, output="unit")
    a = GPULoader((x, y), 64, **kw)
    it = iter(a)
    for _ in range(5):
        next(it)  # part of epoch 0
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    expected = [next(it) for _ in range(len(a) - 5)]  # rest of epoch 0
    expected += list(a)  # epoch 1
    b = GPULoader((x, y), 64, **kw)
    buf.seek(0)
    b.load_state_dict(torch.load(buf, weights_only=True))
    assert (b.epoch, b.position) == (0, 5)
    got = list(b) + list(b)
    assert len(got) == len(expected)
    for p, q in zip(got, expected, strict=True):
        assert torch.equal(p[0], q[0]) and torch.equal(p[1], q[1])
    with pytest.raises(ValueError, match="seed=11"):
        GPULoader((x, y), 64, **{**kw, "seed": 12}).load_state_dict(a.state_dict())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_loader_same_batches_on_cuda(digits28):
    x, y = digits28
    kw = dict(augment=True, padding=4, padding_mode="reflect", seed=3, output="normalize", channels_last=True)
    cpu = list(GPULoader((x, y), 128, **kw))
    gpu = list(GPULoader((x, y), 128, device="cuda", **kw))
    assert gpu[0][0].device.type == "cuda"
    for (a, b), (c, d) in zip(cpu, gpu, strict=True):
        assert torch.allclose(a, c.cpu(), atol=1e-6) and torch.equal(b, d.cpu())
