import subprocess
import sys
import time

import pytest

from advkit import pipeline
from advkit.pipeline import load_profile, notebook_parameters, notebook_paths, parse_assignments, validate


@pytest.fixture(scope="module")
def declared():
    return notebook_parameters(notebook_paths())


def test_profiles_are_valid(declared):
    for profile in pipeline.available_profiles():
        validate(load_profile(profile), declared)
    assert load_profile("paper")["model"] == "resnet32" and load_profile("quick")["dataset"] == "digits"


def test_notebook_parameters_are_documented(declared):
    for nb, params in declared.items():
        for name, info in params.items():
            assert info["inferred_type_name"] not in (None, "None"), f"{nb}: {name} lacks a type annotation"
            assert info["help"], f"{nb}: {name} lacks a # comment"


@pytest.mark.parametrize("values, match", [
    ({"epochs": -1}, "epochs=-1 is out of range: must be >= 1"),
    ({"model": "resnet33"}, "model='resnet33' is out of range: must be one of .*resnet32"),
    ({"epochs": "ten"}, "epochs='ten' has the wrong type: expected int"),
    ({"lr": True}, "lr=True has the wrong type"),
    ({"learning_rate": 0.1}, "unknown parameter 'learning_rate'.*lr"),
    ({"dataset": "imagenet"}, "dataset='imagenet'.*cifar10"),
    ({"pgd_eps": 1.5}, r"pgd_eps=1.5 is out of range: must be in \[0, 1\]"),
    ({"pgd_steps": 0}, "pgd_steps=0 is out of range"),
    ({"n_eval": 0}, "n_eval=0 is out of range"),
])
def test_bad_parameters_name_themselves(declared, values, match):
    with pytest.raises(ValueError, match=match):
        validate(values, declared)


def test_optional_and_float_parameters_accept_sensible_values(declared):
    validate({"n_train": None, "lr": 1, "data_dir": "/tmp/x"}, declared)


def test_parse_assignments_reads_yaml_values():
    assert parse_assignments(["epochs=3", "lr=1e-3", "model=resnet20", "n_train=null"]) == \
        {"epochs": 3, "lr": 1e-3, "model": "resnet20", "n_train": None}
    with pytest.raises(ValueError, match="name=value"):
        parse_assignments(["epochs"])


def test_unknown_profile_and_notebook():
    with pytest.raises(ValueError, match="profile='fast'.*quick"):
        load_profile("fast")
    with pytest.raises(ValueError, match="--only 09"):
        notebook_paths(["09"])


def test_cli_rejects_bad_parameter_fast():
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "advkit", "run", "--profile", "quick", "-p", "epochs=-1"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "epochs=-1" in proc.stderr
    assert time.perf_counter() - t0 < 10  # before any notebook starts


def test_pipeline_runs_notebook_01(tmp_run):
    out = pipeline.run("quick", only=["01"], overrides={"epochs": 2, "run": "smoke"})
    assert (out / "notebooks" / "01_train.ipynb").exists() and (out / "models" / "base.pt").exists()
    assert (tmp_run / "figures" / "01_learning_curves.png").exists()
    import json
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["pipeline"]["parameters"]["epochs"] == 2 and manifest["pipeline"]["environment"]["versions"]["torch"]
