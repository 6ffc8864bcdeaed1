import os
import signal
import subprocess
import sys
import time
from pathlib import Path

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


@pytest.mark.parametrize("values, match", [  # the messages of advkit._checks, the library's own validators
    ({"epochs": -1}, "parameter epochs must be an integer >= 1, got -1"),
    ({"model": "resnet33"}, "model='resnet33' is not available; choose one of .*resnet32"),
    ({"epochs": "ten"}, "epochs must be an integer >= 1, got 'ten'"),
    ({"lr": True}, "lr must be a finite number > 0, got True"),
    ({"learning_rate": 0.1}, "unknown parameter 'learning_rate'.*lr"),
    ({"dataset": "imagenet"}, "dataset='imagenet'.*cifar10"),
    ({"pgd_eps": 1.5}, r"pgd_eps must be a finite number >= 0 and <= 1, got 1.5"),
    ({"pgd_steps": 0}, r"pgd_steps must be an integer in \[1, 100000\], got 0"),
    ({"n_eval": 0}, "n_eval must be an integer >= 1, got 0"),
    ({"eps_grid": [0.0, -1]}, r"eps_grid\[1\] must be a finite number >= 0"),
    ({"robust_resolution": 0.0}, r"robust_resolution must be an integer in \[3, 1000\], got 0.0"),
    ({"at_variants": ["pgd_at", "trades+zz"]}, r"at_variants\[1\]='trades\+zz' is invalid: .*modifier"),
])
def test_bad_parameters_name_themselves(declared, values, match):
    with pytest.raises(ValueError, match=match):
        validate(values, declared)


def test_optional_and_float_parameters_accept_sensible_values(declared):
    validate({"n_train": None, "lr": 1, "data_dir": "/tmp", "run": "2024"}, declared)


def test_parse_assignments_reads_yaml_values():
    assert parse_assignments(["epochs=3", "lr=1e-3", "model=resnet20", "n_train=null", "run=2024"]) == \
        {"epochs": 3, "lr": 1e-3, "model": "resnet20", "n_train": None, "run": "2024"}
    with pytest.raises(ValueError, match="name=value"):
        parse_assignments(["epochs"])
    with pytest.raises(ValueError, match=r"-p 'eps_grid=\[0.1' is not valid YAML"):
        parse_assignments(["eps_grid=[0.1"])


def test_unknown_profile_and_notebook():
    with pytest.raises(ValueError, match="profile='fast'.*quick"):
        load_profile("fast")
    with pytest.raises(ValueError, match="--only 09"):
        notebook_paths(["09"])


# Hostile-user probes (issues 9 and 10): each class is rejected before any notebook starts, with
# exit status 2 and an error line naming every parameter involved.
PROBES = {
    "list element: xu_attacks": (["-p", "xu_attacks=[bogus]"], ["xu_attacks"]),
    "list element: at_variants": (["-p", "at_variants=[bogus]"], ["at_variants"]),
    "list element: sensitivity_norms": (["-p", "sensitivity_norms=[bogus]"], ["sensitivity_norms"]),
    "list element: eps_grid": (["-p", "eps_grid=[2.0,-1]"], ["eps_grid"]),
    "list element: sensitivity_radii": (["-p", "sensitivity_radii=[-1]"], ["sensitivity_radii"]),
    "prefixed: finetune_epochs": (["-p", "finetune_epochs=0"], ["finetune_epochs"]),
    "prefixed: at_batch_size": (["-p", "at_batch_size=0"], ["at_batch_size"]),
    "prefixed: finetune_lr": (["-p", "finetune_lr=-1"], ["finetune_lr"]),
    "prefixed: at_alpha": (["-p", "at_alpha=-1"], ["at_alpha"]),
    "prefixed: stadv_max_flow": (["-p", "stadv_max_flow=-1"], ["stadv_max_flow"]),
    "prefixed: robust_n_images": (["-p", "robust_n_images=0"], ["robust_n_images"]),
    "non-finite: lr=inf": (["-p", "lr=.inf"], ["lr"]),
    "non-finite: span=nan": (["-p", "span=nan"], ["span"]),
    "too large: resolution": (["-p", "resolution=100000"], ["resolution"]),
    "too large: line_resolution": (["-p", "line_resolution=100000000"], ["line_resolution"]),
    "beyond training: keep_epochs": (["-p", "keep_epochs=[2,40]"], ["keep_epochs", "at_epochs"]),
    "above data: n_images (digits test)": (["-p", "n_images=361"], ["n_images", "dataset"]),
    "above data: n_train (digits train)": (["-p", "n_train=1438"], ["n_train", "dataset"]),
    "above data: n_eval (CIFAR-10 test)": (["--profile", "paper", "-p", "n_eval=10001"], ["n_eval", "dataset"]),
    "above data: n_val beside n_robust_test": (["-p", "n_val=101"], ["n_val", "n_robust_test"]),
    "cross: radius vs resolution": (["-p", "resolution=11"], ["radius", "resolution", "span"]),
    "cross: radius vs line_resolution": (["-p", "line_resolution=5"], ["radius", "line_resolution"]),
    "cross: n_autoattack vs n_eval": (["-p", "n_eval=100", "-p", "n_autoattack=200"], ["n_autoattack", "n_eval"]),
    "cross: robust_n_images vs n_images": (["-p", "robust_n_images=300"], ["robust_n_images", "n_images"]),
    "cross: pretrained_checkpoint vs dataset": (["-p", "pretrained_checkpoint=x.th"], ["pretrained_checkpoint",
                                                                                     "dataset", "model"]),
    "cross: sensitivity reference": (["-p", "sensitivity_norms=[layer]"], ["sensitivity_norms"]),
    "confidence_model not in the run": (["-p", "confidence_model=resnet"], ["confidence_model", "at_variants"]),
    "run name: ../x": (["-p", "run=../x"], ["run"]),
    "run name: .": (["-p", "run=."], ["run"]),
    "YAML syntax in -p": (["-p", "eps_grid=[0.1"], ["eps_grid"]),
    "empty --only": (["--only", ""], ["--only"]),
    "empty --only ,": (["--only", ","], ["--only"]),
}


@pytest.mark.parametrize("argv, names", PROBES.values(), ids=PROBES.keys())
def test_cli_rejects_each_probe_naming_its_parameters(tmp_run, capsys, argv, names):
    with pytest.raises(SystemExit) as exit_:
        pipeline.main(["run", *argv])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and all(n in err[-1] for n in names), err
    assert not (tmp_run / "runs").exists()  # rejected before the run folder is made


def test_cli_rejects_cuda_without_a_gpu(tmp_run, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(SystemExit):
        pipeline.main(["run", "-p", "device=cuda"])
    assert "device='cuda'" in capsys.readouterr().err


def test_cli_rejects_a_broken_profile(tmp_path, monkeypatch, capsys):
    (tmp_path / "broken.yaml").write_text("epochs: [1\n")
    monkeypatch.setattr(pipeline, "PROFILES_DIR", tmp_path)
    with pytest.raises(SystemExit) as exit_:
        pipeline.main(["run", "--profile", "broken"])
    assert exit_.value.code == 2 and "error: profile 'broken'" in capsys.readouterr().err


def test_numeric_run_name_is_a_name(tmp_run):
    declared = notebook_parameters(notebook_paths())
    values = parse_assignments(["run=2024"])
    validate(values, declared)
    assert values["run"] == "2024"


def test_cli_rejects_bad_parameter_before_importing_torch():
    """A real `python -m advkit` start rejects a bad value or rule with the torch-free declarations
    (advkit.params), so in well under a second; `python -m advkit` itself exits 2."""
    code = ("import sys\nfrom advkit.pipeline import main\ntry:\n    main(sys.argv[1:])\n"
            "except SystemExit as e:\n    print(e.code, 'torch' in sys.modules)\n")
    for bad in ("epochs=-1", "xu_attacks=[bogus]", "resolution=11"):
        argv = ["run", "--profile", "quick", "-p", bad]
        proc = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=60)
        assert proc.stdout.split() == ["2", "False"] and bad.split("=")[0] in proc.stderr.splitlines()[-1], proc
    proc = subprocess.run([sys.executable, "-m", "advkit", "run", "-p", "epochs=-1"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2 and proc.stderr.splitlines()[-1].startswith("error: parameter epochs")


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc")
def test_killed_driver_stops_its_kernel(tmp_path):
    env = {**os.environ, "ADVKIT_RUNS_DIR": str(tmp_path / "runs"), "ADVKIT_FIGURES_DIR": str(tmp_path / "fig"),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "advkit", "run", "--only", "01", "-p", "epochs=500",
                             "-p", "run=killed"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert "01_train started" in proc.stdout.readline()
        history = tmp_path / "runs" / "killed" / "history" / "base.csv"
        deadline = time.monotonic() + 120
        while not history.exists() and time.monotonic() < deadline:  # the kernel is training
            time.sleep(0.5)
        kernels = [k for k in _children(proc.pid) if _running(k)]
        assert history.exists() and kernels
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 143
        time.sleep(3)
        assert not any(_running(k) for k in kernels)
        size = history.stat().st_size
        time.sleep(2)
        assert history.stat().st_size == size  # nothing writes any more
        assert "stopped (SIGTERM)" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.parametrize("profile", ["quick", "paper"])
def test_run_gives_each_notebook_every_parameter_it_declares_from_the_profile(tmp_run, monkeypatch, declared, profile):
    """Each profile is complete, so a notebook gets a value for every parameter of its cell, and
    the value is the profile's (or the override's): none is left to the cell's quick default."""
    calls = {}
    monkeypatch.setattr(pipeline, "_execute", lambda path, out, parameters, log_output: calls.update({path.stem: parameters}))
    pipeline.run(profile, overrides={"epochs": 2})
    values = {**load_profile(profile), "epochs": 2}
    assert list(calls) == [p.stem for p in notebook_paths()]
    for nb, parameters in calls.items():
        assert set(parameters) == set(declared[nb]), nb
        assert all(parameters[k] == values[k] for k in parameters if k not in pipeline.PATH_PARAMETERS), nb


def test_refresh_executes_the_notebooks_in_place_with_their_defaults(monkeypatch):
    calls = []
    monkeypatch.setattr(pipeline, "_execute", lambda path, out, parameters, log_output: calls.append((path, out, parameters)))
    pipeline.main(["refresh", "--only", "02,4"])
    assert [(p.stem, o == p, par) for p, o, par in calls] == [("02_attack", True, {}), ("04_visualize", True, {})]


def test_pipeline_runs_notebook_01(tmp_run, capfd):
    out = pipeline.run("quick", only=["01"], overrides={"epochs": 2, "run": "smoke"})
    printed = capfd.readouterr()  # the kernel's stderr too
    assert "without encryption" not in printed.err and "KeyboardInterrupt" not in printed.err, printed.err
    assert f"01_train started -> {out / 'notebooks' / '01_train.ipynb'}" in printed.out
    assert "01_train done in" in printed.out
    assert (out / "notebooks" / "01_train.ipynb").exists() and (out / "models" / "base.pt").exists()
    assert (tmp_run / "figures" / "01_learning_curves.png").exists()
    import json
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["pipeline"]["parameters"]["epochs"] == 2 and manifest["pipeline"]["environment"]["versions"]["torch"]
