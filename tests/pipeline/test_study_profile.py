"""The study profile (advkit/pipeline/profiles/study.yaml): it passes the up-front checks, gives notebook 05 at
least 20 distinct models, fits 4 H200-hours by the plan's counting, and says where it departs from the
paper profile (in its comments and docs/study.md)."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest

from advkit.pipeline import driver as pipeline
from advkit.pipeline import params, plan
from advkit.runs.run import EARLY_SUFFIX
from advkit.studies import correlation, zoo
from advkit.training.variants import parse_variant

ROOT = Path(__file__).resolve().parents[2]
GOAL_S = 4 * 3600


def h200(at_as_training_steps: bool = False) -> plan.Costs:
    """The recorded H200 unit costs (advkit/pipeline/plan_references/h200.yaml), ResNet-32 only, so that a plan
    needing any other architecture (ResNet-18's cost is unmeasured) fails. `at_as_training_steps`: an
    adversarial training step priced as K + 1 clean training steps (docs/scaling.md's cost model, which
    a launch-bound batch of 128 makes likelier) rather than a clean step plus K PGD steps."""
    costs = plan.reference_costs("h200", "cifar10")
    unit = costs.units["resnet32"]
    if at_as_training_steps:
        k = pipeline.load_profile("study")["at_steps"]
        unit = replace(unit, at={o: (k + 1) * unit.train * plan.OBJECTIVE_FACTOR.get(o, 1.0)
                                 for o in ("pgd_at", "trades", "mart", "awp")})
    return replace(costs, units={"resnet32": unit})


@pytest.fixture(scope="module")
def study():
    return pipeline.load_profile("study")


def test_study_passes_the_up_front_checks_of_a_run(tmp_run, monkeypatch, study):
    """`python -m advkit run --profile study --only 01 --reference h200 --budget 4` validates every
    parameter of every notebook, the variants and the environment, plans notebook 01, then hands it the
    profile's values (the notebook itself is not executed)."""
    calls = {}
    monkeypatch.setattr(pipeline, "_execute", lambda path, out, parameters, log_output, log=None:
                        calls.update({path.stem: parameters}))
    pipeline.main(["run", "--profile", "study", "--only", "01", "--reference", "h200", "--budget", "4"])
    assert list(calls) == ["01_train"]
    assert all(calls["01_train"][k] == study[k] for k in calls["01_train"] if k not in pipeline.PATH_PARAMETERS)


def _worst_case_table(values) -> pd.DataFrame:
    """notebook 05's models with the epochs that make the fewest distinct ones: every early-stopped
    copy at its final epoch (`correlation.distinct_models` then drops it)."""
    rows = {}
    for name in params.expected_models(values, name=lambda spec: parse_variant(spec).name):
        family, epoch = zoo.split_name(name)
        if name.endswith(EARLY_SUFFIX):
            family = name.removesuffix(EARLY_SUFFIX)
        rows[name] = {"family": family, "epoch": values["at_epochs"] if epoch is None else epoch}
    return pd.DataFrame.from_dict(rows, orient="index")


def test_study_gives_notebook_05_at_least_20_distinct_adversarially_trained_models(study):
    table = correlation.distinct_models(_worst_case_table(study))
    assert not table.duplicated(["family", "epoch"]).any(), "two names would hold the same weights"
    at = [n for n in table.index if n not in ["base", *study["xu_attacks"]]]
    assert len(at) >= 20, at  # Stutz et al.'s correlation: variants x seeds x epoch checkpoints
    assert len(table) >= 24


def test_distinct_models_is_not_fooled_by_the_worst_case_table():
    """The count above fails when the epoch copies are missing (keep_epochs empty)."""
    values = {**pipeline.load_profile("study"), "keep_epochs": []}
    assert len(correlation.distinct_models(_worst_case_table(values))) < 20


@pytest.mark.parametrize("at_as_training_steps", [False, True])
def test_study_fits_four_h200_hours_with_resnet32_alone(study, at_as_training_steps):
    """`python -m advkit plan --profile study --reference h200` at most 4 h, also with the dearer count
    of adversarial training; nothing rests on ResNet-18's unmeasured cost."""
    items = plan.project(study, h200(at_as_training_steps))
    assert sum(it.seconds for it in items) <= GOAL_S, plan.budget_table(items, GOAL_S)


def test_the_paper_profile_does_not_fit(study):
    """The check above can fail: the paper profile is far above 4 h (and needs ResNet-18)."""
    paper = pipeline.load_profile("paper")
    with pytest.raises(ValueError, match="no resnet18"):
        plan.project(paper, h200())
    resnet32 = plan.project({**paper, "at_model": "resnet32"}, h200())
    assert sum(it.seconds for it in resnet32) > 3 * GOAL_S


def _departures(study) -> list[str]:
    paper = pipeline.load_profile("paper")
    return [k for k in study if k != "run" and study[k] != paper[k]]


def test_every_departure_is_marked_in_the_profile_and_explained_in_docs(study):
    """A parameter whose value differs from the paper profile carries `paper: <its value>` on its line
    or in the comment just above it, and docs/study.md names it."""
    lines = (pipeline.PROFILES_DIR / "study.yaml").read_text().splitlines()
    doc = (ROOT / "docs" / "study.md").read_text()
    departures = _departures(study)
    assert {"at_model", "at_epochs", "finetune_epochs", "at_variants"} <= set(departures)
    for name in departures:
        i = next(i for i, line in enumerate(lines) if re.match(rf"{name}:", line))
        block = [lines[i]]
        while i > 0 and lines[i - 1].startswith("#") and not lines[i - 1].startswith("# 0"):
            i -= 1
            block.append(lines[i])
        assert any("paper:" in line.partition("#")[2] for line in block), f"{name}: no `paper:` comment"
        assert f"`{name}`" in doc, f"docs/study.md does not explain {name}"
