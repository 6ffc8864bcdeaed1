"""`python -m advkit sweep` (issue 13): the zoo's cells as submitit jobs, here with the local executor.

One tiny run (notebooks 01-02 on a few digits) serves the notebook tests: a 2x2 grid, its re-run
(no job), a killed cell that resumes, a failing cell reported by name. The 100-cell test runs the
same bookkeeping with a placeholder job payload instead of papermill.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import psutil
import pytest

from advkit.pipeline import driver as pipeline
from advkit.pipeline import jobs, params, sweep
from advkit.runs.run import Run

RUN = "sw"
# notebooks 01-02 on 200 digits, one epoch: the prerequisites of the sweep's cells
PREREQUISITES = {"n_train": 200, "epochs": 1, "n_eval": 40, "n_autoattack": 20, "stadv_steps": 3, "aa_steps": 2,
                 "stadv_flow_grid": [0.2], "eps_grid": [0.0, 0.0627], "xu_pgd_steps": 2}
# one adversarial-training epoch per cell, small evaluation subsets
TINY = {**PREREQUISITES, "at_epochs": 1, "keep_epochs": [], "n_robust_train": 50, "n_robust_test": 40, "n_val": 20,
        "epoch_steps": 2, "at_steps": 1, "early_stop_steps": 1}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Notebooks 01 and 02 of the quick profile, tiny, in a run of a temporary runs folder."""
    root = tmp_path_factory.mktemp("sweep")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ADVKIT_RUNS_DIR", str(root / "runs"))
        mp.setenv("ADVKIT_FIGURES_DIR", str(root / "figures"))
        pipeline.run("quick", ["01", "02"], {**PREREQUISITES, "run": RUN})
        yield Run.named(RUN)


def submitted(run: Run) -> int:
    return len(list((run / "sweep" / "submitit").glob("*_submitted.pkl")))


def cli(*argv: str) -> list[str]:
    args = [f"-p{k}={v}" for k, v in TINY.items()]
    return [sys.executable, "-m", "advkit", "sweep", "--run", RUN, *args, *argv]


# ---------------------------------------------------------------- the grid, without jobs
def test_axes_read_like_parameters_and_cells_name_their_models(tmp_run):
    declared = params.notebook_parameters(pipeline.notebook_paths())["03_finetune"]
    axes = sweep.parse_axes(["at_variants=pgd_at,pgd_at+ls0.1", "seed=0,1", "keep_epochs=[1],[1,2]"], declared)
    assert axes == {"at_variants": [["pgd_at"], ["pgd_at+ls0.1"]], "seed": [0, 1], "keep_epochs": [[1], [1, 2]]}
    cells = sweep.plan("quick", {k: axes[k] for k in ("at_variants", "seed")}, {}, "x")
    assert [c.name for c in cells] == ["pgd_at_s0", "pgd_at_s1", "pgd_at+ls0.1_s0", "pgd_at+ls0.1_s1"]
    first = cells[0]
    assert first.values == {"at_variants": ["pgd_at"], "seed": 0, "zoo_parts": ["at"], "model_suffix": "_s0"}
    assert first.models == ("pgd_at_s0", "pgd_at_s0_early", "pgd_at_s0_e002", "pgd_at_s0_e004")
    # an axis of neither part trains both; xu_attacks names the fine-tunes
    both = sweep.plan("quick", {"seed": [3]}, {"xu_attacks": ["fgsm"], "at_variants": ["awp"]}, "x")[0]
    assert both.values["zoo_parts"] == ["xu", "at"] and both.models[:2] == ("fgsm_s3", "awp_s3")
    # the seed tag comes last whatever the axes' order, so advkit.runs.run.split_seed finds the replicate
    mixed = sweep.plan("quick", {"seed": [1], "at_eps": [0.03]}, {"at_variants": ["pgd_at"]}, "x")[0]
    assert mixed.name == "at_eps0.03_s1" and mixed.models[0] == "pgd_at_at_eps0.03_s1"


@pytest.mark.parametrize("grid, fixed, match", [
    (["bogus=1,2"], {}, "'bogus' is not a parameter of notebook 03"),
    (["run=a,b"], {}, "sets run itself"),
    (["seed=0,0"], {}, "repeats"),
    (["seed=0,-1"], {}, r"sweep cell s-1 .*seed must be an integer in \[0, 4294967295\], got -1"),
    (["at_epochs=1,2"], {}, r"keep_epochs .* beyond at_epochs"),  # a cross-parameter rule, per cell
    (["at_variants=pgd_at,bogus"], {}, r"at_variants\[0\]='bogus'"),
    (["at_eps=0.01,0.02"], {"zoo_parts": ["at", "report"]}, "'report' is the whole zoo's"),
])
def test_bad_cells_are_refused_before_any_job(tmp_run, grid, fixed, match):
    declared = params.notebook_parameters(pipeline.notebook_paths())["03_finetune"]
    with pytest.raises(ValueError, match=match):
        sweep.plan("quick", sweep.parse_axes(grid, declared), fixed, "x")


def test_cells_that_would_share_a_model_file_are_refused(tmp_run):
    with pytest.raises(ValueError, match="would both write models/pgd_at.pt"):
        sweep.plan("quick", {"at_variants": [["pgd_at"], ["pgd_at", "trades"]]}, {}, "x")


def test_job_settings_from_the_profile_and_the_command_line():
    paper = jobs.JobSettings.of(pipeline.load_sweep_section("paper"), mem="64G", jobs_per_gpu=4)
    assert (paper.gpus_per_job, paper.time, paper.mem, paper.jobs_per_gpu) == (1, "12:00:00", "64G", 4)
    assert jobs.minutes("1-02:03:00") == 1563 and jobs.minutes("90") == 90 and jobs.memory_gb("512M") == 0.5
    with pytest.raises(ValueError, match="unknown"):
        jobs.JobSettings.of({"gpus": 2})
    with pytest.raises(ValueError, match="time="):
        jobs.JobSettings(time="soon")
    with pytest.raises(ValueError, match="jobs_per_gpu"):
        jobs.JobSettings(jobs_per_gpu=0)
    assert "sweep" not in pipeline.load_profile("paper")  # job settings are not notebook parameters


def test_slurm_jobs_get_the_settings(tmp_path, monkeypatch):
    """The sbatch header submitit writes (a stand-in `srun` on PATH: no cluster here)."""
    with pytest.raises(ValueError, match="--executor slurm: .*srun"):
        monkeypatch.setenv("PATH", str(tmp_path / "empty"))
        jobs.make_executor("slurm", tmp_path / "jobs", jobs.JobSettings())
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "srun").write_text("#!/bin/sh\nexit 0\n")
    (tmp_path / "bin" / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    settings = jobs.JobSettings.of(pipeline.load_sweep_section("paper"), partition="gpu", time="1-00:00:00",
                                   max_parallel=6)
    executor = jobs.make_executor("slurm", tmp_path / "jobs", settings)
    header = executor._executor._make_submission_file_text("true", "x")  # submitit's sbatch script
    for line in ("--partition=gpu", "--gpus-per-node=1", "--cpus-per-task=8", "--mem=32GB", "--time=1440"):
        assert f"#SBATCH {line}\n" in header
    assert executor._executor.parameters["array_parallelism"] == 6


def test_missing_prerequisites_name_the_notebook_before_any_job(tmp_run, capsys):
    with pytest.raises(SystemExit) as exit_:
        sweep.main(["-g", "seed=0,1", "--run", "empty"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "run 'empty' does not exist" in err and "--only 01,02 -p run=empty" in err
    assert not Run.named("empty", create=False).root.exists()
    Run.named("half").attack_table("budgets", ".json")  # a run without notebook 01's model
    with pytest.raises(SystemExit):
        sweep.main(["-g", "seed=0,1", "--run", "half"])
    assert "re-run notebook 01_train" in capsys.readouterr().err and not (Run.named("half") / "sweep").exists()


# ---------------------------------------------------------------- notebook 03 as jobs
@pytest.mark.slow
def test_a_2x2_grid_trains_each_cell_once_and_a_rerun_does_no_work(prepared):
    state = sweep.sweep("quick", {"at_variants": [["pgd_at"], ["trades"]], "seed": [0, 1]}, TINY, RUN)
    cells = ["pgd_at_s0", "pgd_at_s1", "trades_s0", "trades_s1"]
    assert {n: c["status"] for n, c in state["cells"].items()} == dict.fromkeys(cells, "done")
    models = prepared.models()
    for cell in cells:
        assert models.count(cell) == 1 and models.count(f"{cell}_early") == 1
        assert Path(state["cells"][cell]["notebook"]).is_file()  # the executed notebook is the cell's log
    assert prepared.read_json(prepared / "sweep" / "sweep.json")["cells"]["trades_s1"]["job_id"]
    before = submitted(prepared)
    again = sweep.sweep("quick", {"at_variants": [["pgd_at"], ["trades"]], "seed": [0, 1]}, TINY, RUN)
    assert {c["status"] for c in again["cells"].values()} == {"skipped"} and submitted(prepared) == before


@pytest.mark.slow
def test_a_killed_cell_resumes_from_its_checkpoint(prepared):
    """Kill the sweep and its job (kernel included) after the first epoch; the re-run resumes."""
    name, epochs = "pgd_at_s7", 12
    first_epoch = prepared.epoch_model(name, 1)
    proc = subprocess.Popen(cli("-g", "at_variants=pgd_at", "-g", "seed=7", "-p", f"at_epochs={epochs}",
                                "-p", "keep_epochs=[1]"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not (first_epoch.exists() and prepared.training_state(name).exists()):
        assert proc.poll() is None and time.monotonic() < deadline, "the job ended before its first checkpoint"
        time.sleep(0.1)
    tree = psutil.Process(proc.pid).children(recursive=True) + [psutil.Process(proc.pid)]
    for p in tree:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    proc.wait()
    psutil.wait_procs(tree, timeout=10)
    for p in tree:  # the killed kernel's IPC socket files (advkit.pipeline names them by its driver)
        for leftover in Path(tempfile.gettempdir()).glob(f"advkit-kernel-{p.pid}-*"):
            leftover.unlink(missing_ok=True)
    assert not prepared.model(name).exists(), "the job finished before it was killed"
    written = first_epoch.stat().st_mtime_ns
    state = sweep.sweep("quick", {"at_variants": [["pgd_at"]], "seed": [7]},
                        {**TINY, "at_epochs": epochs, "keep_epochs": [1]}, RUN)
    assert state["cells"][name]["status"] == "done" and len(state["cells"][name]["history"]) == 2
    assert first_epoch.stat().st_mtime_ns == written  # epoch 1 was not trained again: resumed
    assert len(prepared.read_table(prepared.history(name))) == epochs


@pytest.mark.slow
def test_a_failing_cell_is_reported_by_name_with_its_notebook(prepared):
    broken = prepared.training_state("trades_s9")
    broken.parent.mkdir(parents=True, exist_ok=True)
    broken.write_bytes(b"not a checkpoint")
    proc = subprocess.run(cli("-g", "at_variants=trades", "-g", "seed=9"), capture_output=True, text=True)
    assert proc.returncode == 1, proc.stderr
    notebook = prepared / "sweep" / "trades_s9.ipynb"
    assert "FAILED trades_s9: " in proc.stdout and str(notebook) in proc.stdout and notebook.is_file()
    state = prepared.read_json(prepared / "sweep" / "sweep.json")
    assert state["cells"]["trades_s9"]["status"] == "failed" and "trades_s9" in state["cells"]["trades_s9"]["error"]


# ---------------------------------------------------------------- the bookkeeping at scale
@pytest.mark.slow
def test_a_hundred_placeholder_jobs_keep_their_books(tmp_run):
    run = Run.named("hundred")
    from advkit.runs.artifacts import write_json

    run.model("base").parent.mkdir(parents=True, exist_ok=True)
    write_json(run.model("base"), {})  # the prerequisites' files, checksummed
    write_json(run.attack_table("budgets", ".json"), {})
    axes, fixed = {"seed": list(range(100))}, {"at_variants": ["pgd_at"], "keep_epochs": []}
    settings = jobs.JobSettings(max_parallel=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # placeholder models carry no checksum
        state = sweep.sweep("quick", axes, fixed, "hundred", settings=settings, cell_function=jobs.placeholder_cell)
        assert len(state["cells"]) == 100 and sweep.failures(state).keys() == {"s13"}
        assert "notebook: " + str(run / "sweep" / "s13.ipynb") in sweep.summary(state)
        assert len({c["job_id"] for c in state["cells"].values()}) == 100 == submitted(run)
        assert len([m for m in run.models() if m.startswith("pgd_at_s") and not m.endswith("early")]) == 99
        again = sweep.sweep("quick", axes, fixed, "hundred", settings=settings, cell_function=jobs.placeholder_cell)
    assert submitted(run) == 101  # only the failed cell ran again
    assert [n for n, c in again["cells"].items() if c["status"] != "skipped"] == ["s13"]
    assert again["cells"]["s13"]["history"] == state["cells"]["s13"]["history"] + [again["cells"]["s13"]["history"][-1]]


@pytest.mark.slow
def test_jobs_per_gpu_packs_cells_into_one_job(tmp_run):
    run = Run.named("packed")
    from advkit.runs.artifacts import write_json

    run.model("base").parent.mkdir(parents=True, exist_ok=True)
    write_json(run.model("base"), {})
    write_json(run.attack_table("budgets", ".json"), {})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        state = sweep.sweep("quick", {"seed": [0, 1, 2]}, {"at_variants": ["pgd_at"], "keep_epochs": []}, "packed",
                            settings=jobs.JobSettings(jobs_per_gpu=2), cell_function=jobs.placeholder_cell)
    ids = [c["job_id"] for c in state["cells"].values()]
    assert ids[0] == ids[1] != ids[2] and submitted(run) == 2
    assert {c["status"] for c in state["cells"].values()} == {"done"}


# ---------------------------------------------------------------- hostile grids and signals
def test_cells_are_validated_as_they_will_run(tmp_run):
    """Every cell sets keep_epochs itself, so the profile's own [2, 4] beyond at_epochs=2 does not count."""
    declared = params.notebook_parameters(pipeline.notebook_paths())["03_finetune"]
    cells = sweep.plan("quick", sweep.parse_axes(["keep_epochs=[1],[2]"], declared), {"at_epochs": 2}, "x")
    assert [c.values["keep_epochs"] for c in cells] == [[1], [2]]
    with pytest.raises(ValueError, match=r"sweep cell keep_epochs3 .*keep_epochs \[3\] lie beyond at_epochs"):
        sweep.plan("quick", sweep.parse_axes(["keep_epochs=[1],[3]"], declared), {"at_epochs": 2}, "x")


def test_hostile_axis_values_give_short_names_and_messages(tmp_run):
    declared = params.notebook_parameters(pipeline.notebook_paths())["03_finetune"]
    levels = ["&a0 [" + ",".join(["lol"] * 9) + "]"] + [f"&a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]"
                                                        for i in range(1, 10)]
    with pytest.raises(ValueError, match="expand to more than 10000 values") as err:
        sweep.parse_axes(["at_variants=[" + ", ".join(levels) + "]"], declared)
    assert len(str(err.value)) < 500
    long = [0.001 + i * 1e-12 for i in range(40)]  # 40 budgets as one list value: a long tag
    cells = sweep.plan("quick", {"eps_grid": [long, long[:39]], "seed": [0]}, {"at_variants": ["pgd_at"]}, "x")
    names = [c.name for c in cells]
    assert len(set(names)) == 2 and all(len(n) <= sweep.MAX_CELL_NAME for n in names)
    assert all(n.endswith("_s0") and len(c.values["model_suffix"]) <= 100 for n, c in zip(names, cells))
    with pytest.raises(ValueError, match="the grid has 20000 cells"):
        sweep.plan("quick", {"seed": list(range(200)), "at_eps": [i / 1000 for i in range(100)]}, {}, "x")
    with pytest.raises(ValueError) as err:
        sweep.plan("quick", {"seed": [0]}, {"at_variants": ["x" * 10_000]}, "x")
    assert len(str(err.value)) < 1000


SLOW_CELL = '''
from advkit.pipeline import jobs

def cell(payload):
    """notebook 03's job, on a notebook that records its kernel's process id and then sleeps"""
    return jobs.execute_cell({**payload, "notebook": NOTEBOOK, "parameters": {"mark": MARK}})
'''


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="POSIX signals")
@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGHUP, 129)])
def test_a_terminated_sweep_cancels_its_jobs_and_their_kernels(tmp_run, sig, code):
    """SIGTERM or SIGHUP (a scheduler or a closed terminal) stops the sweep as SIGINT does: its local job
    and the job's notebook kernel stop, the cell is marked in sweep.json, the exit status says which signal."""
    import json
    import os

    from advkit.runs.artifacts import write_json

    run = Run.named("term")
    run.model("base").parent.mkdir(parents=True, exist_ok=True)
    write_json(run.model("base"), {})
    write_json(run.attack_table("budgets", ".json"), {})
    mark = tmp_run / "kernel.pid"
    cells = [{"cell_type": "code", "metadata": {"tags": ["parameters"]}, "source": "mark = ''",
              "outputs": [], "execution_count": None},
             {"cell_type": "code", "metadata": {}, "outputs": [], "execution_count": None,
              "source": "import os, pathlib, time\npathlib.Path(mark).write_text(str(os.getpid()))\ntime.sleep(600)"}]
    notebook = tmp_run / "slow.ipynb"
    notebook.write_text(json.dumps({"cells": cells, "nbformat": 4, "nbformat_minor": 5, "metadata": {
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"}}}))
    (tmp_run / "slowcell.py").write_text(f"NOTEBOOK, MARK = {str(notebook)!r}, {str(mark)!r}\n" + SLOW_CELL)
    code_ = ("import functools, sys\nimport slowcell\nfrom advkit.pipeline import sweep\n"
             "sweep.sweep = functools.partial(sweep.sweep, cell_function=slowcell.cell)\nsweep.main(sys.argv[1:])\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_run), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", code_, "-g", "seed=0", "-p", "at_variants=[pgd_at]",
                             "-p", "keep_epochs=[]", "--run", "term"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    try:
        deadline = time.monotonic() + 180
        while not (mark.exists() and mark.read_text()):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.2)
        kernel = psutil.Process(int(mark.read_text()))
        job = [p for p in psutil.Process(proc.pid).children(recursive=True) if p.pid != kernel.pid]
        assert kernel.is_running() and job
        proc.send_signal(sig)
        assert proc.wait(timeout=60) == code
        assert f"sweep stopped ({signal.Signals(sig).name})" in proc.stderr.read()
        gone, alive = psutil.wait_procs([kernel, *job], timeout=30)
        assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE], alive
        state = run.read_json(run / "sweep" / "sweep.json")
        assert state["cells"]["s0"]["status"] == "failed" and "cancelled" in state["cells"]["s0"]["error"]
    finally:
        if proc.poll() is None:
            proc.kill()
        if mark.exists() and mark.read_text():
            with contextlib.suppress(psutil.NoSuchProcess):
                psutil.Process(int(mark.read_text())).kill()
