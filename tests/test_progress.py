"""Progress lines (advkit.progress): written only where the environment says, throttled per process
(first and last line of every loop kept), followed by the driver; a run prints notebook 01's epochs
and notebook 04's surface rows while each notebook runs; a sweep tells each cell's state."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from advkit import progress
from advkit.data import Batcher
from advkit.models import get_model
from advkit.pipeline import jobs
from advkit.training.fit import TrainConfig, fit

LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \[(?P<label>[^\]]+)\] (?P<text>.*)$")
ELAPSED_ETA = re.compile(r"\(elapsed \d+:\d\d:\d\d, ETA (\d+:\d\d:\d\d|\?)\)$")


@pytest.fixture()
def log(tmp_path, monkeypatch):
    """Progress enabled, into tmp_path/log.txt, with the label 01_train."""
    path = tmp_path / "log.txt"
    monkeypatch.setenv(progress.LOG_VARIABLE, str(path))
    monkeypatch.setenv(progress.LABEL_VARIABLE, "01_train")
    monkeypatch.setenv(progress.INTERVAL_VARIABLE, "0")
    monkeypatch.setattr(progress, "_last_line", {"time": float("-inf")})  # a fresh process: no line written yet
    return path


def texts(path: Path) -> list[str]:
    return [LINE.match(line).group("text") for line in path.read_text().splitlines()]


def test_without_the_environment_a_loop_writes_nothing(tmp_path, monkeypatch):
    for name in (progress.LOG_VARIABLE, progress.LABEL_VARIABLE, progress.INTERVAL_VARIABLE):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(progress, "append", lambda *a: pytest.fail("a disabled loop wrote a line"))
    steps = progress.LoopProgress("train base", "epoch", 3)
    for k in (1, 2, 3):
        steps.step(k, "loss 0.1")
    assert list(tmp_path.iterdir()) == []


def test_a_line_names_the_label_the_step_and_its_times(log):
    steps = progress.LoopProgress("train base", "epoch", 4, done=1)  # resumed after epoch 1
    steps.step(2, "train_loss 0.500, test_acc 0.900")
    line = log.read_text().splitlines()[0]
    match = LINE.match(line)
    assert match and match.group("label") == "01_train", line
    assert match.group("text").startswith("train base: epoch 2/4, train_loss 0.500, test_acc 0.900 (elapsed ")
    assert ELAPSED_ETA.search(line), line
    assert progress.duration(3725.4) == "1:02:05" and progress.duration(-1) == "0:00:00"


def test_the_throttle_writes_one_line_per_interval_and_closes_the_loops_it_showed(log, monkeypatch):
    monkeypatch.setenv(progress.INTERVAL_VARIABLE, "3600")
    for what, n in (("train a", 5), ("train b", 3)):  # b runs within a's interval: not shown at all
        steps = progress.LoopProgress(what, "epoch", n)
        for k in range(1, n + 1):
            steps.step(k)
    assert [t.split(" (")[0] for t in texts(log)] == ["train a: epoch 1/5", "train a: epoch 5/5"]
    monkeypatch.setenv(progress.INTERVAL_VARIABLE, "0")
    steps = progress.LoopProgress("train c", "epoch", 3)
    for k in (1, 2, 3):
        steps.step(k)
    assert [t.split(" (")[0] for t in texts(log)][2:] == ["train c: epoch 1/3", "train c: epoch 2/3",
                                                          "train c: epoch 3/3"]
    monkeypatch.setenv(progress.INTERVAL_VARIABLE, "often")
    with pytest.raises(ValueError, match="ADVKIT_PROGRESS_INTERVAL='often' must be a number of seconds"):
        progress.LoopProgress("train d", "epoch", 3)


def test_follow_passes_on_new_complete_lines_of_its_label(tmp_path):
    path = tmp_path / "log.txt"
    progress.append(path, "01_train", "from an earlier run")
    seen, stop = [], threading.Event()
    follower = threading.Thread(target=progress.follow, args=(path, "01_train", seen.append, stop, 0.01))
    follower.start()
    time.sleep(0.2)
    progress.append(path, "01_train", "train base: epoch 1/2")
    progress.append(path, "02_attack", "another notebook's line")
    with open(path, "a") as f:
        f.write("2026-01-01 00:00:00 [01_train] half")  # a line being written
        f.flush()
        time.sleep(0.2)
        f.write(" a line\n")
    progress.append(path, "01_train", "train base: epoch 2/2")
    stop.set()
    follower.join(5)
    assert [LINE.match(s).group("text") for s in seen] == ["train base: epoch 1/2", "half a line",
                                                           "train base: epoch 2/2"]


def test_following_sets_the_environment_of_processes_started_inside(tmp_path, monkeypatch):
    monkeypatch.delenv(progress.LOG_VARIABLE, raising=False)
    monkeypatch.setenv(progress.LABEL_VARIABLE, "before")
    monkeypatch.setenv(progress.INTERVAL_VARIABLE, "0")
    path, seen = tmp_path / "log.txt", []
    code = ("from advkit.progress import LoopProgress\nsteps = LoopProgress('train base', 'epoch', 2)\n"
            "steps.step(1)\nsteps.step(2)")
    with progress.following(path, "01_train", seen.append):
        subprocess.run([sys.executable, "-c", code], check=True)  # a kernel, in short
    assert [LINE.match(s).group("text").split(" (")[0] for s in seen] == ["train base: epoch 1/2",
                                                                          "train base: epoch 2/2"]
    assert progress.LOG_VARIABLE not in os.environ and os.environ[progress.LABEL_VARIABLE] == "before"


def test_fit_writes_one_line_per_epoch(log, digits):
    torch.manual_seed(0)
    batches = Batcher(digits.x_train[:128], digits.y_train[:128], 32, augment=False, seed=0)
    fit(get_model("small_cnn", 10, 1), batches, TrainConfig(epochs=3, lr=0.05, seed=0),
        test=(digits.x_test[:64], digits.y_test[:64]), name="base", progress=False)
    lines = texts(log)
    assert [t.split(",")[0] for t in lines] == [f"train base: epoch {k}/3" for k in (1, 2, 3)]
    assert all("train_loss " in t and "test_acc " in t for t in lines)


def test_surfaces_attacks_and_augmentation_write_their_steps(log, digits):
    from advkit.attacks.evaluate import evaluate_attacks
    from advkit.landscape.directions import random_directions
    from advkit.landscape.surfaces import grid, line
    from advkit.training.augment import adversarial_examples

    torch.manual_seed(0)
    model = get_model("small_cnn", 10, 1).eval()
    x, y = digits.x_test[:32], digits.y_test[:32]
    grid(model, random_directions(model, 2, seed=0), x, y, resolution=3, model_name="base")
    line(model, random_directions(model, 1, seed=0), x, y, resolution=3, model_name="base")
    evaluate_attacks(model, x.float() / 255, y, {"fgsm": "fgsm"}, ssim=False, name="base")
    adversarial_examples(model, x, y, "fgsm", batch_size=16, progress=False)
    lines = [t.split(" (")[0] for t in texts(log)]
    assert lines[:3] == [f"surface base grid: row {k}/3" for k in (1, 2, 3)]
    assert lines[3:] == ["surface base line: point 3/3", lines[4], "augment fgsm: batch 1/2", "augment fgsm: batch 2/2"]
    assert re.fullmatch(r"attacks on base: attack 1/1, fgsm accuracy \d\.\d{3}", lines[4])


def test_the_flatness_table_writes_one_line_per_model(log, digits, tmp_path):
    from advkit.runs.checkpoints import save_model
    from advkit.runs.run import Run
    from advkit.studies import zoo

    run = Run(tmp_path / "run")
    for seed, name in enumerate(("base", "fgsm")):
        torch.manual_seed(seed)
        save_model(run.model(name), get_model("small_cnn", 10, 1, width=4), {"seed": seed}, epoch=1)
    settings = zoo.ZooSettings(dataset="digits", n_eval=16, pgd_eps=0.1, pgd_steps=1, pgd_alpha=None, pgd_restarts=1,
                               n_autoattack=8, aa_steps=2, flatness_samples=2, worst_steps=1, hessian_iters=2,
                               hessian_samples=3)
    zoo.flatness_table(run, digits, settings, progress=False, optional=tuple(zoo.RUN_RESULTS))
    assert [t.split(" (")[0] for t in texts(log)] == ["flatness: model 1/2, base", "flatness: model 2/2, fgsm"]


def test_a_sweep_tells_each_cells_state_as_it_changes():
    """submit_and_wait with a stand-in executor whose jobs queue, start and end on cue."""
    class Job:
        def __init__(self, n):
            self.job_id, self.paths = str(n), SimpleNamespace(stdout=f"job{n}.out")
            self.state, self.polls = "PENDING", 0

        def done(self):
            self.polls += 1
            self.state = "RUNNING" if self.polls >= 2 else self.state
            return self.polls >= 4

        def result(self):
            return [{"status": "done" if self.job_id == "0" else "failed", "error": None if self.job_id == "0"
                     else "boom", "seconds": 1.0}]

    class Executor:
        n = 0

        def batch(self):
            return contextlib.nullcontext()

        def submit(self, fn, payloads, cell_function):
            Executor.n += 1
            return Job(Executor.n - 1)

    cells = [SimpleNamespace(name="a"), SimpleNamespace(name="b")]
    records = {c.name: SimpleNamespace(status="pending", job_id=None, log=None, error=None, seconds=None, history=[],
                                       notebook=f"{c.name}.ipynb") for c in cells}
    said = []
    jobs.submit_and_wait(Executor(), [[c] for c in cells], records, lambda c: {}, None, 1, lambda: None, 0.0,
                         said.append)
    assert [line.split(":")[0] for line in said] == [
        "[advkit] cell a submitted (job 0)", "[advkit] cell a running", "[advkit] cell a done",
        "[advkit] cell b submitted (job 1)", "[advkit] cell b running", "[advkit] cell b failed"]
    assert records["a"].status == "done" and records["b"].status == "failed"


# notebooks 01-04 of the quick profile, small: a few epochs, small surfaces
QUICK = {"n_train": 400, "epochs": 6, "n_eval": 40, "n_autoattack": 20, "stadv_steps": 3, "aa_steps": 2,
         "stadv_flow_grid": [0.2], "eps_grid": [0.0, 0.0627], "xu_pgd_steps": 2,
         "xu_attacks": ["fgsm"], "finetune_epochs": 1, "at_variants": ["pgd_at"], "at_epochs": 1, "keep_epochs": [],
         "n_robust_train": 50, "n_robust_test": 40, "n_val": 20, "epoch_steps": 2, "at_steps": 1,
         "early_stop_steps": 1, "n_images": 32, "span": 0.4, "resolution": 5, "line_resolution": 5,
         "radius": 0.4, "pgd_steps": 1, "sensitivity_norms": ["filter"], "sensitivity_resolution": 4,
         "direction_replicates": 2, "replicate_norms": ["filter"], "replicate_n_images": 16,
         "curvature_images": 8, "eigen_map_resolution": 3, "eigen_map_steps": 2}
FIRST_STEPS = {"01_train": r"\[01_train\] train base: epoch 1/6",
               "04_visualize": r"\[04_visualize\] surface base grid: row 1/5"}


def notebook_ended(path: Path) -> bool:
    """papermill's end time is set in the executed notebook (it rewrites the file as cells end)."""
    for _ in range(50):
        with contextlib.suppress(ValueError, FileNotFoundError):  # a file being written
            return json.loads(path.read_text())["metadata"]["papermill"]["end_time"] is not None
        time.sleep(0.1)
    raise AssertionError(f"{path} is not readable")


@pytest.mark.slow
def test_a_run_prints_epochs_and_rows_while_the_notebooks_run(tmp_path):
    """Each notebook's first step reaches the terminal while the notebook still runs (papermill has
    not ended it; notebook 04's kernel has more lines to write), in order before its "done"."""
    env = {**os.environ, "ADVKIT_RUNS_DIR": str(tmp_path / "runs"), "ADVKIT_FIGURES_DIR": str(tmp_path / "figures"),
           progress.INTERVAL_VARIABLE: "0", "PYTHONUNBUFFERED": "1"}
    env.pop(progress.LOG_VARIABLE, None)
    run = tmp_path / "runs" / "live"
    args = [f"-p{k}={v}" for k, v in QUICK.items()]
    proc = subprocess.Popen([sys.executable, "-m", "advkit", "run", "--only", "01,02,03,04", "-p", "run=live", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines, then = [], {}
    for line in proc.stdout:
        lines.append(line.rstrip("\n"))
        for notebook, pattern in FIRST_STEPS.items():
            if notebook not in then and re.search(pattern, line):  # the kernel's lines so far; has it ended?
                then[notebook] = ((run / "log.txt").read_text().count(f" [{notebook}] "),
                                  notebook_ended(run / "notebooks" / f"{notebook}.ipynb"))
    assert proc.wait() == 0, "\n".join(lines[-40:])
    final = (run / "log.txt").read_text()
    for notebook, (pattern, steps) in {"01_train": (r"train base: epoch \d/6", 6),
                                       "04_visualize": (r"surface base grid: row \d/5", 5)}.items():
        printed = [i for i, line in enumerate(lines) if re.search(rf"^\[advkit\] .* \[{notebook}\] {pattern}", line)]
        started = lines.index(next(line for line in lines if line.startswith(f"[advkit] {notebook} started")))
        done = lines.index(next(line for line in lines if line.startswith(f"[advkit] {notebook} done")))
        assert len(printed) == steps and started < printed[0] and printed[-1] < done, lines
        assert then[notebook][1] is False, (notebook, "printed only after the notebook ended")
    assert then["04_visualize"][0] < final.count(" [04_visualize] "), (then, final)
    assert "[advkit] 01_train started" in final and "[01_train] train base: epoch 6/6" in final
    assert "[advkit] 04_visualize done" in final
