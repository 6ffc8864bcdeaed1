"""The parameter declarations (advkit.params) against the notebooks, the profiles and the package."""

import ast

import pytest

from advkit import params, pipeline
from advkit.params import PARAMS, notebook_parameters, points_within


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
        params.validate({name: info["default"] for name, info in p.items()}, declared, environment=False)
    for profile in pipeline.available_profiles():
        params.validate(pipeline.load_profile(profile), declared)


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
    from advkit import augment, correlation, data, directions, models, train, zoo

    assert set(params.MODELS) == set(models.MODELS)
    assert set(params.DATASETS) == set(data.DATASETS)
    assert set(params.OPTIMIZERS) == set(train.OPTIMIZERS) and set(params.SCHEDULES) == set(train.SCHEDULES)
    assert set(params.NORMS) == set(directions.NORMS)
    assert set(params.XU_ATTACKS) == set(augment.XU_ATTACKS)
    assert set(params.AUGMENT_MODES) == set(augment.AUGMENT_MODES)
    assert set(params.AUGMENT_DTYPES) == set(augment.DTYPES)
    assert set(params.HESSIAN_BACKENDS) == set(zoo.HESSIAN_BACKENDS)
    assert set(params.CI_METHODS) == set(correlation.CI_METHODS)


def test_digits_sizes(digits):
    assert params.DATASET_SIZES["digits"] == (len(digits.y_train), len(digits.y_test))
    assert digits.num_classes == params.NUM_CLASSES


@pytest.mark.parametrize("radius, span, resolution, dims", [
    (0.2, 1.0, 11, 2), (0.2, 1.0, 21, 2), (0.2, 1.0, 51, 2), (0.1, 0.5, 11, 1), (0.2, 1.0, 11, 1),
    (0.3, 1.0, 7, 2), (1.0, 1.0, 3, 2), (0.25, 1.0, 9, 1), (0.04, 1.0, 51, 2),
])
def test_points_within_counts_as_check_radius(radius, span, resolution, dims):
    from advkit.landscape import check_radius

    n = points_within(radius, span, resolution, dims)
    try:
        assert check_radius(radius, span, resolution, dims) == n
    except ValueError as err:
        assert f"holds only {n} point" in str(err)


def test_list_elements_and_non_finite_values_are_checked():
    assert params.check_value("eps_grid", [0.0, 0.5], PARAMS["eps_grid"]) is None
    assert "element 1=-1" in params.check_value("eps_grid", [0.0, -1], PARAMS["eps_grid"])
    assert "is empty" in params.check_value("xu_attacks", [], PARAMS["xu_attacks"])
    assert "repeats" in params.check_value("xu_attacks", ["fgsm", "fgsm"], PARAMS["xu_attacks"])
    assert "not finite" in params.check_value("span", float("nan"), PARAMS["span"])
    assert params.check_value("keep_epochs", [], PARAMS["keep_epochs"]) is None


def test_coerce_reads_declared_types():
    assert params.coerce("run", 2024, "2024") == "2024"
    assert params.coerce("run", 1e3, " 1e3") == "1e3"
    assert params.coerce("lr", "1e-3") == 1e-3
    assert params.coerce("epochs", 3) == 3 and params.coerce("model", "resnet20") == "resnet20"


def test_expected_models_name_variants_and_kept_epochs():
    names = params.expected_models({"xu_attacks": ["fgsm"], "at_variants": ["trades"], "keep_epochs": [2]})
    assert names == ["base", "fgsm", "trades", "trades_early", "trades_e002"]
