import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from advkit.models import get_model
from advkit.runs import run as runs
from advkit.runs.artifacts import CorruptArtifactError, atomic_path, checksum_path, file_sha256, verified
from advkit.runs.checkpoints import load_model, save_model
from advkit.runs.run import Run, epoch_name, is_epoch_name, list_models, run_dir, update_manifest


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
    assert sorted(p.name for p in tmp_path.iterdir()) == [".advkit.lock", "f.txt", "f.txt.sha256"]  # the commit's lock
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


# --- the run object: one name per artifact ---------------------------------------------------------


def test_run_names_every_artifact(tmp_path):
    run = Run(tmp_path)
    names = {
        run.model("base"): "models/base.pt", run.early_model("pgd_at"): "models/pgd_at_early.pt",
        run.epoch_model("pgd_at", 2): "models/pgd_at_e002.pt", run.training_state("fgsm"): "checkpoints/fgsm.state.pt",
        run.finetune_settings("fgsm"): "checkpoints/fgsm.xu.json", run.history("trades"): "history/trades.csv",
        run.attack_table("table2_ssim_distance"): "attacks/table2_ssim_distance.csv",
        run.attack_table("budgets", ".json"): "attacks/budgets.json",
        run.augmentation("pgd"): "attacks/augment_pgd.pt", run.augmentation("pgd", ".json"): "attacks/augment_pgd.json",
        run.surface("base", "filter_1_2d"): "landscapes/base_filter_1_2d.nc",
        run.landscape_table("sharpness"): "landscapes/sharpness.csv", run.flatness: "flatness.csv",
        run.correlations: "correlations.csv", run.manifest: "manifest.json",
        run.reported("xu_table1"): "reported_vs_reproduced/xu_table1.csv",
    }
    assert {str(path.relative_to(tmp_path)): name for path, name in names.items()} == {n: n for n in names.values()}
    assert epoch_name("pgd_at", 12) == "pgd_at_e012" and is_epoch_name("pgd_at_e012") and not is_epoch_name("pgd_at")


def test_run_is_path_like_and_named_in_the_runs_folder(tmp_run):
    run = Run.named("r")
    assert Path(run) == tmp_run / "runs" / "r" and run / "x" == tmp_run / "runs" / "r" / "x"
    assert Run.of(run) is run and Run.of(str(tmp_run / "runs" / "r")) == run


def test_write_table_is_atomic_and_read_table_verifies(tmp_path):
    run = Run(tmp_path)
    path = run.attack_table("table1_accuracy")
    table = pd.DataFrame({"fgsm": [0.25, 0.5]}, index=pd.Index(["base", "pgd"], name="model"))
    run.write_table(path, table)
    assert checksum_path(path).read_text().split() == [file_sha256(path), path.name]
    pd.testing.assert_frame_equal(run.read_table(path, index_col="model"), table)

    class Breaks:  # a table whose writing fails half-way: the old file stays
        def to_csv(self, tmp, **kw):
            Path(tmp).write_text("half")
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        run.write_table(path, Breaks())
    pd.testing.assert_frame_equal(run.read_table(path, index_col="model"), table)
    assert sorted(p.name for p in path.parent.iterdir()) == [".advkit.lock", "table1_accuracy.csv",
                                                             "table1_accuracy.csv.sha256"]
    path.write_text(path.read_text().replace("0.25", "0.75"))  # edited behind the kit's back
    with pytest.raises(CorruptArtifactError, match=r"table1_accuracy.csv is corrupt.*notebook 02_attack"):
        run.read_table(path)


@pytest.mark.parametrize("artifact, notebook", [
    (lambda r: r.model("base"), "01_train"), (lambda r: r.history("base"), "01_train"),
    (lambda r: r.model("pgd_at_early"), "03_finetune"), (lambda r: r.training_state("trades"), "03_finetune"),
    (lambda r: r.attack_table("table2_ssim_distance"), "02_attack"),
    (lambda r: r.attack_table("budgets", ".json"), "02_attack"),
    (lambda r: r.attack_table("stadv_flow_sweep"), "02_attack"),
    (lambda r: r.attack_table("zoo_table1_accuracy"), "03_finetune"),
    (lambda r: r.augmentation("fgsm"), "03_finetune"),
    (lambda r: r.surface("base", "filter_1_2d"), "04_visualize"),
    (lambda r: r.landscape_table("sharpness"), "04_visualize"),
    (lambda r: r.flatness, "05_flatness_correlation"), (lambda r: r.correlations, "05_flatness_correlation"),
])
def test_a_missing_artifact_names_the_notebook_that_makes_it(tmp_path, artifact, notebook):
    run = Run(tmp_path)
    path = artifact(run)
    with pytest.raises(FileNotFoundError, match=rf"no file at .*{path.name}: re-run notebook {notebook}"):
        run.read_json(path) if path.suffix == ".json" else run.require(path)
    if path.suffix == ".csv":
        with pytest.raises(FileNotFoundError, match=f"notebook {notebook}"):
            run.read_table(path)


def test_run_lists_models_base_first_without_epoch_checkpoints(tmp_path):
    run = Run(tmp_path)
    for name in ("trades", "base", "pgd_at_e002", "fgsm"):
        save_model(run.model(name), get_model("small_cnn", 10, 1, width=4))
    assert run.models() == ["base", "fgsm", "trades"] == list_models(tmp_path)
    assert run.models(epochs=True) == ["base", "fgsm", "pgd_at_e002", "trades"]
    with pytest.raises(FileNotFoundError, match="notebook 01_train"):
        runs.load_models(tmp_path / "empty")


@pytest.mark.parametrize("notebook", ["01_train", "02_attack", "03_finetune"])
def test_notebooks_name_artifacts_through_the_run(notebook):
    """No hand-typed artifact path and no plain (non-atomic, unchecksummed) write or unverified read."""
    import nbformat

    nb = nbformat.read(runs.repo_root() / "notebooks" / f"{notebook}.ipynb", as_version=4)
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    for typed in ('/ "models"', '/ "attacks"', '/ "history"', '/ "checkpoints"', ".to_csv(", "json.loads(",
                  "read_text(", "run_dir("):
        assert typed not in code, f"{notebook}: {typed!r}; name artifacts with advkit.runs.run.Run"


def test_a_read_only_run_folder_is_an_error_naming_it(tmp_run, monkeypatch):
    # A read-only file system (root ignores chmod, so it is simulated) gave a raw OSError traceback.
    import errno

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(Path, "mkdir", read_only)
    with pytest.raises(ValueError, match=f"cannot write the run folder {tmp_run / 'runs' / 'new'}: Read-only file"):
        run_dir("new")
    monkeypatch.undo()
    lock = run_dir("old") / "run.lock"
    monkeypatch.setattr(runs.os, "open", read_only)
    with pytest.raises(ValueError, match=f"cannot write the run folder {lock.parent}: Read-only file system"):
        with runs.one_at_a_time(lock, "python -m advkit run"):
            pass
