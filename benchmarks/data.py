"""Datasets for the benchmark runner, as in-memory tensors (normalised images, integer labels).

- ``digits``: scikit-learn's bundled ``load_digits`` (1,797 8×8 grey images; the fixed 1,437/360
  split of ``benchmarks/demo_digits.py``). No download.
- ``fashion-mnist``: 60k/10k 28×28 grey images. Read by ``torchvision.datasets.FashionMNIST``
  from ``ROOT/FashionMNIST/raw/``; if that is empty the Debian package's files
  (``/usr/share/datasets/fashion-mnist/*.gz``, package ``dataset-fashion-mnist``) are unpacked
  there, else ``--download`` fetches them.
- ``cifar10`` / ``cifar100``: torchvision's loaders (``--download`` to fetch, ~170 MB).
- ``tiny-imagenet``: the 200-class 64×64 set in ``ROOT/tiny-imagenet-200/`` (``--download``
  fetches http://cs231n.stanford.edu/tiny-imagenet-200.zip, ~240 MB); the labelled
  ``val/`` split serves as the test set.
- ``synthetic-cifar10`` / ``synthetic-cifar100``: random uint8 images of CIFAR's shape and size
  (50,000 / 10,000 of 3×32×32, balanced labels, 10 or 100 classes), seeded, normalised and
  augmented as CIFAR is. For timing the real protocol where CIFAR is not at hand
  (``benchmarks/gpu_check.sh``); the accuracies mean nothing. No files, no download.

A dataset that is not there and may not be downloaded raises :class:`DataMissingError` with the
command that fixes it.
"""

from __future__ import annotations

import gzip
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

DATASETS = (
    "digits",
    "fashion-mnist",
    "cifar10",
    "cifar100",
    "tiny-imagenet",
    "synthetic-cifar10",
    "synthetic-cifar100",
)
SYNTHETIC_SIZES = (50_000, 10_000)  # CIFAR's training and test set sizes
DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")
TINY_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"

# Per-channel mean / std used to normalise (computed on the training sets, the usual values).
_STATS = {
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "tiny-imagenet": ((0.4802, 0.4481, 0.3975), (0.2770, 0.2691, 0.2821)),
}


class DataMissingError(FileNotFoundError):
    """The dataset's files are not under the data root and downloading was not allowed."""


@dataclass
class Data:
    """Training and test tensors ``(N, C, H, W)`` float32 (normalised) and ``(N,)`` int64 labels."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    n_classes: int
    augment: bool  # random crop (padding 4) + horizontal flip while training (natural images)

    @property
    def in_channels(self) -> int:
        return self.x_train.shape[1]

    @property
    def size(self) -> int:
        return self.x_train.shape[-1]


def _normalise(x: torch.Tensor, name: str) -> torch.Tensor:
    mean, std = _STATS[name]
    mean = torch.tensor(mean).view(1, -1, 1, 1)
    std = torch.tensor(std).view(1, -1, 1, 1)
    return (x - mean) / std


def _missing(name: str, root: Path, what: str) -> DataMissingError:
    return DataMissingError(
        f"{name}: {what} not found under {root}. Pass --download to fetch it (needs internet), "
        f"or --data-root pointing at a folder that has it."
    )


def _fashion(root: Path, download: bool) -> tuple[torch.Tensor, ...]:
    from torchvision.datasets import FashionMNIST

    raw = root / "FashionMNIST" / "raw"
    files = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte"]
    files.append("t10k-labels-idx1-ubyte")
    if not all((raw / f).exists() for f in files) and DEBIAN_FASHION.is_dir():
        raw.mkdir(parents=True, exist_ok=True)
        for f in files:
            src = DEBIAN_FASHION / f"{f}.gz"
            if src.exists() and not (raw / f).exists():
                # unpack beside the target and rename: a reader running at the same time (two
                # benchmark workers) or a run killed half-way never sees a partial file
                fd, tmp = tempfile.mkstemp(dir=raw, prefix=f".{f}.")
                try:
                    with gzip.open(src, "rb") as fin, os.fdopen(fd, "wb") as fout:
                        shutil.copyfileobj(fin, fout)
                    os.replace(tmp, raw / f)
                except BaseException:
                    Path(tmp).unlink(missing_ok=True)
                    raise
    try:
        train = FashionMNIST(str(root), train=True, download=download)
        test = FashionMNIST(str(root), train=False, download=download)
    except RuntimeError as e:
        raise _missing(
            "fashion-mnist", root, "FashionMNIST/raw/*-ubyte (or the Debian package dataset-fashion-mnist)"
        ) from e
    return train.data.unsqueeze(1), train.targets, test.data.unsqueeze(1), test.targets


def _cifar(name: str, root: Path, download: bool) -> tuple[torch.Tensor, ...]:
    from torchvision.datasets import CIFAR10, CIFAR100

    cls = CIFAR10 if name == "cifar10" else CIFAR100
    try:
        train = cls(str(root), train=True, download=download)
        test = cls(str(root), train=False, download=download)
    except RuntimeError as e:
        raise _missing(name, root, f"the {cls.__name__} python archive") from e

    def tens(ds) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(ds.targets)

    return (*tens(train), *tens(test))


def _synthetic(name: str, n_train: int, seed: int) -> tuple[torch.Tensor, ...]:
    """Random uint8 CIFAR-shaped images and balanced labels: ``n_train`` training images (CIFAR's
    50,000 unless a subset is asked for) and CIFAR's 10,000 test images, drawn with ``seed``."""
    n_classes = 100 if name.endswith("100") else 10
    gen = torch.Generator().manual_seed(seed)

    def split(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randint(0, 256, (n, 3, 32, 32), generator=gen, dtype=torch.uint8)
        y = (torch.arange(n) % n_classes)[torch.randperm(n, generator=gen)]
        return x, y

    return (*split(n_train), *split(SYNTHETIC_SIZES[1]))


def _tiny(root: Path, download: bool) -> tuple[torch.Tensor, ...]:
    from torchvision.datasets import ImageFolder
    from torchvision.datasets.utils import download_and_extract_archive
    from torchvision.io import ImageReadMode, decode_image

    base = root / "tiny-imagenet-200"
    if not (base / "train").is_dir():
        if not download:
            raise _missing("tiny-imagenet", root, "tiny-imagenet-200/train")
        download_and_extract_archive(TINY_URL, str(root))
    cache = base / "tensors.pt"
    if cache.exists():
        return tuple(torch.load(cache, weights_only=True))
    train = ImageFolder(str(base / "train"))
    classes = train.class_to_idx

    def load(paths: list[str]) -> torch.Tensor:
        return torch.stack([decode_image(p, mode=ImageReadMode.RGB) for p in paths])

    x_tr = load([p for p, _ in train.samples])
    y_tr = torch.tensor([c for _, c in train.samples])
    lines = (base / "val" / "val_annotations.txt").read_text().splitlines()
    pairs = [ln.split("\t")[:2] for ln in lines if ln.strip()]
    x_te = load([str(base / "val" / "images" / f) for f, _ in pairs])
    y_te = torch.tensor([classes[c] for _, c in pairs])
    out = (x_tr, y_tr, x_te, y_te)
    torch.save(list(out), cache)
    return out


def load_data(
    name: str,
    root: str | Path = "data",
    *,
    download: bool = False,
    train_subset: int | None = None,
    seed: int = 0,
) -> Data:
    """Load ``name`` (one of :data:`DATASETS`) as tensors.

    Args:
        root: the data folder (``data/`` in the repository by default; git-ignored).
        download: allow torchvision / the Tiny-ImageNet URL to fetch missing files.
        train_subset: keep this many training images (a class-stratified random subset drawn with
            ``seed``); the test set is always complete. The synthetic sets generate only this
            many training images (with balanced labels).

    Raises:
        DataMissingError: the files are missing and ``download`` is False (or fetching failed).
    """
    if name not in DATASETS:
        raise ValueError(f"dataset must be one of {DATASETS}, got {name!r}")
    root = Path(root)
    if name == "digits":
        from benchmarks.demo_digits import digits_split

        train, test = digits_split()
        (x_tr, y_tr), (x_te, y_te) = train.tensors, test.tensors
        x_tr, x_te = (x_tr - 0.3) / 0.4, (x_te - 0.3) / 0.4
        data = Data(name, x_tr, y_tr, x_te, y_te, 10, augment=False)
    else:
        if name == "fashion-mnist":
            raw = _fashion(root, download)
        elif name in ("cifar10", "cifar100"):
            raw = _cifar(name, root, download)
        elif name.startswith("synthetic-"):
            n = SYNTHETIC_SIZES[0] if train_subset is None else min(train_subset, SYNTHETIC_SIZES[0])
            raw = _synthetic(name, n, seed)
        else:
            raw = _tiny(root, download)
        x_tr, y_tr, x_te, y_te = raw
        stats = name.removeprefix("synthetic-")
        x_tr = _normalise(x_tr.float() / 255.0, stats)
        x_te = _normalise(x_te.float() / 255.0, stats)
        n_classes = {"fashion-mnist": 10, "cifar10": 10, "cifar100": 100, "tiny-imagenet": 200}[stats]
        data = Data(name, x_tr, y_tr.long(), x_te, y_te.long(), n_classes, augment=name != "fashion-mnist")
    if train_subset is not None and train_subset < len(data.y_train):
        data.x_train, data.y_train = _stratified(data.x_train, data.y_train, train_subset, seed)
    return data


def _stratified(x: torch.Tensor, y: torch.Tensor, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` examples, the same share of each class as in ``y`` (rounded), drawn with ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    classes = torch.unique(y)
    picks = []
    for c in classes:
        idx = torch.nonzero(y == c).flatten()
        k = int(round(n * len(idx) / len(y)))
        picks.append(idx[torch.randperm(len(idx), generator=gen)[:k]])
    sel = torch.cat(picks).sort().values
    return x[sel], y[sel]


def augment_batch(x: torch.Tensor, generator: torch.Generator | None = None, pad: int = 4) -> torch.Tensor:
    """Random crop with zero padding ``pad`` and random horizontal flip, per example (a batch op)."""
    n, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    out = torch.empty_like(x)
    for i in range(n):
        crop = padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w]
        out[i] = crop.flip(-1) if flip[i] else crop
    return out
