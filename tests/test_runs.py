import json

import pytest
import torch

from advkit.models import get_model
from advkit.runs import (CorruptArtifactError, atomic_path, file_sha256, list_models, load_model, run_dir,
                         save_model, update_manifest, verified)


def test_run_dir_honours_env(tmp_run):
    assert run_dir("x") == tmp_run / "runs" / "x" and (tmp_run / "runs" / "x").is_dir()


def test_atomic_path_leaves_old_file_on_failure(tmp_path):
    target = tmp_path / "f.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert target.read_text() == "old" and list(tmp_path.iterdir()) == [target]


def test_atomic_path_records_a_checksum_that_verified_checks(tmp_path):
    target = tmp_path / "f.txt"
    with atomic_path(target) as tmp:
        tmp.write_text("content")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.txt", "f.txt.sha256"]
    assert (tmp_path / "f.txt.sha256").read_text().split() == [file_sha256(target), "f.txt"]  # sha256sum -c format
    assert verified(target) == target
    target.write_text("contenT")
    with pytest.raises(CorruptArtifactError, match="f.txt is corrupt.*Delete it"):
        verified(target)


def test_save_and_load_model_roundtrip(tmp_path):
    model = get_model("small_cnn", 10, 1, width=8)
    save_model(tmp_path / "models" / "m.pt", model, {"lr": 0.1}, epoch=3)
    loaded = load_model(tmp_path / "models" / "m.pt")
    assert not loaded.training and loaded.advkit_spec == model.advkit_spec
    x = torch.rand(4, 1, 8, 8)
    torch.testing.assert_close(loaded(x), model.eval()(x))
    assert list_models(tmp_path) == ["m"]


def test_load_errors_name_the_file(tmp_path):
    path = tmp_path / "m.pt"
    save_model(path, get_model("small_cnn", 10, 1))
    with pytest.raises(ValueError, match="m.pt holds a 'small_cnn' model, not the requested 'resnet20'"):
        load_model(path, arch="resnet20")
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CorruptArtifactError, match="m.pt is corrupt"):
        load_model(path)
    (tmp_path / "m.pt.sha256").unlink()  # no checksum recorded: read with a warning, still an error
    with pytest.warns(UserWarning, match="no recorded checksum"), \
            pytest.raises(ValueError, match="m.pt is not a readable advkit checkpoint"):
        load_model(path)
    with pytest.raises(FileNotFoundError, match="nothere.pt"):
        load_model(tmp_path / "nothere.pt")


def test_manifest_merges_sections(tmp_path):
    update_manifest(tmp_path, "a", {"x": 1})
    update_manifest(tmp_path, "b", {"y": [1, 2]})
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["a"] == {"x": 1} and manifest["b"] == {"y": [1, 2]}
