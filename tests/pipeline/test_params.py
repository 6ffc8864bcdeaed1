"""The parameter declarations (advkit.pipeline.params) against the notebooks, the profiles and the package."""

import ast
import subprocess
import sys

import pytest

from advkit._checks import OPTIMIZERS, QUADRATIC_FIT_POINTS, RECIPES, points_within
from advkit.pipeline import driver as pipeline
from advkit.pipeline import params
from advkit.pipeline.params import PARAMS, notebook_parameters


@pytest.fixture(scope="module")
def declared():
    return notebook_parameters(pipeline.notebook_paths())


def test_every_notebook_parameter_has_one_declaration_and_vice_versa(declared):
    in_notebooks = {name for p in declared.values() for name in p}
    assert in_notebooks - set(PARAMS) == set(), "declare these in advkit/params.py PARAMS"
    assert set(PARAMS) - in_notebooks == set(), "no notebook takes these declared parameters"


def test_declarations_match_the_notebook_annotations(declared):
    for nb, p in declared.items():
        for name, info in p.items():
            annotation = info["inferred_type_name"]
            assert info["help"], f"{nb}: {name} lacks a # comment"
            optional = annotation.startswith("Optional[")
            base = annotation.removeprefix("Optional[").removesuffix("]")
            assert base == PARAMS[name].kind.__name__, f"{nb}: {name}: {annotation} vs {PARAMS[name].kind.__name__}"
            assert optional == PARAMS[name].optional, f"{nb}: {name}: Optional in the notebook and the declaration"


def test_notebook_defaults_and_profiles_pass(declared):
    for nb, p in declared.items():
        pipeline.check_parameters({name: info["default"] for name, info in p.items()}, declared, environment=False)
    for profile in pipeline.available_profiles():
        pipeline.check_parameters(pipeline.load_profile(profile), declared)


def _typed(value):
    """A value with the types of its parts, so that 1 and 1.0 (or True and 1) differ."""
    if isinstance(value, (list, tuple)):
        return [_typed(v) for v in value]
    return (type(value).__name__, value)


@pytest.mark.parametrize("notebook", ["01", "02", "03", "04", "05"])
def test_notebook_defaults_are_the_quick_profile(declared, notebook):
    """One source for the quick profile: quick.yaml; every notebook's `parameters` cell holds the
    same values as its defaults (nbval and `python -m advkit refresh` execute the notebooks with them)."""
    quick = pipeline.load_profile("quick")
    stem = pipeline.notebook_paths([notebook])[0].stem
    cell = {name: info["default"] for name, info in declared[stem].items()}
    differ = {name: (value, quick.get(name, "<missing>")) for name, value in cell.items()
              if name not in quick or _typed(quick[name]) != _typed(value)}
    assert not differ, (f"{stem}'s parameters cell differs from advkit/pipeline/profiles/quick.yaml: "
                        f"{{name: (cell, yaml)}} {differ}")


@pytest.mark.parametrize("profile", ["quick", "paper", "study"])
def test_each_profile_sets_every_declared_parameter_and_no_other(declared, profile):
    """A profile is one file holding all its values: none comes from another profile (the paper
    profile would otherwise inherit the notebooks' quick defaults) and none lacks a declaration."""
    values = pipeline.load_profile(profile)
    assert set(values) - set(PARAMS) == set(), f"{profile}.yaml sets parameters advkit/params.py does not declare"
    assert set(PARAMS) - set(values) == set(), f"{profile}.yaml leaves these to the notebooks' (quick) defaults"
    assert profile in pipeline.available_profiles()


def test_declarations_check_with_the_library_validators():
    """A declaration's message is the library's own (advkit._checks, as the dataclasses raise it)."""
    from advkit._checks import check_choice, check_int, check_number

    for name, value, validator in [("epochs", 0, lambda: check_int("epochs", 0)),
                                   ("aa_targets", 10, lambda: check_int("aa_targets", 10, 1, 9)),
                                   ("lr", 0.0, lambda: check_number("lr", 0.0, low_open=True)),
                                   ("pgd_eps", 2.0, lambda: check_number("pgd_eps", 2.0, 0, 1)),
                                   ("optimizer", "lbfgs", lambda: check_choice("optimizer", "lbfgs", OPTIMIZERS))]:
        with pytest.raises(ValueError) as expected:
            validator()
        assert params.check_value(name, value, PARAMS[name]) == str(expected.value)


# Values the declarations must reject because the library would: each notebook stops before it starts.
_BAD_VALUES = (None, 0, -1, 1.5, 2.0, 0.0, -0.1, True, "bogus", float("nan"), float("inf"), 2**32, 10)


def _rejects(make, value):
    try:
        make(value)
    except ValueError:
        return True
    return False


def test_every_value_the_settings_reject_fails_the_parameter_check_first():
    """The settings dataclasses check themselves (advkit._checks) without this table; a notebook
    parameter that feeds a setting (notebook 01: TrainConfig, notebook 05: advkit.pipeline.stages'
    ZOO_SETTINGS_PARAMETERS) rejects every value the setting rejects, before any notebook starts."""
    from advkit.pipeline import stages
    from advkit.studies import zoo
    from advkit.training import fit as train

    notebook_01 = {name: name for name in ("epochs", "optimizer", "lr", "weight_decay", "schedule", "seed", "recipe")}
    feeds = {train.TrainConfig: notebook_01, zoo.ZooSettings: stages.ZOO_SETTINGS_PARAMETERS}
    assert stages.ZOO_SETTINGS_PARAMETERS["n_eval"] == "n_subset"
    for cls, fed in feeds.items():
        for field, name in fed.items():
            for value in _BAD_VALUES:
                if _rejects(lambda v: cls(**{field: v}), value):
                    assert params.check_value(name, value, PARAMS[name]), f"{name}={value!r} passes, {cls} rejects it"
        for profile in pipeline.available_profiles():  # and what every profile passes, the settings take
            values = pipeline.load_profile(profile)
            cls(**{field: values[name] for field, name in fed.items()})


def test_validation_does_not_import_torch():
    """The declarations, the rules and the profiles are checked without torch (well under a second)."""
    code = ("import sys\nfrom advkit.pipeline import driver as pipeline\nfrom advkit.pipeline import params\n"
            "d = params.notebook_parameters(pipeline.notebook_paths())\n"
            "params.checked_values(pipeline.load_profile('paper'), d)\n"
            "for bad in ({'epochs': -1}, {'resolution': 11}, {'eps_grid': [2.0]}):\n"
            "    try:\n        params.checked_values(bad, d)\n    except ValueError:\n        pass\n"
            "    else:\n        raise SystemExit(f'accepted {bad}')\n"
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('advkit')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == ("['advkit', 'advkit._checks', 'advkit.pipeline', 'advkit.pipeline.driver', "
                                  "'advkit.pipeline.params', 'advkit.progress']"), out.stdout


@pytest.mark.parametrize("notebook", ["01", "02", "03", "04", "05"])
def test_notebook_parameters_read_like_papermill(declared, notebook, caplog):
    """The ast reader gives papermill's names, types and defaults for every notebook, and papermill
    parses every line (it drops a line with a second `=`, e.g. in its comment, with only a log
    warning; papermill is imported only here)."""
    import papermill

    path = pipeline.notebook_paths([notebook])[0]
    with caplog.at_level("WARNING", logger="papermill"):
        theirs = papermill.inspect_notebook(str(path))
    assert not [r.getMessage() for r in caplog.records if "Unable to parse" in r.getMessage()]
    ours = declared[path.stem]
    assert list(ours) == list(theirs)
    for name, info in theirs.items():
        assert ours[name]["inferred_type_name"] == info["inferred_type_name"]
        assert ours[name]["default"] == ast.literal_eval(info["default"])


def test_copied_registries_equal_the_package():
    from advkit import data, models
    from advkit.attacks import evaluate
    from advkit.training import augment
    from advkit.training import fit as train

    assert set(params.MODELS) == set(models.MODELS)  # registries of constructors, named here without torch
    assert set(params.DATASETS) == set(data.DATASETS)
    assert set(RECIPES) == {"paper", train.FAST_RECIPE["recipe"]}
    assert augment.XU_ATTACKS == tuple(evaluate.XU2019.attacks)  # Xu et al.'s presets, in their order


def test_digits_sizes(digits):
    assert params.DATASET_SIZES["digits"] == (len(digits.y_train), len(digits.y_test))
    assert digits.num_classes == params.NUM_CLASSES


@pytest.mark.parametrize("radius, span, resolution, dims, n", [
    (0.2, 1.0, 11, 2, 5), (0.2, 1.0, 21, 2, 13), (0.2, 1.0, 21, 1, 5), (0.1, 0.5, 11, 1, 3), (0.2, 1.0, 11, 1, 3),
    (1.0, 1.0, 3, 2, 5), (0.25, 1.0, 9, 1, 3), (0.04, 1.0, 51, 2, 5),
])
def test_the_radius_rule_is_check_radius(radius, span, resolution, dims, n):
    """The pipeline's rule and landscape.check_radius count with one function and need the same
    points; the counts are by hand (e.g. 21 points over [-1, 1]: 0, +-0.1, +-0.2 per axis, so in 2D
    the centre, 4 at 0.1, 4 at 0.2 and 4 at (0.1, 0.1))."""
    import numpy as np

    from advkit.landscape.sharpness import check_radius

    assert points_within(radius, np.linspace(-span, span, resolution), dims) == n
    rule = next(r for r in params.RULES
                if r.names == ("radius", "span", "resolution" if dims == 2 else "line_resolution"))
    enough = n >= QUADRATIC_FIT_POINTS[dims]
    assert (rule.check(radius, span, resolution) is None) == enough
    if enough:
        assert check_radius(radius, span, resolution, dims) == n
    else:
        with pytest.raises(ValueError, match=f"holds only {n} point"):
            check_radius(radius, span, resolution, dims)


def test_list_elements_and_non_finite_values_are_checked():
    assert params.check_value("eps_grid", [0.0, 0.5], PARAMS["eps_grid"]) is None
    assert "eps_grid[1] must be a finite number >= 0" in params.check_value("eps_grid", [0.0, -1], PARAMS["eps_grid"])
    assert "is empty" in params.check_value("xu_attacks", [], PARAMS["xu_attacks"])
    assert "repeats" in params.check_value("xu_attacks", ["fgsm", "fgsm"], PARAMS["xu_attacks"])
    assert "span must be a finite number > 0, got nan" in params.check_value("span", float("nan"), PARAMS["span"])
    assert "is not a device" in params.check_value("device", "gpu", PARAMS["device"])
    assert params.check_value("robust_resolution", 0, PARAMS["robust_resolution"]) is None
    assert "robust_resolution must be an integer in [3, 1000]" in params.check_value("robust_resolution", 2,
                                                                                     PARAMS["robust_resolution"])
    assert params.check_value("keep_epochs", [], PARAMS["keep_epochs"]) is None


@pytest.mark.parametrize("name, value, repeated", [
    ("eps_grid", [0.1, 0.0, 0.1], "0.1"), ("stadv_flow_grid", [0.2, 0.4, 0.2], "0.2"),
    ("sensitivity_radii", [0.1, 0.1], "0.1"), ("sensitivity_none_radii", [0.01, 0.01], "0.01"),
    ("replicate_dims", [1, 2, 1], "1")])
def test_grids_refuse_a_repeated_value(name, value, repeated):
    # A repeated eps or flow bound passed validation and broke notebook 02's pivot 34 s later.
    problem = params.check_value(name, value, PARAMS[name])
    assert problem and f"{name}=" in problem and f"repeats an element, {repeated}:" in problem
    assert params.check_value(name, sorted(set(value)), PARAMS[name]) is None
    assert params.check_value("keep_epochs", [2, 2], PARAMS["keep_epochs"]) is None  # harmless: saved once


def test_an_unknown_name_suggests_the_closest(declared):
    # A typo listed all ~110 names; a close name is suggested instead, the list stays when none is close.
    with pytest.raises(ValueError, match=r"unknown parameter 'epoch'; did you mean 'epochs'") as err:
        params.checked_values({"epoch": 2}, declared)
    assert "the notebooks take" not in str(err.value)
    with pytest.raises(ValueError, match="unknown parameter 'zzqqxx'; the notebooks take: aa_eps, "):
        params.checked_values({"zzqqxx": 2}, declared)


def test_coerce_reads_declared_types():
    assert params.coerce("run", 2024, "2024") == "2024"
    assert params.coerce("run", 1e3, " 1e3") == "1e3"
    assert params.coerce("lr", "1e-3") == 1e-3
    assert params.coerce("epochs", 3) == 3 and params.coerce("model", "resnet20") == "resnet20"


def test_expected_models_name_variants_and_kept_epochs():
    names = params.expected_models({"xu_attacks": ["fgsm"], "at_variants": ["trades"], "keep_epochs": [2]})
    assert names == ["base", "fgsm", "trades", "trades_early", "trades_e002"]


def test_a_sweep_cell_trains_its_parts_under_its_suffix():
    """zoo_parts and model_suffix (set per cell by advkit.pipeline.sweep) pick and name notebook 03's models."""
    cell = {"xu_attacks": ["fgsm"], "at_variants": ["trades"], "keep_epochs": [2], "zoo_parts": ["at"],
            "model_suffix": "_s1"}
    assert params.expected_models(cell) == ["base", "trades_s1", "trades_s1_early", "trades_s1_e002"]
    assert params.expected_models({**cell, "zoo_parts": ["xu"]}) == ["base", "fgsm_s1"]
    for bad in ("/x", "a b", ".hidden", 3):
        with pytest.raises(ValueError, match="model_suffix"):
            params.check("model_suffix", bad, params.PARAMS["model_suffix"])
    params.check("model_suffix", "", params.PARAMS["model_suffix"])  # the default: names unchanged
    with pytest.raises(ValueError, match="zoo_parts"):
        params.check("zoo_parts", ["at", "all"], params.PARAMS["zoo_parts"])
