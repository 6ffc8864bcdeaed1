import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from advkit.pipeline import driver as pipeline
from advkit.pipeline import params
from advkit.pipeline.driver import check_parameters, load_profile, notebook_paths, parse_assignments


@pytest.fixture(scope="module")
def declared():
    return params.notebook_parameters(notebook_paths())


def test_profiles_are_valid(declared):
    for profile in pipeline.available_profiles():
        check_parameters(load_profile(profile), declared)
    assert load_profile("paper")["model"] == "resnet32" and load_profile("quick")["dataset"] == "digits"


def test_notebook_parameters_are_documented(declared):
    for nb, parameters in declared.items():
        for name, info in parameters.items():
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
        check_parameters(values, declared)


def test_optional_and_float_parameters_accept_sensible_values(declared):
    check_parameters({"n_train": None, "lr": 1, "data_dir": "/tmp", "run": "2024"}, declared)


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
    declared = params.notebook_parameters(notebook_paths())
    values = parse_assignments(["run=2024"])
    check_parameters(values, declared)
    assert values["run"] == "2024"


def test_cli_rejects_bad_parameter_before_importing_torch():
    """A real `python -m advkit` start rejects a bad value or rule with the torch-free declarations
    (advkit.pipeline.params), so in well under a second; `python -m advkit` itself exits 2."""
    code = ("import sys\nfrom advkit.pipeline.driver import main\ntry:\n    main(sys.argv[1:])\n"
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


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc")
def test_killed_driver_stops_its_kernel(tmp_path):
    temp = tmp_path / "tmp"  # the driver's temporary folder: the kernel's IPC sockets and connection file
    temp.mkdir()
    env = {**os.environ, "ADVKIT_RUNS_DIR": str(tmp_path / "runs"), "ADVKIT_FIGURES_DIR": str(tmp_path / "fig"),
           "OMP_NUM_THREADS": "1", "TMPDIR": str(temp)}
    proc = subprocess.Popen([sys.executable, "-m", "advkit", "run", "--only", "01", "-p", "epochs=500",
                             "-p", "run=killed"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert any("01_train started" in line for line in iter(proc.stdout.readline, ""))
        history = tmp_path / "runs" / "killed" / "history" / "base.csv"
        deadline = time.monotonic() + 120
        while not history.exists() and time.monotonic() < deadline:  # the kernel is training
            time.sleep(0.5)
        kernels = [k for k in _children(proc.pid) if _running(k)]
        assert history.exists() and kernels
        kernel_files = sorted(temp.glob(f"advkit-kernel-{proc.pid}-*")) + sorted(temp.glob("tmp*.json"))
        assert len(kernel_files) == 6  # five sockets and the connection file
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 143
        assert not any(f.exists() for f in kernel_files)  # removed by the driver on its way out
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
    monkeypatch.setattr(pipeline, "_execute",
                        lambda path, out, parameters, log_output: calls.update({path.stem: parameters}))
    pipeline.run(profile, overrides={"epochs": 2})
    values = {**load_profile(profile), "epochs": 2}
    assert list(calls) == [p.stem for p in notebook_paths()]
    for nb, parameters in calls.items():
        assert set(parameters) == set(declared[nb]), nb
        assert all(parameters[k] == values[k] for k in parameters if k not in pipeline.PATH_PARAMETERS), nb


def test_refresh_executes_the_notebooks_in_place_with_their_defaults(monkeypatch):
    calls = []
    monkeypatch.setattr(pipeline, "_execute",
                        lambda path, out, parameters, log_output: calls.append((path, out, parameters)))
    pipeline.main(["refresh", "--only", "02,4"])
    assert [(p.stem, o == p, par) for p, o, par in calls] == [("02_attack", True, {}), ("04_visualize", True, {})]


@pytest.mark.slow
def test_pipeline_runs_notebook_01(tmp_run, capfd, monkeypatch):
    monkeypatch.delenv("ADVKIT_FIGURES_DIR")  # as `make run`: the figures go into the run
    figures = Path(pipeline.__file__).resolve().parents[2] / "figures"
    committed = {p: p.stat().st_mtime_ns for p in figures.glob("*")}
    assert committed, f"no committed figures in {figures}"
    out = pipeline.run("quick", only=["01"], overrides={"epochs": 2, "run": "smoke"})
    printed = capfd.readouterr()  # the kernel's stderr too
    assert "without encryption" not in printed.err and "KeyboardInterrupt" not in printed.err, printed.err
    assert f"01_train started -> {out / 'notebooks' / '01_train.ipynb'}" in printed.out
    assert "01_train done in" in printed.out
    assert (out / "notebooks" / "01_train.ipynb").exists() and (out / "models" / "base.pt").exists()
    assert (out / "figures" / "01_learning_curves.png").exists()
    assert {p: p.stat().st_mtime_ns for p in committed} == committed  # the checkout's figures/ untouched
    import json
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["pipeline"]["parameters"]["epochs"] == 2
    assert manifest["pipeline"]["environment"]["versions"]["torch"]


def test_a_run_draws_its_figures_into_the_run_and_never_into_the_committed_figures(tmp_run, monkeypatch):
    """Without ADVKIT_FIGURES_DIR (as `make run`), the kernels get runs/<run>/figures/, so running the
    pipeline leaves the checkout clean; a folder given is kept; the variable is restored afterwards."""
    seen = []
    monkeypatch.setattr(pipeline, "_execute", lambda *args, **kwargs: seen.append(os.environ.get("ADVKIT_FIGURES_DIR")))
    monkeypatch.delenv("ADVKIT_FIGURES_DIR")
    out = pipeline.run("quick", only=["01", "03"], overrides={"run": "clean_tree"})
    assert seen == [str(out / "figures")] * 2 and out == tmp_run / "runs" / "clean_tree"
    assert "ADVKIT_FIGURES_DIR" not in os.environ
    monkeypatch.setenv("ADVKIT_FIGURES_DIR", str(tmp_run / "mine"))
    pipeline.run("quick", only=["01"], overrides={"run": "clean_tree"})
    assert seen[-1] == str(tmp_run / "mine") and os.environ["ADVKIT_FIGURES_DIR"] == str(tmp_run / "mine")


# ---------------------------------------------------------------- hostile values
def _alias_bomb(depth: int) -> str:
    """A YAML list of `depth` + 1 anchored lists, each of nine aliases of the one before: 9**depth values."""
    levels = ["&a0 [" + ",".join(["lol"] * 9) + "]"]
    levels += [f"&a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, depth + 1)]
    return "[" + ", ".join(levels) + "]"


@pytest.mark.parametrize("name", ["run", "eps_grid", "at_variants"])
def test_a_yaml_alias_bomb_is_refused_with_a_short_message(name, capsys):
    for depth in (5, 9):  # 9**5 values already made a message of megabytes; 9**9 never ended
        with pytest.raises(ValueError, match="expand to more than 10000 values") as err:
            parse_assignments([f"{name}={_alias_bomb(depth)}"])
        assert len(str(err.value)) < 500
    with pytest.raises(SystemExit) as exit_:
        pipeline.main(["run", "-p", f"{name}={_alias_bomb(9)}"])
    printed = capsys.readouterr().err
    assert exit_.value.code == 2 and printed.startswith("error: -p ") and len(printed) < 500


def test_long_values_are_cut_in_messages(declared):
    with pytest.raises(ValueError) as err:
        check_parameters({"eps_grid": [0.1] * 5000 + [2.0]}, declared)
    assert "eps_grid[5000] must be a finite number" in str(err.value)
    for values in ({"dataset": ["x"] * 5000}, {"run": ["x" * 10_000]}, {"x" * 10_000: 1}):
        with pytest.raises(ValueError) as err:
            check_parameters(values, declared)
        assert len(str(err.value)) < 2000, values.keys()


def test_text_parameters_are_read_as_the_text_written(tmp_path, monkeypatch):
    assert parse_assignments(["run=2024-01-01"]) == {"run": "2024-01-01"}
    assert parse_assignments(["run=no"]) == {"run": "no"}
    assert parse_assignments(["eigen_map_models=[no, 2024-01-01, base]", "data_dir=null", "at_model=null"]) == \
        {"eigen_map_models": ["no", "2024-01-01", "base"], "data_dir": None, "at_model": None}
    assert parse_assignments(["log_scale=no", "seed=7"]) == {"log_scale": False, "seed": 7}  # others keep YAML's types
    text = (pipeline.PROFILES_DIR / "quick.yaml").read_text()
    (tmp_path / "dated.yaml").write_text(text.replace("run: quick", "run: 2024-01-01"))
    monkeypatch.setattr(pipeline, "PROFILES_DIR", tmp_path)
    assert load_profile("dated")["run"] == "2024-01-01"


@pytest.mark.parametrize("assignment, names", [
    ("seed=4294967296", ["seed"]),  # numpy's seeds are 32-bit
    ("direction_seed=4294967296", ["direction_seed"]),
    ("run=" + "r" * 300, ["run", "bytes"]),  # a folder name: 255 bytes at most
    ("model_suffix=_" + "x" * 200, ["model_suffix"]),
    ("stadv_flow_grid=[0.2, 100]", ["stadv_flow_grid", "dataset", "8 pixels"]),  # stAdv's bound <= the image side
    ("stadv_max_flow=9", ["stadv_max_flow", "dataset"]),
    ("eigen_map_models=[base, bogus]", ["eigen_map_models", "'bogus'"]),  # notebook 04 dropped unknown names
    ("data_dir=" + "d" * 300, ["data_dir", "is not a folder"]),  # pathlib raised OSError: File name too long
])
def test_values_that_failed_inside_a_notebook_are_refused_before_it(tmp_run, declared, assignment, names):
    with pytest.raises(ValueError) as err:
        check_parameters({**load_profile("quick"), **parse_assignments([assignment])}, declared)
    assert all(n in str(err.value) for n in names), str(err.value)


def test_eigen_map_models_may_name_the_models_the_run_has(tmp_run, declared):
    check_parameters({**load_profile("quick"), "eigen_map_models": ["base", "trades_e004", "pgd_at"]}, declared)
    with pytest.raises(ValueError, match="eigen_map_models"):
        check_parameters({**load_profile("quick"), "eigen_map_models": ["mine"]}, declared)
    models = tmp_run / "runs" / "quick" / "models"
    models.mkdir(parents=True)
    (models / "mine.pt").write_bytes(b"")
    check_parameters({**load_profile("quick"), "eigen_map_models": ["mine"]}, declared)


def test_a_later_notebook_refuses_another_dataset_than_the_base_models(tmp_run, monkeypatch, capsys):
    # `--only 02 -p dataset=cifar10` on a run whose 01 trained on digits failed in torch's conv2d 46 s in.
    from advkit.runs.run import run_dir, update_manifest

    update_manifest(run_dir("quick"), "01_train", {"dataset": "digits", "model": "small_cnn", "seed": 0})
    monkeypatch.setattr(pipeline, "_execute", lambda *a, **k: pytest.fail("a refused run executed a notebook"))
    for assignment, name, wanted, trained in (("dataset=cifar10", "dataset", "'cifar10'", "'digits'"),
                                              ("model=resnet20", "model", "'resnet20'", "'small_cnn'")):
        with pytest.raises(SystemExit) as exit_:
            pipeline.main(["run", "--only", "02,4", "-p", assignment])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and f"error: parameter {name}={wanted}" in err, err
        assert f"01_train with {name}={trained}" in err
    calls = []
    monkeypatch.setattr(pipeline, "_execute", lambda path, out, parameters, log_output: calls.append(path.stem))
    pipeline.run("quick", only=["02"])  # the base model's dataset: runs
    pipeline.run("quick", only=["01", "02"], overrides={"dataset": "cifar10"})  # 01 trains it again: runs
    assert calls == ["02_attack", "01_train", "02_attack"]


def test_a_profile_sets_every_parameter_once(tmp_path, monkeypatch):
    text = (pipeline.PROFILES_DIR / "quick.yaml").read_text()
    (tmp_path / "partial.yaml").write_text("run: partial\nepochs: 3\nmodel: resnet20\n")
    (tmp_path / "twice.yaml").write_text(text + "\nepochs: 7\n")
    (tmp_path / "whole.yaml").write_text(text)
    monkeypatch.setattr(pipeline, "PROFILES_DIR", tmp_path)
    assert load_profile("whole")["run"] == "quick"
    with pytest.raises(ValueError, match=r"profile 'partial' .* does not set .*batch_size.*every parameter"):
        load_profile("partial")
    with pytest.raises(ValueError, match=r"profile 'twice' .*line \d+.*key 'epochs' is repeated \(first on line \d+\)"):
        load_profile("twice")
