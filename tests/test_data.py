import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from advkit import data
from advkit.data import Batcher, get_dataset, random_crop_flip, split_validation


def test_digits_is_uint8_nchw(digits):
    assert digits.x_train.dtype == torch.uint8 and digits.x_train.shape[1:] == (1, 8, 8)
    assert len(digits.x_train) + len(digits.x_test) == 1797
    assert digits.y_train.dtype == torch.int64 and set(digits.y_test.tolist()) == set(range(10))
    assert digits.x_train.max() == 255 and digits.num_classes == 10


def test_unknown_dataset_names_choices():
    with pytest.raises(ValueError, match="dataset='mnist'.*digits"):
        get_dataset("mnist")


def _fake_image_folder(root, per_class=2):
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in data.CIFAR10_CLASSES:
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")


def test_cifar10_image_folder_and_cache(tmp_path, monkeypatch):
    _fake_image_folder(tmp_path)
    ds = get_dataset("cifar10", tmp_path)
    assert ds.x_train.shape == (20, 3, 32, 32) and ds.x_train.dtype == torch.uint8
    assert sorted(ds.y_train.tolist()) == [c for c in range(10) for _ in range(2)] and ds.classes[0] == "airplane"
    assert ds.y_train.tolist() != sorted(ds.y_train.tolist())  # shuffled with a fixed seed: first n is mixed
    first = torch.from_numpy(np.array(Image.open(tmp_path / "train" / "airplane" / "0.png"))).permute(2, 0, 1)
    assert any(torch.equal(x, first) and y == 0 for x, y in zip(ds.x_train, ds.y_train))
    assert (tmp_path / "cifar10.npz").exists()
    monkeypatch.setattr(data, "_image_folder", None)  # the second load must come from the cache
    again = get_dataset("cifar10", tmp_path)
    assert torch.equal(again.x_train, ds.x_train) and torch.equal(again.y_test, ds.y_test)


def test_cifar10_cache_follows_the_folder(tmp_path, capsys):
    _fake_image_folder(tmp_path, per_class=2)
    assert len(get_dataset("cifar10", tmp_path).y_train) == 20
    assert "rebuilding" not in capsys.readouterr().out  # first build: nothing to rebuild
    (tmp_path / "train" / "cat" / "0.png").unlink()                          # a file removed
    assert len(get_dataset("cifar10", tmp_path).y_train) == 19
    assert "source files changed" in capsys.readouterr().out
    Image.new("RGB", (32, 32), (1, 2, 3)).save(tmp_path / "train" / "cat" / "9.png")  # a file added
    ds = get_dataset("cifar10", tmp_path)
    assert len(ds.y_train) == 20 and any(torch.equal(x[:, 0, 0], torch.tensor([1, 2, 3], dtype=torch.uint8))
                                         for x in ds.x_train)
    out = capsys.readouterr().out
    assert out.count("advkit.data: rebuilding") == 1 and "cifar10.npz" in out and "source files changed" in out
    (tmp_path / "test" / "dog" / "0.png").write_bytes(b"\x89PNG garbled")  # one image corrupted
    with pytest.raises(ValueError, match=r"test/dog/0.png: cannot decode this image"):
        get_dataset("cifar10", tmp_path)


def test_cifar10_garbled_cache_is_rebuilt(tmp_path, capsys):
    _fake_image_folder(tmp_path, per_class=1)
    ds = get_dataset("cifar10", tmp_path)
    cache = tmp_path / "cifar10.npz"
    raw = bytearray(cache.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    cache.write_bytes(bytes(raw))
    again = get_dataset("cifar10", tmp_path)
    assert torch.equal(again.x_train, ds.x_train)
    assert "rebuilding" in capsys.readouterr().out


def test_cifar10_cache_alone_is_not_cifar10(tmp_path, monkeypatch):
    _fake_image_folder(tmp_path, per_class=1)
    get_dataset("cifar10", tmp_path)
    for split in ("train", "test"):
        shutil.rmtree(tmp_path / split)
    assert (tmp_path / "cifar10.npz").exists()
    import torchvision.datasets

    def offline(root, train, download):
        raise RuntimeError("Dataset not found or corrupted.")
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(FileNotFoundError, match="CIFAR-10 not found"):
        get_dataset("cifar10", tmp_path, download=False)


def test_cifar10_torchvision_download_is_called(tmp_path, monkeypatch):
    calls = []

    class FakeCIFAR10:
        value = 7

        def __init__(self, root, train, download):
            calls.append((root, train, download))
            folder = tmp_path / "cifar-10-batches-py"  # what the real download extracts
            folder.mkdir(exist_ok=True)
            (folder / "data_batch_1").write_bytes(bytes([self.value]) * 10)
            n = 6 if train else 4
            self.data = np.full((n, 32, 32, 3), self.value, dtype=np.uint8)
            self.targets = list(range(n))

    import torchvision.datasets
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR10)
    ds = get_dataset("cifar10", tmp_path)
    assert calls == [(str(tmp_path), True, True), (str(tmp_path), False, True)]
    assert ds.x_train.shape == (6, 3, 32, 32) and int(ds.x_test[0, 0, 0, 0]) == 7
    assert int(get_dataset("cifar10", tmp_path).x_train[0, 0, 0, 0]) == 7 and len(calls) == 2  # from the cache
    FakeCIFAR10.value = 9  # torchvision's files change: the cache is rebuilt from them
    os.utime(tmp_path / "cifar-10-batches-py" / "data_batch_1", ns=(0, 0))
    assert int(get_dataset("cifar10", tmp_path).x_train[0, 0, 0, 0]) == 9 and len(calls) == 4


def test_cifar10_missing_says_how_to_get_it(tmp_path, monkeypatch):
    import torchvision.datasets

    def offline(root, train, download):
        raise RuntimeError("Dataset not found or corrupted. You can use download=True to download it")
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(FileNotFoundError, match="cifar10-jpeg.tgz"):
        get_dataset("cifar10", tmp_path, download=False)


def test_data_dir_env_override(tmp_path, monkeypatch):
    monkeypatch.setenv("ADVKIT_DATA_DIR", str(tmp_path))
    assert data.default_data_dir() == tmp_path


def test_batcher_covers_every_example_once_per_epoch():
    x = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 1, 4, 4).contiguous()
    y = torch.arange(10)
    b = Batcher(x, y, batch_size=4, seed=1)
    seen = torch.cat([yb for _, yb in b])
    assert sorted(seen.tolist()) == list(range(10)) and len(b) == 3
    xb, yb = next(iter(b))
    assert xb.dtype == torch.float32 and torch.allclose(xb[:, 0, 0, 0] * 255, yb.float())


def test_batcher_is_seeded_per_epoch():
    x = torch.randint(0, 255, (32, 3, 8, 8), dtype=torch.uint8)
    y = torch.arange(32)
    a, b = Batcher(x, y, 8, augment=True, padding=2, seed=3), Batcher(x, y, 8, augment=True, padding=2, seed=3)
    a.set_epoch(2), b.set_epoch(2)
    assert all(torch.equal(p[0], q[0]) for p, q in zip(a, b))
    b.set_epoch(3)
    assert not all(torch.equal(p[1], q[1]) for p, q in zip(a, b))


def test_random_crop_flip_shifts_and_flips():
    x = torch.arange(16.0).view(1, 1, 4, 4).repeat(64, 1, 1, 1)
    out = random_crop_flip(x, padding=1, flip=True, generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    # Every output is a shifted (and possibly mirrored) copy: its non-zero values come from x.
    assert set(out.unique().tolist()) <= set(range(16))
    assert any(torch.equal(o[0], x[0, 0].flip(-1)) for o in out)
    assert any(torch.equal(o[0], x[0, 0]) for o in out)
    assert any(o[0, 0, 0] == 0 and not torch.equal(o[0], x[0, 0]) for o in out)


def test_split_validation_is_disjoint():
    x, y = torch.zeros(100, 1, 2, 2), torch.arange(100)
    (xt, yt), (xv, yv) = split_validation(x, y, 20, seed=0)
    assert len(yv) == 20 and len(yt) == 80 and not set(yv.tolist()) & set(yt.tolist())
    with pytest.raises(ValueError, match="n_val"):
        split_validation(x, y, 100)
