"""advkit.pipeline.plan: the counting checked by hand on made-up settings and unit costs, recorded (reference) unit
costs, measured ones and their cache, --budget on `run` and `sweep`, and one command line. No timing is
asserted."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from advkit.pipeline import driver as pipeline
from advkit.pipeline import plan, sweep

ROOT = Path(__file__).resolve().parents[2]


def _values(**changes):
    """The quick profile, shrunk to counts small enough to count by hand."""
    v = {**pipeline.load_profile("quick"), "epochs": 2, "n_train": 100, "n_eval": 10, "n_autoattack": 4,
         "xu_attacks": ["pgd"], "at_variants": ["trades"], "at_epochs": 3, "keep_epochs": [1],
         "stadv_flow_grid": [0.1, 0.2], "eps_grid": [0.0, 0.1, 0.2], "n_images": 8, "resolution": 3,
         "line_resolution": 5, "robust_resolution": 2, "sensitivity_norms": ["filter"], "sensitivity_radii": [0.1],
         "sensitivity_resolution": 3, "direction_replicates": 2, "replicate_norms": ["filter", "none"],
         "replicate_dims": [1], "replicate_resolution": 3, "replicate_n_images": 4, "replicate_robust": "filter",
         "eigen_map_models": ["base"], "curvature_images": 2, "eigen_map_resolution": 2, "eigen_map_steps": 3,
         "n_subset": 6}
    return {**v, **changes}


def _costs(overhead: float = 0.0, **seconds: float) -> plan.Costs:
    unit = plan.UnitCosts(**{k: seconds.get(k, 0.0) for k in plan.KINDS}, at=seconds.get("at", {}))
    return plan.Costs("made-up", "test", "digits", {"small_cnn": unit}, dict.fromkeys(plan.NOTEBOOKS, overhead))


def _counts(items, notebook: str) -> dict[str, float]:
    return {it.work: it.count for it in items if it.notebook == notebook}


def test_each_notebooks_counts_by_hand():
    v = _values()
    items = plan.project(v, _costs(train=1, attack=1, point=1, hvp=1, stadv=1, at={"trades": 1}))
    c01 = _counts(items, "01")
    assert c01["small_cnn training (paper recipe), 2 epochs x 100 images"] == 2 * 100
    assert c01["test evaluation after each of 2 epochs"] == 2 * 360  # the digits test set
    c02 = _counts(items, "02")
    assert c02["attack tables: FGSM, PGD"] == 10 * (1 + 10)  # FGSM + PGD-10 on 10 images
    assert c02["attack tables: stAdv"] == 10 * 20
    assert c02["stAdv flow sweep (2 bounds)"] == 10 * 2 * 20
    assert c02["accuracy vs eps (3 eps, FGSM + PGD)"] == 10 * 3 * 11
    assert c02["AutoAttack (APGD-T on half) + PGD check"] == 4 * (10 * (1 + 3 / 2) + 10)
    c03 = _counts(items, "03")
    assert c03["Xu augmentation set pgd"] == 100 * 10
    assert c03["Xu fine-tunes (1), 3 epochs x 2 x 100 images"] == 3 * 2 * 100
    assert c03["AT trades (small_cnn), 3 epochs x 100 images"] == 3 * 100
    assert c03["per-epoch robust evaluation (Stutz et al.)"] == 3 * ((300 + 260) * 10 + 100 * 7)
    assert c03["zoo attack tables: FGSM, PGD (2 small_cnn)"] == 10 * 11 * 2  # base and pgd
    assert c03["zoo attack tables: FGSM, PGD (3 AT small_cnn)"] == 10 * 11 * 3  # trades, _early, _e001
    c04 = _counts(items, "04")
    assert c04["2 small_cnn: 2D grid 3^2 + line 5"] == 2 * (9 + 5) * 8
    assert c04["2 small_cnn: robust line + grid 2^2 (PGD-5)"] == 2 * (5 + 4)
    assert c04["interpolations from base"] == (1 + 2) * 5 * 8  # pgd, trades, trades_early: one architecture
    assert c04["replicates, 2 final models x 4 surfaces"] == 2 * 4 * 3 * 2 * 4  # filter; none, BN x 2
    assert c04["replicates robust, 2 final models x 1 surfaces"] == 2 * 1 * 3 * 2  # filter only
    assert c04["eigenvalue map base (2 losses)"] == 4 * 3 * 2 * 2
    # landscape files: grid, line, robust grid, one sensitivity line per model; their rows (2D) or points (1D)
    assert c04["2 small_cnn: 8 surface files"] == 2 * (2 + 1 + 1)
    assert c04["2 small_cnn: their 26 rows"] == 2 * (3 + 5 + 3 + 2)
    assert c04["replicates: 16 surface files"] == 2 * 4 * 2  # models x surfaces x seeds (one dimension)
    c05 = _counts(items, "05")
    per_model = 2 * 6 * (5 * (2 + 5) + 5) + 2 * 4 * 10 * (1 + 3 / 2)
    assert c05["2 small_cnn: RLoss, RErr (AutoAttack), flatness"] == 2 * per_model
    assert c05["3 small_cnn: Hessian eigenvalue + trace"] == 3 * (10 + 30) * 6


def test_seconds_are_counts_times_their_unit_cost_plus_the_overhead():
    v = _values()
    units = plan.project(v, _costs(train=1.0))
    # 01, the Xu fine-tune and trades (not measured: K + 1 steps, each at least a training step, +4 %)
    assert sum(it.seconds for it in units) == pytest.approx(2 * 100 + 3 * 2 * 100 + 3 * 100 * (1 + 5) * 1.04)
    derived = plan.project(v, _costs(train=1.0, attack=2.0))
    at = [it for it in derived if it.work.startswith("AT trades")]
    assert at[0].seconds == pytest.approx(3 * 100 * (1 + 5 * 2) * 1.04) and "derived" in at[0].work
    slow_train = plan.project(v, _costs(train=3.0, attack=2.0))  # an attack step costs at least a training step
    at = [it for it in slow_train if it.work.startswith("AT trades")]
    assert at[0].seconds == pytest.approx(3 * 100 * (3 + 5 * 3) * 1.04)
    overhead = plan.project(v, _costs(overhead=7.0), only=["02", "04"])
    assert plan.by_notebook(overhead) == {"02": 7.0, "04": 7.0}


def test_reference_plan_needs_no_measurement(monkeypatch, capsys):
    monkeypatch.setattr(plan, "measure", lambda *a, **k: pytest.fail("a reference plan measured"))
    pipeline.plan_main(["--profile", "paper", "--reference", "h200"])
    out = capsys.readouterr().out
    assert all(f"\n{nb}: " in out for nb in plan.NOTEBOOKS) and "total: " in out
    assert "resnet18: unmeasured on the H200" in out  # the assumption it plans with, stated
    with pytest.raises(SystemExit) as exit_:
        pipeline.plan_main(["--profile", "quick", "--reference", "h200"])  # the digits were never measured there
    assert exit_.value.code == 2 and "no unit costs for dataset 'digits'" in capsys.readouterr().err


def test_reference_resnet18_is_the_upper_end_of_its_range():
    costs = plan.reference_costs("h200", "cifar10")
    assert costs.units["resnet18"].attack == pytest.approx(8.05 * costs.units["resnet32"].attack)


@pytest.mark.slow
def test_measured_plan_of_the_quick_profile_and_its_cache(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ADVKIT_CACHE_DIR", str(tmp_path))
    pipeline.plan_main(["--profile", "quick"])
    out = capsys.readouterr().out
    assert all(f"\n{nb}: " in out for nb in plan.NOTEBOOKS) and "total: " in out
    cached = list((tmp_path / "plan").glob("*.json"))
    assert len(cached) == 1
    monkeypatch.setattr(plan, "measure", lambda *a, **k: pytest.fail("measured again"))
    pipeline.plan_main(["--profile", "quick"])  # the same device and settings: the cache
    assert capsys.readouterr().out == out


def test_measuring_allocates_no_more_than_its_timed_batches(monkeypatch):
    # batch_size=10**9 made the measurement allocate 10**9 random images (256 GB) before timing batches of at
    # most max(n_eval-sized, 8) images: a traceback from the plan instead of a plan.
    import torch

    rand, sizes = torch.rand, []

    def bounded_rand(*shape, **kw):
        sizes.append(shape[0])
        if sizes[-1] > 10**5:
            raise MemoryError(f"the plan allocated {sizes[-1]} images")
        return rand(*shape, **kw)

    monkeypatch.setattr(torch, "rand", bounded_rand)
    monkeypatch.setattr(plan, "measure_overhead", lambda values: 0.0)
    costs = plan.measure(_values(batch_size=10**9, at_batch_size=10**9), only=["01"], steps=1)
    assert costs.units["small_cnn"].train > 0 and sizes and max(sizes) <= 10**5


def test_an_unwritable_cost_cache_warns_and_plans(tmp_path, monkeypatch):
    # A read-only home or ADVKIT_CACHE_DIR naming a file: the optional cache stopped the run with an OSError.
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setattr(plan, "measure", lambda values, only=None: _costs(train=1.0))
    monkeypatch.setattr(plan, "UNWRITABLE_CACHES", set())
    for env, value in (("ADVKIT_CACHE_DIR", str(blocker)), ("HOME", str(blocker))):
        monkeypatch.delenv("ADVKIT_CACHE_DIR", raising=False)
        monkeypatch.setenv(env, value)
        with pytest.warns(RuntimeWarning, match=f"cannot write the plan's cost cache {blocker}"):
            assert plan.measured_costs(_values()).units["small_cnn"].train == 1.0
    assert blocker.read_text() == ""


def test_a_bad_budget_is_refused_before_measuring(tmp_run, monkeypatch, capsys):
    monkeypatch.setattr(plan, "measure", lambda *a, **k: pytest.fail("measured for a bad --budget"))
    for bad in ("-1", "nan", "0", "soon"):
        for main, argv in ((pipeline.plan_main, []), (pipeline.main, ["run"]), (sweep.main, ["-g", "seed=0,1"])):
            with pytest.raises(SystemExit) as exit_:
                main([*argv, "--budget", bad])
            err = capsys.readouterr().err
            assert exit_.value.code == 2 and f"--budget {bad}: give a number of hours > 0" in err, err


def test_run_prints_the_plan_before_the_first_notebook(tmp_run, monkeypatch, capsys):
    monkeypatch.setattr(plan, "measured_costs", lambda values, only=None, fresh=False: _costs(overhead=1.0, train=1.0))
    monkeypatch.setattr(pipeline, "_execute", lambda path, out, parameters, log_output, log=None:
                        print(f"executed {path.stem}"))
    pipeline.main(["run", "--only", "01"])
    out = capsys.readouterr().out
    assert "[advkit] plan: " in out and out.index("[advkit] plan: ") < out.index("executed 01_train")


def test_budget_refuses_a_run_naming_its_largest_items(tmp_run, monkeypatch, capsys):
    monkeypatch.setattr(pipeline, "_execute", lambda *a, **k: pytest.fail("a refused run executed a notebook"))
    with pytest.raises(SystemExit) as exit_:
        pipeline.main(["run", "--profile", "paper", "--reference", "h200", "--budget", "1"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_.value.code == 2 and err.startswith("error: --budget 1 h")
    assert err.count("; ") >= 2 and "replicates robust" in err  # the three largest, the largest first
    assert not (tmp_run / "runs").exists()
    for bad in ("-3", "nan", "inf"):  # refused by `plan` as by `run`
        for command in (["run", "--profile", "paper"], ["plan", "--profile", "paper"]):
            with pytest.raises(SystemExit) as exit_:
                main = pipeline.plan_main if command[0] == "plan" else pipeline.main
                main([*command[command[0] == "plan":], "--reference", "h200", "--budget", bad])
            assert exit_.value.code == 2 and "give a number of hours > 0" in capsys.readouterr().err


def test_a_sweep_plans_after_its_checks(tmp_run, monkeypatch, capsys):
    monkeypatch.setattr(plan, "measure", lambda *a, **k: pytest.fail("planned a sweep that its checks refuse"))
    with pytest.raises(SystemExit) as exit_:
        sweep.main(["-g", "seed=0,1", "--run", "empty"])
    assert exit_.value.code == 2 and "run 'empty' does not exist" in capsys.readouterr().err


def test_budget_refuses_a_sweep(tmp_run, monkeypatch, capsys):
    monkeypatch.setattr(sweep, "check_prerequisites", lambda run, profile: None)  # as if notebooks 01-02 had run
    monkeypatch.setattr(sweep, "sweep", lambda *a, **k: pytest.fail("a refused sweep started"))
    with pytest.raises(SystemExit) as exit_:
        sweep.main(["--profile", "paper", "--reference", "h200", "--budget", "0.5", "-g", "seed=0,1"])
    captured = capsys.readouterr()
    assert exit_.value.code == 2 and "[advkit] plan: " in captured.out
    assert "error: --budget 0.5 h" in captured.err and "03 AT" in captured.err


def test_help_lists_every_command():
    out = subprocess.run([sys.executable, "-m", "advkit", "--help"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    assert all(f"    {name} " in out for name in ("run", "plan", "params", "refresh", "sweep"))
    sub = subprocess.run([sys.executable, "-m", "advkit", "run", "--help"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    assert "--budget HOURS" in sub and "--reference NAME" in sub
