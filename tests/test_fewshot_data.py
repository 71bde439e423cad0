"""Few-shot data layer: episode sampling, CIFAR-FS / FC100 / Omniglot / mini-ImageNet loaders."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import nsl
from nsl.data.cifar import cifar_class_names, load_cifar
from nsl.data.errors import DatasetError
from nsl.fewshot import (
    EpisodeSampler,
    FewShotDataset,
    get_fewshot_dataset,
    load_mini_imagenet,
    load_omniglot,
    load_split_definition,
    make_episode,
    with_rotations,
)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


# ------------------------------------------------------------------------------------------- sampler

def _toy_labels(n_classes=12, lo=30, hi=45, seed=0):
    """Shuffled int64 labels with uneven class sizes."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(lo, hi + 1, (n_classes,), generator=g)
    labels = torch.repeat_interleave(torch.arange(n_classes), counts)
    return labels[torch.randperm(len(labels), generator=g)]


@pytest.mark.parametrize("n_way,k_shot,n_query", [(5, 1, 15), (5, 5, 10), (12, 2, 3), (1, 1, 0)])
def test_sampler_invariants(n_way, k_shot, n_query):
    labels = _toy_labels()
    sampler = EpisodeSampler(labels, n_way, k_shot, n_query, n_episodes=50, seed=3)
    assert len(sampler) == 50
    episodes = list(sampler)
    assert len(episodes) == 50
    for ep in episodes:
        assert ep.support.dtype == ep.query.dtype == ep.classes.dtype == torch.int64
        assert ep.support.shape == (n_way * k_shot,) and ep.query.shape == (n_way * n_query,)
        assert ep.classes.shape == (n_way,) and len(set(ep.classes.tolist())) == n_way  # distinct classes
        both = torch.cat([ep.support, ep.query]).tolist()
        assert len(set(both)) == len(both)  # no image twice, support and query disjoint
        # class-major: image j of the support belongs to classes[j // k_shot]
        assert torch.equal(labels[ep.support], ep.classes.repeat_interleave(k_shot))
        assert torch.equal(labels[ep.query], ep.classes.repeat_interleave(n_query))
    # every class gets drawn over 50 episodes
    assert set(torch.cat([ep.classes for ep in episodes]).tolist()) == set(range(12))


def test_sampler_deterministic_per_seed_and_index():
    labels = _toy_labels()
    a = EpisodeSampler(labels, 5, 1, 15, n_episodes=20, seed=7)
    b = EpisodeSampler(labels, 5, 1, 15, n_episodes=1000, seed=7)  # length does not matter
    late_first = b.episode(13)  # drawn out of order, before any other
    for ea, eb in zip(a, b, strict=False):
        assert all(torch.equal(x, y) for x, y in zip(ea, eb, strict=True))
    assert all(torch.equal(x, y) for x, y in zip(a.episode(13), late_first, strict=True))
    assert all(torch.equal(x, y) for x, y in zip(list(a)[13], late_first, strict=True))
    # different seeds (and different indices) give different episodes
    c = EpisodeSampler(labels, 5, 1, 15, n_episodes=20, seed=8)
    same = [torch.equal(x.support, y.support) for x, y in zip(a, c, strict=True)]
    assert not any(same)
    assert not torch.equal(a.episode(0).support, a.episode(1).support)
    # the generator of (seed, i) does not collide with that of (seed + 1, i - 1) etc.
    assert not torch.equal(EpisodeSampler(labels, 5, 1, 15, 1, seed=0).episode(1).support,
                           EpisodeSampler(labels, 5, 1, 15, 1, seed=1).episode(0).support)


def test_make_episode_shapes_scaling_and_labels():
    labels = _toy_labels(n_classes=6, lo=10, hi=12)
    images = torch.randint(0, 256, (len(labels), 3, 8, 6), dtype=torch.uint8)
    ep = EpisodeSampler(labels, 4, 2, 3, n_episodes=1, seed=0).episode(0)
    xs, ys, xq, yq = make_episode(images, ep)
    assert xs.shape == (8, 3, 8, 6) and xq.shape == (12, 3, 8, 6)
    assert xs.dtype == xq.dtype == torch.float32 and ys.dtype == yq.dtype == torch.int64
    assert ys.tolist() == [0, 0, 1, 1, 2, 2, 3, 3] and yq.tolist() == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3
    torch.testing.assert_close(xs, images[ep.support].float() / 255)
    torch.testing.assert_close(xq, images[ep.query].float() / 255)
    # the episode labels point back at the dataset classes
    assert torch.equal(ep.classes[ys], labels[ep.support]) and torch.equal(ep.classes[yq], labels[ep.query])
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    xs2, _, xq2, _ = make_episode(images, ep, mean=mean, std=std, dtype=torch.float64)
    ref = (images[ep.query].double() / 255 - torch.tensor(mean, dtype=torch.float64).view(1, 3, 1, 1)) \
        / torch.tensor(std, dtype=torch.float64).view(1, 3, 1, 1)
    assert xq2.dtype == torch.float64
    torch.testing.assert_close(xq2, ref)
    raw, _, _, _ = make_episode(images, ep, scale=False)
    torch.testing.assert_close(raw, images[ep.support].float())
    with pytest.raises(ValueError, match="mean has 2 values, images have 3 channels"):
        make_episode(images, ep, mean=(0.1, 0.2))


def test_make_episode_on_accelerator_if_present():
    device = "cuda" if torch.cuda.is_available() else None
    if device is None:
        pytest.skip("no CUDA device")
    labels = _toy_labels(n_classes=6, lo=10, hi=12)
    images = torch.randint(0, 256, (len(labels), 1, 5, 5), dtype=torch.uint8)
    ep = EpisodeSampler(labels, 3, 1, 2, 1, seed=0).episode(0)
    xs, ys, xq, yq = make_episode(images.to(device), ep)
    assert xs.is_cuda and ys.is_cuda and xq.is_cuda and yq.is_cuda
    torch.testing.assert_close(xs.cpu(), images[ep.support].float() / 255)


def test_sampler_bad_inputs():
    labels = torch.repeat_interleave(torch.arange(5), torch.tensor([30, 30, 30, 20, 30]))
    with pytest.raises(ValueError,
                       match=r"class 3 has 20 images, an episode needs 1 shot \+ 25 queries = 26"):
        EpisodeSampler(labels, 5, 1, 25, n_episodes=10, seed=0)
    with pytest.raises(ValueError, match=r"an episode needs 5 shots \+ 1 query = 6"):
        EpisodeSampler(torch.tensor([0] * 5 + [1] * 9), 2, 5, 1, n_episodes=10, seed=0)
    with pytest.raises(ValueError, match=r"n_way=6 exceeds the number of classes in labels \(5\)"):
        EpisodeSampler(labels, 6, 1, 1, n_episodes=10, seed=0)
    with pytest.raises(ValueError, match="k_shot must be >= 1"):
        EpisodeSampler(labels, 5, 0, 1, n_episodes=10, seed=0)
    with pytest.raises(ValueError, match="1-D integer tensor"):
        EpisodeSampler(labels.float(), 5, 1, 1, n_episodes=10, seed=0)


# ------------------------------------------------------------------------------------ CIFAR-FS / FC100

@pytest.fixture(scope="module")
def cifar_splits(data_root):
    return {(name, split): get_fewshot_dataset(name, data_root, split)
            for name in ("cifar-fs", "fc100") for split in ("train", "val", "test")}


def test_packaged_split_definitions_match_shared_copies():
    for name in ("cifar_fs", "fc100"):
        packaged = load_split_definition(name)
        shared = SHARED / f"{name}_split.json"
        if shared.exists():
            assert packaged == json.loads(shared.read_text())
        assert set(packaged) >= {"train", "val", "test"}


def _damage(path, how: str) -> None:
    if how == "missing":
        path.unlink()
    elif how == "truncated":
        path.write_bytes(path.read_bytes()[:200])
    elif how == "empty split":
        d = json.loads(path.read_text())
        d["val"] = []
        path.write_text(json.dumps(d))
    elif how == "class in two splits":
        d = json.loads(path.read_text())
        d["test"][0] = d["train"][0]
        path.write_text(json.dumps(d))


@pytest.mark.parametrize("name,how", [("cifar-fs", "missing"), ("cifar-fs", "truncated"), ("fc100", "empty split"),
                                      ("fc100", "class in two splits")])
def test_a_damaged_packaged_split_file_is_named_in_one_line(data_root, tmp_path, name, how):
    # a real copy of the installed package with its split file damaged, used by a real `nsl fewshot train`
    pkg = tmp_path / "site" / "nsl"
    shutil.copytree(Path(nsl.__file__).parent, pkg, ignore=shutil.ignore_patterns("__pycache__"))
    split_file = pkg / "fewshot" / "splits" / f"{name.replace('-', '_')}_split.json"
    _damage(split_file, how)
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    proc = subprocess.run([sys.executable, "-m", "nsl.cli", "fewshot", "train", "--dataset", name, "--data-dir",
                           str(data_root), "--out", str(tmp_path / "run"), "--episodes", "1", "--no-progress"],
                          capture_output=True, text=True, env=env, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"nsl fewshot train: error: the few-shot split file {split_file}")
    assert lines[0].endswith("reinstall nsl (pip install --force-reinstall nsl, or git checkout the file in a "
                             "source checkout)")
    assert {"missing": "is missing from the installed package", "truncated": "cannot be read",
            "empty split": "split 'val' must be a non-empty list of distinct CIFAR-100 coarse labels (0-19), got []",
            "class in two splits": "is in both 'train' and 'test'"}[how] in lines[0]
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("name,sizes", [("cifar-fs", (64, 16, 20)), ("fc100", (60, 20, 20))])
def test_cifar_split_integrity(cifar_splits, name, sizes):
    seen: dict[str, str] = {}
    for split, n_classes in zip(("train", "val", "test"), sizes, strict=True):
        ds = cifar_splits[name, split]
        assert isinstance(ds, FewShotDataset) and ds.name == name and ds.split == split
        assert ds.n_classes == n_classes == len(set(ds.class_names))
        assert ds.images.dtype == torch.uint8 and ds.images.shape == (600 * n_classes, 3, 32, 32)
        assert ds.labels.dtype == torch.int64
        assert torch.equal(torch.bincount(ds.labels, minlength=n_classes), torch.full((n_classes,), 600))
        for c in ds.class_names:
            assert c not in seen, f"{c} is in both {seen.get(c)} and {split}"
            seen[c] = split
    assert len(seen) == 100  # the three splits partition CIFAR-100


def test_cifar_fs_follows_split_file_and_holds_the_cifar_images(cifar_splits, data_root):
    definition = load_split_definition("cifar_fs")
    for split in ("train", "val", "test"):
        assert cifar_splits["cifar-fs", split].class_names == definition[split]
    # the images of one class are exactly CIFAR-100's train + test images of that fine class
    ds = cifar_splits["cifar-fs", "val"]
    x_tr, y_tr = load_cifar(data_root, "cifar100", "train")
    x_te, y_te = load_cifar(data_root, "cifar100", "test")
    fine = 48  # motorcycle
    assert ds.class_names[1] == "motorcycle"
    expected = torch.cat([x_tr[y_tr == fine], x_te[y_te == fine]])
    assert torch.equal(ds.images[ds.labels == 1], expected)


def test_fc100_superclasses(cifar_splits, data_root):
    definition = load_split_definition("fc100")
    _, coarse = load_cifar(data_root, "cifar100", "test", label="coarse")
    _, fine = load_cifar(data_root, "cifar100", "test", label="fine")
    for split, n_super in (("train", 12), ("val", 4), ("test", 4)):
        ds = cifar_splits["fc100", split]
        assert len(ds.superclasses) == ds.n_classes
        assert sorted(set(ds.superclasses)) == sorted(definition[split]) and len(definition[split]) == n_super
        assert all(ds.superclasses.count(s) == 5 for s in set(ds.superclasses))
    # superclasses of the three splits are disjoint, and the fine -> coarse map is CIFAR-100's
    supers = [set(cifar_splits["fc100", s].superclasses) for s in ("train", "val", "test")]
    assert not (supers[0] & supers[1] or supers[0] & supers[2] or supers[1] & supers[2])
    pairs = set(zip(fine.tolist(), coarse.tolist(), strict=True))
    names = cifar_splits["fc100", "val"]
    fine_names = cifar_class_names(data_root, "cifar100")
    for name, sup in zip(names.class_names, names.superclasses, strict=True):
        assert (fine_names.index(name), sup) in pairs


def test_episodes_on_real_data_are_the_dataset_images(cifar_splits):
    ds = cifar_splits["cifar-fs", "test"]
    sampler = ds.sampler(n_way=5, k_shot=5, n_query=15, n_episodes=3, seed=0)
    for ep in sampler:
        xs, ys, xq, yq = make_episode(ds.images, ep)
        assert xs.shape == (25, 3, 32, 32) and xq.shape == (75, 3, 32, 32)
        assert torch.equal((xs * 255).round().to(torch.uint8), ds.images[ep.support])
        assert torch.equal(ep.classes[yq], ds.labels[ep.query])


# ------------------------------------------------------------------------------------------- Omniglot

@pytest.fixture(scope="module")
def omniglot_trees(data_root, tmp_path_factory):
    """The same 12 evaluation characters as a flat tree and as the official alphabet tree."""
    src = data_root / "omniglot" / "images_evaluation"
    base = tmp_path_factory.mktemp("omniglot")
    flat = base / "flat" / "images_evaluation"
    official = base / "official" / "omniglot" / "images_evaluation"
    for i in range(12):
        alphabet, char = ("Alphabet_A", i + 1) if i < 10 else ("Zeta_(B)", i - 9)
        shutil.copytree(src / f"c{i:04d}", flat / f"c{i:04d}")
        dst = official / alphabet / f"character{char:02d}"
        dst.mkdir(parents=True)
        for png in sorted((src / f"c{i:04d}").glob("*.png")):
            shutil.copy(png, dst / f"{1000 + i:04d}_{png.name}")  # official names: 0123_01.png
    return base / "flat", base / "official"


@pytest.mark.slow  # tier 2 (README: the slow tests)
def test_omniglot_full_evaluation_set(data_root):
    ds = load_omniglot(data_root, "test")
    assert ds.images.dtype == torch.uint8 and ds.images.shape == (659 * 20, 1, 28, 28)
    assert ds.n_classes == 659 and torch.equal(torch.bincount(ds.labels), torch.full((659,), 20))
    assert ds.images.min() == 0 and ds.images.max() == 255  # black strokes on white paper
    val = get_fewshot_dataset("omniglot", data_root, "val")
    assert val.n_classes == 964 - 800 and val.class_names[0] == "c0800"  # background = 964 characters


def test_omniglot_both_layouts_load_the_same_images(omniglot_trees, data_root):
    flat_root, official_root = omniglot_trees
    flat = load_omniglot(flat_root, "test")
    official = load_omniglot(official_root, "test")  # root may hold omniglot/
    assert flat.images.shape == (240, 1, 28, 28)
    assert torch.equal(flat.images, official.images) and torch.equal(flat.labels, official.labels)
    assert flat.class_names[:2] == ["c0000", "c0001"]
    assert official.class_names[0] == "Alphabet_A/character01"
    assert official.class_names[-1] == "Zeta_(B)/character02"
    # 28 x 28 LANCZOS resizes of the 105 x 105 drawings
    src = data_root / "omniglot" / "images_evaluation" / "c0003" / "07.png"
    with Image.open(src) as im:
        assert im.size == (105, 105)
        ref = np.array(im.convert("L").resize((28, 28), Image.Resampling.LANCZOS))
    assert torch.equal(flat.images[3 * 20 + 7, 0], torch.from_numpy(ref))
    full = load_omniglot(flat_root, "evaluation", image_size=None)
    assert full.images.shape == (240, 1, 105, 105)


def test_omniglot_rotation_augmentation(omniglot_trees):
    flat_root, _ = omniglot_trees
    base = load_omniglot(flat_root, "test")
    rot = get_fewshot_dataset("omniglot", flat_root, "test", rotations=True)
    assert rot.n_classes == 4 * base.n_classes == 48 and rot.images.shape == (4 * 240, 1, 28, 28)
    assert torch.equal(torch.bincount(rot.labels), torch.full((48,), 20))
    assert rot.class_names[:4] == ["c0000@rot0", "c0000@rot90", "c0000@rot180", "c0000@rot270"]
    for r in range(4):
        block = slice(r * 240, (r + 1) * 240)
        assert torch.equal(rot.labels[block], base.labels * 4 + r)
        assert torch.equal(rot.images[block], torch.rot90(base.images, r, dims=(2, 3)))
    assert torch.equal(with_rotations(base).images, rot.images)
    # rotated variants are distinct classes: a 48-way episode is possible
    ep = rot.sampler(48, 1, 1, n_episodes=1, seed=0).episode(0)
    assert sorted(ep.classes.tolist()) == list(range(48))


def test_omniglot_errors(tmp_path, omniglot_trees):
    with pytest.raises(DatasetError, match=r"images_evaluation not found under .*characterNN"):
        load_omniglot(tmp_path, "test")
    (tmp_path / "images_background" / "empty").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no Omniglot character folders with PNG files"):
        load_omniglot(tmp_path, "train")
    ds = load_omniglot(omniglot_trees[0], "test")  # 20 drawings per character
    with pytest.raises(ValueError,
                       match=r"class 0 has 20 images, an episode needs 1 shot \+ 25 queries = 26"):
        ds.sampler(n_way=5, k_shot=1, n_query=25, n_episodes=10)
    with pytest.raises(ValueError, match="unknown split 'eval' for omniglot; valid splits: train, val, test"):
        load_omniglot(omniglot_trees[0], "eval")


# --------------------------------------------------------------------------------------- mini-ImageNet

WNIDS = {"train": ["n01532829", "n01558993", "n01704323"], "val": ["n01855672", "n02091244"],
         "test": ["n01930112", "n01981276"]}


@pytest.fixture(scope="module")
def mini_tree(data_root, tmp_path_factory):
    """A Ravi & Larochelle tree of real CIFAR-10 test images: 6 PNGs per class."""
    x, y = load_cifar(data_root, "cifar10", "test")
    root = tmp_path_factory.mktemp("mini") / "mini-imagenet"
    (root / "images").mkdir(parents=True)
    sources, k = {}, 0
    for split, wnids in WNIDS.items():
        rows = []
        for wnid in wnids:
            idx = (y == k).nonzero().flatten()[:6]
            k += 1
            for j, i in enumerate(idx.tolist()):
                name = f"{wnid}{j + 1:08d}.png"
                folder = root / "images" / (wnid if split == "val" else "")  # val: images/<wnid>/<file>
                folder.mkdir(exist_ok=True)
                Image.fromarray(x[i].permute(1, 2, 0).numpy()).save(folder / name)
                rows.append((name, wnid))
                sources[name] = x[i]
        rows.reverse()  # CSV order need not follow the labels
        with open(root / f"{split}.csv", "w", newline="") as f:
            csv.writer(f).writerows([("filename", "label"), *rows])
    return root, sources


def test_mini_imagenet_tiny_tree(mini_tree):
    root, sources = mini_tree
    for split, wnids in WNIDS.items():
        ds = get_fewshot_dataset("mini-imagenet", root.parent, split)  # parent holding mini-imagenet/
        n = 6 * len(wnids)
        assert ds.images.dtype == torch.uint8 and ds.images.shape == (n, 3, 84, 84)
        assert ds.class_names == sorted(wnids) and ds.labels.dtype == torch.int64
        assert torch.equal(torch.bincount(ds.labels), torch.full((len(wnids),), 6))
    ds = load_mini_imagenet(root, "train", image_size=None)  # no resize: the exact CIFAR pixels
    with open(root / "train.csv") as f:
        rows = list(csv.reader(f))[1:]
    assert ds.images.shape == (18, 3, 32, 32)
    for i, (name, wnid) in enumerate(rows):
        assert torch.equal(ds.images[i], sources[name]) and ds.class_names[ds.labels[i]] == wnid
    resized = load_mini_imagenet(root, "train")
    ref = Image.fromarray(sources[rows[0][0]].permute(1, 2, 0).numpy())
    ref = np.array(ref.resize((84, 84), Image.Resampling.LANCZOS))
    assert torch.equal(resized.images[0], torch.from_numpy(ref).permute(2, 0, 1))
    ep = resized.sampler(3, 1, 5, n_episodes=2, seed=1).episode(1)
    xs, _, xq, _ = make_episode(resized.images, ep)
    assert xs.shape == (3, 3, 84, 84) and xq.shape == (15, 3, 84, 84)


def test_mini_imagenet_errors(tmp_path, mini_tree):
    with pytest.raises(DatasetError, match=r"train.csv not found .*header 'filename,label'.*images/"):
        load_mini_imagenet(tmp_path, "train")
    (tmp_path / "train.csv").write_bytes(b"\xff\xfe\x00garbage\x9c")  # corrupt: not text
    with pytest.raises(DatasetError, match=r"cannot read .*train.csv: not UTF-8 text; expected the Ravi"):
        load_mini_imagenet(tmp_path, "train")
    (tmp_path / "train.csv").write_text("file,class\na.png,n0\n")
    with pytest.raises(DatasetError, match="header 'filename,label'"):
        load_mini_imagenet(tmp_path, "train")
    (tmp_path / "train.csv").write_text("filename,label\na.png,n0\n")
    with pytest.raises(DatasetError, match="image folder .* not found"):
        load_mini_imagenet(tmp_path, "train")
    (tmp_path / "images").mkdir()
    with pytest.raises(DatasetError, match=r"1 images listed in .*train.csv are missing .*first: a.png"):
        load_mini_imagenet(tmp_path, "train")
    Image.new("RGB", (10, 10)).save(tmp_path / "images" / "a.png")
    Image.new("RGB", (12, 10)).save(tmp_path / "images" / "b.png")
    (tmp_path / "images" / "c.png").write_bytes(b"not a png")
    (tmp_path / "train.csv").write_text("filename,label\na.png,n0\nb.png,n1\n")
    with pytest.raises(DatasetError, match="b.png decodes to shape .*pass image_size"):
        load_mini_imagenet(tmp_path, "train", image_size=None)
    assert load_mini_imagenet(tmp_path, "train", image_size=16).images.shape == (2, 3, 16, 16)
    (tmp_path / "train.csv").write_text("filename,label\na.png,n0\nc.png,n1\n")
    with pytest.raises(DatasetError, match="cannot read image .*c.png"):
        load_mini_imagenet(tmp_path, "train")
    root, _ = mini_tree
    ds = load_mini_imagenet(root, "val")  # 6 images per class
    with pytest.raises(ValueError, match=r"an episode needs 1 shot \+ 6 queries = 7"):
        ds.sampler(2, 1, 6, n_episodes=1)
    with pytest.raises(ValueError, match=r"n_way=3 exceeds the number of classes in labels \(2\)"):
        ds.sampler(3, 1, 1, n_episodes=1)


# ---------------------------------------------------------------------------------------------- registry

def test_registry_rejects_unknown_names_and_splits(tmp_path):
    with pytest.raises(ValueError, match="unknown few-shot dataset 'imagenet'; valid names: "
                                         "cifar-fs, fc100, mini-imagenet, omniglot"):
        get_fewshot_dataset("imagenet", tmp_path, "train")
    for name in ("cifar-fs", "fc100", "mini-imagenet"):
        with pytest.raises(ValueError,
                           match=f"unknown split 'validation' for {name}; valid splits: train, val, test"):
            get_fewshot_dataset(name, tmp_path, "validation")


def test_registry_missing_data_raises_dataset_error(tmp_path):
    for name, pattern in (("cifar-fs", "CIFAR-100.*cifar-100-python"), ("FC100", "CIFAR-100"),
                          ("omniglot", "images_background not found"),
                          ("mini_imagenet", "val.csv not found")):
        with pytest.raises(DatasetError, match=pattern) as info:
            get_fewshot_dataset(name, tmp_path / "nowhere", "val")
        assert isinstance(info.value, ValueError)
