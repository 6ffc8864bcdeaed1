"""Shared run files under concurrent writers, kills between a write's steps, full disks and files in the
way (advkit.runs.artifacts, advkit.runs, the driver's run lock and kernel files in advkit.pipeline)."""

import contextlib
import json
import multiprocessing
import os
import resource
import signal

import pytest
import torch

from advkit.models import get_model
from advkit.pipeline import driver as pipeline
from advkit.runs import artifacts
from advkit.runs.artifacts import (
    ArtifactWriteError,
    CorruptArtifactError,
    LockHeld,
    atomic_path,
    atomic_write_text,
    checksum_path,
    file_lock,
    read_json,
    recorded_hashes,
    verified,
)
from advkit.runs.checkpoints import load_model, save_model
from advkit.runs.run import Run, figures_dir, one_at_a_time, run_dir, update_manifest

FORK = multiprocessing.get_context("fork")  # the children share the test's imports (no torch import each)


@contextlib.contextmanager
def held_by_a_child(lock):
    """Yield the pid of a forked process that holds the context manager `lock()` until the block ends."""
    held, release = FORK.Event(), FORK.Event()

    def hold():
        with lock():
            held.set()
            release.wait(60)

    child = FORK.Process(target=hold)
    child.start()
    try:
        assert held.wait(60)
        yield child.pid
    finally:
        release.set()
        child.join(30)


# --- concurrent writers --------------------------------------------------------------------------


def _updates(folder, writer, n, errors):
    try:
        for i in range(n):
            update_manifest(folder, writer, {f"k{i}": i})
    except Exception as err:  # reported to the parent, which fails the test
        errors.put(f"{writer}: {type(err).__name__}: {err}")


def _reads(path, n, errors, read=read_json):
    for _ in range(n):
        try:
            read(path)
        except Exception as err:
            errors.put(f"reader: {type(err).__name__}: {err}")


def _drain(queue):
    out = []
    while not queue.empty():
        out.append(queue.get())
    return out


def test_concurrent_manifest_updates_lose_nothing_and_reads_never_see_corruption(tmp_path):
    n = 100
    update_manifest(tmp_path, "start", {"ok": True})
    errors = FORK.Queue()
    procs = [FORK.Process(target=_updates, args=(tmp_path, w, n, errors)) for w in ("a", "b")]
    procs.append(FORK.Process(target=_reads, args=(tmp_path / "manifest.json", 2 * n, errors)))
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert _drain(errors) == []
    manifest = read_json(verified(tmp_path / "manifest.json"))
    for writer in ("a", "b"):
        assert manifest[writer] == {f"k{i}": i for i in range(n)}, writer
    assert recorded_hashes(tmp_path / "manifest.json") == [artifacts.file_sha256(tmp_path / "manifest.json")]


def _rewrites(path, text, n, errors):
    try:
        for i in range(n):
            atomic_write_text(path, f"{text} {i}\n" * 100)
    except Exception as err:
        errors.put(f"writer: {type(err).__name__}: {err}")


def test_concurrent_writes_of_one_file_keep_each_file_with_its_own_checksum(tmp_path):
    path = tmp_path / "t.txt"
    atomic_write_text(path, "start\n")
    errors = FORK.Queue()
    procs = [FORK.Process(target=_rewrites, args=(path, t, 100, errors)) for t in ("a", "b")]
    procs.append(FORK.Process(target=_reads, args=(path, 200, errors, lambda p: verified(p).read_text())))
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0, 0] and _drain(errors) == []
    assert path.read_text() in ("a 99\n" * 100, "b 99\n" * 100) and verified(path) == path


def test_file_lock_refuses_a_second_holder_by_pid_and_is_reentrant(tmp_path):
    lock = tmp_path / "x.lock"
    with held_by_a_child(lambda: file_lock(lock)) as pid:
        with pytest.raises(LockHeld, match=f"held by process {pid}") as info:
            with file_lock(lock, wait=False):
                pass
        assert info.value.pid == pid
    with file_lock(lock, wait=False), file_lock(lock, wait=False):  # the holder may take it again
        assert lock.read_text().strip() == str(os.getpid())


def test_a_second_advkit_run_of_a_run_is_refused_naming_the_holder(tmp_run, monkeypatch, capsys):
    monkeypatch.setattr(pipeline, "_execute", lambda *a, **k: pytest.fail("a notebook started"))
    with held_by_a_child(lambda: one_at_a_time(Run(run_dir("busy")).lock, "python -m advkit run")) as pid:
        with pytest.raises(SystemExit) as exit_:
            pipeline.main(["run", "--only", "01", "-p", "run=busy"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_.value.code == 2 and err.startswith("error: another python -m advkit run") and str(pid) in err
    assert not (tmp_run / "runs" / "busy" / "manifest.json").exists()  # refused before anything was written


# --- a kill between the steps of a write -----------------------------------------------------------


class Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs."""


def _kill_after(monkeypatch, renames):
    real, done = os.replace, []

    def replace(src, dst):
        if len(done) == renames:
            raise Killed
        done.append(dst)
        real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    return done


@pytest.mark.parametrize("renames, survivor", [(0, "old"), (1, "old"), (2, "new")])
def test_a_kill_between_the_steps_of_a_write_leaves_a_pair_that_verifies(tmp_path, monkeypatch, renames, survivor):
    path = tmp_path / "m.json"
    artifacts.write_json(path, "old")
    done = _kill_after(monkeypatch, renames)
    with pytest.raises(Killed):
        artifacts.write_json(path, "new")
    monkeypatch.undo()
    assert [p.name for p in done] == ["m.json.sha256", "m.json"][:renames]
    assert read_json(path) == survivor  # verified: the file matches a hash its sidecar accepts
    artifacts.write_json(path, "newer")  # the next write completes the pair
    assert read_json(path) == "newer" and len(checksum_path(path).read_text().splitlines()) == 1
    path.write_text(json.dumps("old"))  # the replaced content is accepted no more
    with pytest.raises(CorruptArtifactError):
        verified(path)


def test_a_kill_while_replacing_a_file_without_a_checksum_leaves_it_readable(tmp_path, monkeypatch):
    path = tmp_path / "old.json"
    path.write_text(json.dumps({"written": "by hand"}))
    _kill_after(monkeypatch, 1)
    with pytest.raises(Killed):
        artifacts.write_json(path, {"written": "by the kit"})
    monkeypatch.undo()
    assert read_json(path) == {"written": "by hand"}


def test_a_complete_write_is_two_or_three_renames_and_a_plain_checksum(tmp_path, monkeypatch):
    path = tmp_path / "f.txt"
    done = _kill_after(monkeypatch, 10)
    atomic_write_text(path, "first")
    atomic_write_text(path, "second")
    assert [p.name for p in done] == ["f.txt.sha256", "f.txt", "f.txt.sha256", "f.txt", "f.txt.sha256"]
    assert checksum_path(path).read_text().split() == [artifacts.file_sha256(path), "f.txt"]  # sha256sum -c


# --- a full disk ------------------------------------------------------------------------------------


def test_a_full_disk_during_torch_save_names_the_file_and_the_cause(tmp_path, monkeypatch):
    model = get_model("small_cnn", 10, 1, width=4)
    path = save_model(tmp_path / "models" / "base.pt", model)
    before = path.read_bytes()
    failure = RuntimeError("[enforce fail at inline_container.cc:672] unexpected pos 320 vs 210")

    def save(*args, **kwargs):
        raise failure

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(ArtifactWriteError, match=r"could not write .*base.pt: the disk is probably full or the "
                                                 r"file-size limit") as info:
        save_model(path, model)
    assert info.value.__cause__ is failure and "unexpected pos" in str(info.value)
    assert path.read_bytes() == before and sorted(p.name for p in path.parent.iterdir()) == [
        ".advkit.lock", "base.pt", "base.pt.sha256"]


@pytest.mark.skipif(signal.getsignal(signal.SIGXFSZ) != signal.SIG_IGN, reason="SIGXFSZ would kill the process")
def test_a_file_size_limit_at_a_checkpoint_names_the_file_and_the_limit(tmp_path):
    model = get_model("small_cnn", 10, 1, width=64)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    limit = 300 * 1024
    if hard != resource.RLIM_INFINITY and hard < limit:
        pytest.skip("the hard file-size limit is lower than the test's")
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        with pytest.raises(ArtifactWriteError, match=r"base.pt: .*file-size limit, ulimit -f: 300 KiB") as info:
            save_model(tmp_path / "base.pt", model)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert info.value.__cause__ is not None
    assert not list(tmp_path.glob("*.pt*")) and not list(tmp_path.glob(".base.pt.*"))  # no partial file


def test_other_errors_in_a_write_pass_unchanged(tmp_path):
    with pytest.raises(RuntimeError, match="^CUDA error: boom$"):
        with atomic_path(tmp_path / "x.pt"):
            raise RuntimeError("CUDA error: boom")
    with pytest.raises(PermissionError):
        with atomic_path(tmp_path / "x.pt"):
            raise PermissionError("not a disk-space problem")


# --- files where folders go -------------------------------------------------------------------------


def test_runs_dir_or_run_folder_being_a_file_is_an_error_line_before_any_notebook(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(pipeline, "_execute", lambda *a, **k: pytest.fail("a notebook started"))
    monkeypatch.setenv("ADVKIT_FIGURES_DIR", str(tmp_path / "figures"))
    (tmp_path / "file").write_text("x")
    runs = tmp_path / "runs"
    (runs / "quick").parent.mkdir()
    (runs / "quick").write_text("x")
    cases = {str(tmp_path / "file"): f"ADVKIT_RUNS_DIR: {tmp_path / 'file'} is a file, not a folder",
             str(tmp_path / "file" / "runs"): f"ADVKIT_RUNS_DIR: {tmp_path / 'file' / 'runs'} cannot be a folder: "
                                              f"{tmp_path / 'file'} is a file",
             str(runs): f"run=quick: {runs / 'quick'} is a file, not a folder"}
    for value, message in cases.items():
        monkeypatch.setenv("ADVKIT_RUNS_DIR", value)
        with pytest.raises(SystemExit) as exit_:
            pipeline.main(["run", "--only", "01"])
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_.value.code == 2 and err[-1].startswith(f"error: {message}"), err
    with pytest.raises(ValueError, match="is a file, not a folder"):
        run_dir("quick")
    monkeypatch.setenv("ADVKIT_FIGURES_DIR", str(tmp_path / "file"))
    with pytest.raises(ValueError, match="ADVKIT_FIGURES_DIR: .* is a file, not a folder"):
        figures_dir()


def test_the_model_kept_by_a_killed_write_loads(tmp_path, monkeypatch):
    model = get_model("small_cnn", 10, 1, width=4)
    path = save_model(tmp_path / "m.pt", model)
    _kill_after(monkeypatch, 1)
    with pytest.raises(Killed):
        save_model(path, get_model("small_cnn", 10, 1, width=8))
    monkeypatch.undo()
    assert load_model(path).advkit_spec == model.advkit_spec


def test_a_second_sweep_of_a_run_is_refused_naming_the_holder(tmp_run):
    from advkit.pipeline import sweep

    run = Run(run_dir("busy"))
    atomic_write_text(run.model("base"), "placeholder")  # notebooks 01-02's results, as far as the sweep checks
    atomic_write_text(run.attack_table("budgets", ".json"), "{}")
    with held_by_a_child(lambda: one_at_a_time(run / "sweep" / "sweep.lock", "sweep")) as pid:
        with pytest.raises(ValueError, match=f"another sweep \\(pid {pid}\\) holds .*sweep.lock"):
            sweep.sweep("quick", {"seed": [0, 1]}, run="busy", cell_function=lambda payload: pytest.fail("a job ran"))
