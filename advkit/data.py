"""Datasets as uint8 tensors and a device-resident batcher with on-device augmentation.

Images are kept as uint8 (N, C, H, W) everywhere and turned into floats in [0, 1]
only per batch, on the device: a CIFAR-10 training set is 150 MB on the GPU and
augmentation costs a few tensor ops per batch, with no per-image Python work.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from advkit._checks import check_int
from advkit._torch import to_float
from advkit.runs.artifacts import atomic_path, checksum_path, verified

DATASETS = ("digits", "cifar10")


@dataclass(frozen=True)
class Dataset:
    """Train and test images (uint8, N x C x H x W), integer labels and class names; `source` says which
    files they were read from (e.g. a JPEG copy of CIFAR-10, whose pixels differ from the original)."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: list[str]
    source: str = ""  # empty for a Dataset built by hand

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_channels(self) -> int:
        return self.x_train.shape[1]

    def __repr__(self) -> str:
        return (f"Dataset({self.name!r}: train {tuple(self.x_train.shape)}, "
                f"test {tuple(self.x_test.shape)}, {self.num_classes} classes)")


def default_data_dir() -> Path:
    """`$ADVKIT_DATA_DIR` (made absolute), else `data/` in the repository."""
    from advkit.runs.run import repo_root, resolve_environment_paths

    resolve_environment_paths()
    return Path(os.environ.get("ADVKIT_DATA_DIR") or repo_root() / "data")


def get_dataset(name: str, data_dir: str | Path | None = None, download: bool = True) -> Dataset:
    """Load a dataset as uint8 tensors; decoded arrays are cached as .npz under `data_dir`.

    `cifar10` reads torchvision's format in `data_dir` (downloading it when missing and
    `download` is true) or an ImageFolder copy `data_dir/{train,test}/<class>/*.jpg`.
    `digits` is scikit-learn's bundled 8x8 handwritten digits, fully offline.
    """
    if name not in DATASETS:
        raise ValueError(f"dataset={name!r} is not available; choose one of {list(DATASETS)}")
    if name == "digits":
        return _digits()
    return _cifar10(Path(data_dir) if data_dir is not None else default_data_dir(), download)


def _digits() -> Dataset:
    """scikit-learn digits (1797 images, 8x8, 17 grey levels); a fixed seeded 80/20 split."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.round(bunch.images * (255 / 16)).astype(np.uint8)[:, None]
    labels = bunch.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(labels))
    n_test = 360
    test, train = order[:n_test], order[n_test:]
    return Dataset("digits", torch.from_numpy(images[train]), torch.from_numpy(labels[train]),
                   torch.from_numpy(images[test]), torch.from_numpy(labels[test]),
                   [str(i) for i in range(10)], "scikit-learn's digits (8x8, 17 grey levels)")


CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck"]


def _cifar10(data_dir: Path, download: bool) -> Dataset:
    """CIFAR-10 from an ImageFolder copy or torchvision's files, through a cache keyed on them.

    The cache `cifar10.npz` records a key of its source files (names, sizes, mtimes) and is
    reused only while they are unchanged; it is never read without its source."""
    cache = data_dir / "cifar10.npz"
    root = next((r for r in (data_dir, data_dir / "cifar10-jpeg") if (r / "train").is_dir() and (r / "test").is_dir()),
                None)
    sources = [root / "train", root / "test"] if root is not None else [data_dir / "cifar-10-batches-py"]
    key = source_key(sources)
    if root is not None or (data_dir / "cifar-10-batches-py").is_dir():
        arrays, reason = _read_cache(cache, key)
        if arrays is not None:
            return Dataset("cifar10", classes=CIFAR10_CLASSES, source=_cifar10_source(data_dir, root), **arrays)
        if reason is not None:
            print(f"advkit.data: rebuilding {cache}: {reason}")
    if root is not None:
        arrays = {**_image_folder(root / "train", "train"), **_image_folder(root / "test", "test")}
    else:
        arrays = _torchvision_cifar10(data_dir, download)
        key = source_key(sources)  # the download created them
    _save_npz(cache, {**{k: v.numpy() for k, v in arrays.items()}, "source_key": np.array(key)})
    return Dataset("cifar10", classes=CIFAR10_CLASSES, source=_cifar10_source(data_dir, root), **arrays)


def _cifar10_source(data_dir: Path, root: Path | None) -> str:
    """What `_cifar10` read: torchvision's original files, or an ImageFolder copy (its image format and,
    for JPEG, the quality of its first test image: a lossy copy's pixels differ from the original)."""
    if root is None:
        return f"CIFAR-10, torchvision's original files in {data_dir / 'cifar-10-batches-py'}"
    first = next((p for p in sorted((root / "test" / CIFAR10_CLASSES[0]).iterdir()) if p.is_file()), None)
    if first is None or first.suffix.lower() not in (".jpg", ".jpeg"):
        return f"CIFAR-10 ImageFolder copy ({first.suffix if first else 'no'} files) in {root}"
    quality = jpeg_quality(first)
    return (f"CIFAR-10 JPEG copy ({'quality ' + str(quality) if quality else 'non-standard tables'}; lossy: "
            f"pixels differ from the original CIFAR-10) in {root}")


def jpeg_quality(path: str | Path) -> int | None:
    """The libjpeg quality (1-100) whose quantization tables Pillow writes equal those of the JPEG file at
    `path`; None when no quality gives them (tables not made by libjpeg's quality scaling)."""
    import io

    from PIL import Image

    with Image.open(path) as im:
        tables = im.quantization
    for quality in range(1, 101):
        buffer = io.BytesIO()
        Image.new("RGB", (8, 8)).save(buffer, "JPEG", quality=quality)
        with Image.open(buffer) as probe:
            if probe.quantization == tables:
                return quality
    return None


def source_key(folders: list[Path]) -> str:
    """sha256 of the relative names, sizes and modification times of every file under `folders`:
    what a decoded-data cache depends on (a file added, removed, replaced or edited changes it)."""
    h = hashlib.sha256()
    for top in folders:
        h.update(f"[{top.name}]".encode())
        for folder, dirs, files in os.walk(top):
            dirs.sort()
            for name in sorted(files):
                st = os.stat(os.path.join(folder, name))
                rel = os.path.relpath(os.path.join(folder, name), top)
                h.update(f"{rel}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _read_cache(cache: Path, key: str) -> tuple[dict[str, torch.Tensor] | None, str | None]:
    """The cached arrays if the cache is intact and was built from the same source files; else
    (None, why it must be rebuilt), or (None, None) when there is no cache."""
    if not cache.exists():
        return None, None
    if not checksum_path(cache).exists():
        return None, "it has no recorded checksum (written by an older advkit)"
    try:
        verified(cache)
        with np.load(cache) as z:
            if "source_key" not in z.files or str(z["source_key"]) != key:
                return None, "the source files changed (added, removed or modified) since it was built"
            arrays = {k: torch.from_numpy(z[k]) for k in z.files if k != "source_key"}
    except (ValueError, OSError, KeyError) as err:
        return None, f"it is unreadable ({err})"
    return arrays, None


def _torchvision_cifar10(data_dir: Path, download: bool) -> dict[str, torch.Tensor]:
    from torchvision.datasets import CIFAR10

    arrays = {}
    for split, train in (("train", True), ("test", False)):
        try:
            ds = CIFAR10(str(data_dir), train=train, download=download)
        except (RuntimeError, OSError) as err:
            raise FileNotFoundError(
                f"CIFAR-10 not found in {data_dir} and could not be downloaded ({err}). "
                "Either allow the download (network access), or put torchvision's "
                "'cifar-10-batches-py' folder there, or extract an ImageFolder copy so that "
                f"{data_dir}/train/<class>/*.jpg and {data_dir}/test/<class>/*.jpg exist "
                "(e.g. tar xzf ../shared/data/cifar10-jpeg.tgz -C data/). "
                "ADVKIT_DATA_DIR or data_dir= choose the folder."
            ) from err
        arrays[f"x_{split}"] = torch.from_numpy(np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2)))
        arrays[f"y_{split}"] = torch.tensor(ds.targets, dtype=torch.int64)
    return arrays


def _image_folder(root: Path, split: str) -> dict[str, torch.Tensor]:
    """Decode an ImageFolder tree (classes sorted by name) with Pillow, in a thread pool, and
    shuffle it with a fixed seed."""
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image
    from torchvision.datasets.folder import make_dataset

    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if classes != CIFAR10_CLASSES:
        raise ValueError(f"{root}: expected the CIFAR-10 class folders {CIFAR10_CLASSES}, found {classes}")
    samples = make_dataset(str(root), {c: i for i, c in enumerate(classes)}, extensions=(".jpg", ".jpeg", ".png"))

    def decode(path: str) -> np.ndarray:
        try:
            with Image.open(path) as im:
                image = np.asarray(im.convert("RGB"))
        except (OSError, ValueError) as err:
            raise ValueError(f"{path}: cannot decode this image ({err}); replace or delete it") from err
        if image.shape != (32, 32, 3):
            raise ValueError(f"{path}: a CIFAR-10 image is 32x32 RGB, this one is {image.shape[1]}x{image.shape[0]}")
        return image

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        images = np.stack(list(pool.map(decode, [path for path, _ in samples], chunksize=256)))
    labels = np.array([label for _, label in samples], dtype=np.int64)
    # Folders list images class by class; a fixed shuffle makes "the first n images" (the
    # fixed subsets of Stutz et al.) a class-mixed sample, as in the original CIFAR-10 order.
    order = np.random.default_rng(0).permutation(len(labels))
    images = images[order].transpose(0, 3, 1, 2)
    return {f"x_{split}": torch.from_numpy(np.ascontiguousarray(images)), f"y_{split}": torch.from_numpy(labels[order])}


def _save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)


def subset(x: torch.Tensor, y: torch.Tensor, n: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `n` examples (all when `n` is None): the fixed subsets of Stutz et al."""
    if n is not None and n < 1:
        raise ValueError(f"n must be >= 1 or None, got {n}")
    return (x, y) if n is None else (x[:n], y[:n])


def split_validation(x: torch.Tensor, y: torch.Tensor, n_val: int, seed: int = 0):
    """Hold out `n_val` random examples: returns (x_train, y_train), (x_val, y_val)."""
    if not 0 <= n_val < len(y):
        raise ValueError(f"n_val must be in [0, {len(y)}), got {n_val}")
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    val, train = perm[:n_val], perm[n_val:]
    return (x[train], y[train]), (x[val], y[val])


def crop_padding(images: torch.Tensor) -> int:
    """The random crop's padding for N x C x H x W `images`: the papers' 4 px at CIFAR-10's 32 px, scaled
    with the side (1 px on 8 x 8 digits)."""
    return images.shape[-1] // 8


def random_crop_flip(x: torch.Tensor, padding: int, flip: bool, generator: torch.Generator) -> torch.Tensor:
    """Random crop after zero padding and random horizontal flip, batched on x's device."""
    n, c, h, w = x.shape
    if padding > 0:
        padded = F.pad(x, (padding,) * 4)
        dev = x.device
        dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator).to(dev)
        dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator).to(dev)
        rows = (dy[:, None] + torch.arange(h, device=dev))[:, None, :, None]
        cols = (dx[:, None] + torch.arange(w, device=dev))[:, None, None, :]
        x = padded[torch.arange(n, device=dev)[:, None, None, None], torch.arange(c, device=dev)[None, :, None, None],
                   rows, cols]
    if flip:
        mask = (torch.rand(n, generator=generator) < 0.5).to(x.device)[:, None, None, None]
        x = torch.where(mask, x.flip(-1), x)
    return x


class Batcher:
    """Iterates over (x float in [0, 1], y) batches of uint8 images kept on `device`.

    Shuffling and augmentation draw from a CPU generator seeded with (seed, epoch), so an
    epoch's batches depend only on the seed and the epoch number: exact resumption needs
    no saved state. `augment` is random crop with `padding` plus horizontal flip. `fit` uses a
    Batcher as given: its batch size, augmentation and seed are the training's (`settings`).
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, *, shuffle: bool = True,
                 augment: bool = False, padding: int = 4, flip: bool = True, seed: int = 0,
                 device: str | torch.device = "cpu", drop_last: bool = False):
        check_int("batch_size", batch_size)
        check_int("padding", padding, minimum=0)
        check_int("seed", seed, minimum=0)
        if len(x) != len(y):
            raise ValueError(f"x and y differ in length: {len(x)} vs {len(y)}")
        self.x = x.to(device)
        self.y = y.to(device)
        self.batch_size, self.shuffle, self.augment = batch_size, shuffle, augment
        self.padding, self.flip, self.seed, self.drop_last = padding, flip, seed, drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def settings(self) -> dict[str, Any]:
        """What determines this Batcher's batches (recorded with a training state, checked on resume)."""
        return {"batcher": type(self).__name__, "n": len(self.y), "batch_size": self.batch_size,
                "shuffle": self.shuffle, "augment": self.augment, "padding": self.padding, "flip": self.flip,
                "seed": self.seed, "drop_last": self.drop_last}

    def __len__(self) -> int:
        n = len(self.y)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def transform(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """uint8 batch -> float batch in [0, 1], augmented; subclasses add augmentations here."""
        x = to_float(x)
        if self.augment:
            x = random_crop_flip(x, self.padding, self.flip, generator)
        return x

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        n = len(self.y)
        order = torch.randperm(n, generator=gen).to(self.x.device) if self.shuffle else None
        for i in range(len(self)):
            idx = slice(i * self.batch_size, (i + 1) * self.batch_size)
            take = order[idx] if order is not None else idx
            yield self.transform(self.x[take], gen), self.y[take]
