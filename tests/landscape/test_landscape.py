"""Directions, surfaces, files, sharpness numbers and landscape figures (advkit.landscape.directions,
advkit.landscape, advkit.plots)."""

import copy
import functools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import xarray as xr
from torch import nn

from advkit._torch import to_float
from advkit.landscape.directions import (
    explicit_directions,
    ignored_parameters,
    load_loss_landscape_directions,
    model_difference,
    normalize_direction,
    random_directions,
    save_loss_landscape_directions,
)
from advkit.landscape.files import load_surface
from advkit.landscape.precision import autocast_error, choose_precision
from advkit.landscape.settings import SurfaceSettings
from advkit.landscape.sharpness import check_radius, mean_increase, quadratic_fit, sharpness_summary, sharpness_table
from advkit.landscape.studies import (
    SensitivitySettings,
    sensitivity_analysis,
    sensitivity_summary,
    sensitivity_surfaces,
    sensitivity_table,
)
from advkit.landscape.surfaces import (
    ComparisonSettings,
    grid,
    interpolation,
    interpolation_pairs,
    line,
    model_surfaces,
    plane,
)
from advkit.models import get_model
from advkit.runs.run import Run, StaleCacheWarning


def _train_briefly(model, x, y, steps=15, seed=0):
    """A few SGD steps: non-trivial weights and BatchNorm statistics in a second."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(y), (64,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    return model.eval()



@pytest.fixture(scope="module")
def train_xy(digits):
    return to_float(digits.x_train[:512]), digits.y_train[:512]


@pytest.fixture(scope="module")
def cnn(train_xy):
    torch.manual_seed(0)
    return _train_briefly(get_model("small_cnn", 10, 1, width=8), *train_xy)


@pytest.fixture(scope="module")
def cnn_b(cnn, train_xy):
    """cnn trained further: different weights and BatchNorm statistics."""
    return _train_briefly(copy.deepcopy(cnn), *train_xy, steps=15, seed=1)


@pytest.fixture(scope="module")
def cnn_c(cnn, train_xy):
    """cnn trained further with another seed: a third set of weights."""
    return _train_briefly(copy.deepcopy(cnn), *train_xy, steps=10, seed=2)


@pytest.fixture(scope="module")
def xy(digits):
    return to_float(digits.x_test[:64]), digits.y_test[:64]


def own_loss(model, x, y):
    with torch.no_grad():
        logits = model(x)
    return F.cross_entropy(logits, y).item(), (logits.argmax(1) == y).float().mean().item()


# --- directions -------------------------------------------------------------------------------


def test_filter_normalization_matches_weight_filters_and_ignores_bias_bn(cnn):
    dirs = random_directions(cnn, 2, seed=3, norm="filter", bn="ignore")
    params = dict(cnn.named_parameters())
    ignored = set(dirs.ignored)
    assert ignored == {n for n in params if n.startswith("bn") or n == "linear.bias"}
    for d in dirs.vectors:
        for name, p in params.items():
            if name in ignored:
                assert torch.count_nonzero(d[name]) == 0, name
            else:
                assert p.dim() >= 2
                torch.testing.assert_close(d[name].flatten(1).norm(dim=1), p.detach().flatten(1).norm(dim=1),
                                           rtol=1e-5, atol=1e-7)
    included = random_directions(cnn, 1, seed=3, norm="filter", bn="include").vectors[0]
    assert torch.count_nonzero(included["bn1.weight"]) == included["bn1.weight"].numel()
    torch.testing.assert_close(included["bn1.weight"].abs(), params["bn1.weight"].detach().abs())


def test_same_seed_same_raw_direction_across_models(cnn, cnn_b):
    a = random_directions(cnn, 2, seed=5, norm="none", bn="include")
    b = random_directions(cnn_b, 2, seed=5, norm="none", bn="include")
    c = random_directions(cnn, 2, seed=6, norm="none", bn="include")
    assert a.sha256 == b.sha256 != c.sha256
    one = random_directions(cnn, 1, seed=5, norm="none", bn="include")
    torch.testing.assert_close(one.vectors[0], a.vectors[0])  # the first direction of two is the single one


def test_layer_and_weight_normalization():
    d, theta = torch.randn(4, 3, 3, 3), torch.randn(4, 3, 3, 3)
    torch.testing.assert_close(normalize_direction(d, theta, "layer").norm(), theta.norm())
    torch.testing.assert_close(normalize_direction(d, theta, "weight"), d * theta.abs())
    torch.testing.assert_close(normalize_direction(d, theta, "none"), d)
    with pytest.raises(ValueError, match="norm='batch'.*filter"):
        normalize_direction(d, theta, "batch")


def test_ignored_parameters_are_chosen_by_module_type_not_name():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3, bias=True)
            self.weights_of_norm = nn.BatchNorm2d(4)  # a BN not named "bn"
            self.scale = nn.Parameter(torch.ones(4))  # 1-D but not a bias: perturbed

        def forward(self, x):
            return self.weights_of_norm(self.conv(x)) * self.scale.view(1, -1, 1, 1)

    assert ignored_parameters(Odd()) == {"conv.bias", "weights_of_norm.weight", "weights_of_norm.bias"}


def test_orthogonalization_reports_cosine(cnn):
    plain = random_directions(cnn, 2, seed=1)
    orth = random_directions(cnn, 2, seed=1, orthogonalize=True)
    assert plain.raw_cosine == pytest.approx(orth.raw_cosine) and plain.cosine == pytest.approx(plain.raw_cosine)
    assert abs(orth.cosine) < 1e-6 < abs(plain.cosine)
    assert orth.sha256 != plain.sha256


def test_explicit_directions_are_used_as_given(cnn, xy):
    names = [n for n, _ in cnn.named_parameters()]
    gen = torch.Generator().manual_seed(0)
    given = [0.01 * torch.randn(p.shape, generator=gen) for p in cnn.parameters()]
    dirs = explicit_directions(cnn, given)
    assert dirs.kind == "explicit" and dirs.norm == "given"
    torch.testing.assert_close(dirs.vectors[0], dict(zip(names, given)))
    ds = line(cnn, dirs, *xy, span=(0, 1), resolution=2)
    moved = copy.deepcopy(cnn)
    with torch.no_grad():
        for p, d in zip(moved.parameters(), given):
            p.add_(d)
    assert ds.loss.values[1] == pytest.approx(own_loss(moved, *xy)[0], rel=1e-5)
    with pytest.raises(ValueError, match="conv1.weight.*shape"):
        explicit_directions(cnn, {"conv1.weight": torch.zeros(2, 2)})
    with pytest.raises(ValueError, match="one tensor per parameter"):
        explicit_directions(cnn, given[:-1])


def test_directions_round_trip_through_a_loss_landscape_file(cnn, tmp_path):
    dirs = random_directions(cnn, 2, seed=9)
    path = save_loss_landscape_directions(dirs, cnn, tmp_path / "dirs.h5")
    loaded = load_loss_landscape_directions(path, cnn)
    assert loaded.kind == "explicit" and loaded.sha256 == dirs.sha256


# --- surfaces ---------------------------------------------------------------------------------


def test_surface_centre_equals_model_loss(cnn, xy):
    ds = grid(cnn, random_directions(cnn, 2, seed=0), *xy, resolution=3)
    loss, acc = own_loss(cnn, *xy)
    assert ds.loss.sel(alpha=0, beta=0).item() == pytest.approx(loss, rel=1e-5)
    assert ds.accuracy.sel(alpha=0, beta=0).item() == pytest.approx(acc)
    assert ds.loss.values.max() > loss  # the corners are off the minimum
    assert ds.computed.values.all()


def test_interpolation_endpoints_equal_both_models(cnn, cnn_b, xy):
    assert not torch.equal(cnn.bn1.running_mean, cnn_b.bn1.running_mean)
    diff = model_difference(cnn, cnn_b)  # parameters and BatchNorm statistics, not the step counter
    torch.testing.assert_close(diff["bn1.running_mean"], cnn_b.bn1.running_mean - cnn.bn1.running_mean)
    assert "bn1.num_batches_tracked" not in diff and "mean" not in diff  # nor the normalization constants
    ds = interpolation(cnn, cnn_b, *xy, resolution=3)
    assert ds.attrs["kind"] == "interpolation"
    assert ds.loss.values[0] == pytest.approx(own_loss(cnn, *xy)[0], rel=1e-5)
    assert ds.loss.values[-1] == pytest.approx(own_loss(cnn_b, *xy)[0], rel=1e-5)
    assert ds.accuracy.values[-1] == pytest.approx(own_loss(cnn_b, *xy)[1])


def test_plane_passes_through_three_models(cnn, cnn_b, cnn_c, xy):
    ds = plane(cnn, cnn_b, cnn_c, *xy, span=(0, 1), resolution=2)
    for model, (a, b) in ((cnn, (0, 0)), (cnn_b, (1, 0)), (cnn_c, (0, 1))):
        assert ds.loss.sel(alpha=a, beta=b).item() == pytest.approx(own_loss(model, *xy)[0], rel=1e-5)


def test_filter_normalized_surface_is_scale_invariant(cnn, xy):
    """Rescaling a conv's filters before BatchNorm (with its statistics) leaves the function and
    the filter-normalized surface unchanged (Li et al. 2018's motivation); `none` is not invariant."""
    scaled = copy.deepcopy(cnn)
    c = torch.linspace(0.3, 4.0, scaled.conv2.out_channels)
    with torch.no_grad():
        scaled.conv2.weight.mul_(c.view(-1, 1, 1, 1))
        scaled.bn2.running_mean.mul_(c)
        scaled.bn2.running_var.mul_(c ** 2)
    surfaces = {}
    for norm in ("filter", "none"):
        for name, model in (("orig", cnn), ("scaled", scaled)):
            dirs = random_directions(model, 2, seed=7, norm=norm)
            surfaces[norm, name] = grid(model, dirs, *xy, span=0.5, resolution=3).loss.values
    np.testing.assert_allclose(surfaces["filter", "scaled"], surfaces["filter", "orig"], rtol=1e-3)
    assert np.abs(surfaces["none", "scaled"] - surfaces["none", "orig"]).max() > 0.01


def test_resume_after_interruption_equals_one_go(cnn, xy, tmp_path):
    dirs = random_directions(cnn, 2, seed=0)
    kw = dict(resolution=4, span=0.5, model_name="cnn", data_name="digits test[:64]")
    one_go = grid(cnn, dirs, *xy, **kw)

    class Interrupt(Exception):
        pass

    def stop_halfway(done, total):
        if done >= total // 2:
            raise Interrupt

    path = tmp_path / "cnn.nc"
    with pytest.raises(Interrupt):
        grid(cnn, dirs, *xy, path=path, callback=stop_halfway, **kw)
    partial = load_surface(path)
    assert partial.computed.values.sum() == 8 and np.isnan(partial.loss.values[2:]).all()
    seen = []
    resumed = grid(cnn, dirs, *xy, path=path, callback=lambda d, t: seen.append(d), **kw)
    assert seen == [12, 16]  # only the two missing rows were computed
    np.testing.assert_allclose(resumed.loss.values, one_go.loss.values, rtol=1e-6)
    np.testing.assert_allclose(load_surface(path).accuracy.values, one_go.accuracy.values)
    # a complete file is returned as it is
    again = grid(cnn, dirs, *xy, path=path, callback=lambda d, t: pytest.fail("recomputed"), **kw)
    xr.testing.assert_allclose(again.loss, resumed.loss)


def test_a_partial_file_with_other_settings_is_not_resumed(cnn, xy, tmp_path):
    path = tmp_path / "cnn.nc"

    def stop_halfway(done, total):
        if done >= total // 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        grid(cnn, random_directions(cnn, 2, seed=0), *xy, resolution=4, span=0.5, path=path, callback=stop_halfway)
    other = random_directions(cnn, 2, seed=1)
    seen = []
    with pytest.warns(StaleCacheWarning, match="direction_seed=0.*direction_seed=1"):
        ds = grid(cnn, other, *xy, resolution=4, span=0.5, path=path, callback=lambda d, t: seen.append(d))
    assert seen == [4, 8, 12, 16]  # every row computed again, none taken from the other seed's half
    np.testing.assert_allclose(ds.loss.values, grid(cnn, other, *xy, resolution=4, span=0.5).loss.values, rtol=1e-6)


def test_a_file_with_other_settings_is_recomputed_with_a_warning_naming_the_setting(cnn, cnn_b, xy, tmp_path):
    """The one cache policy: other settings -> recomputed and replaced, StaleCacheWarning naming the
    setting; never a silent reuse, never a silent regeneration."""
    x, y = xy
    dirs, raw = random_directions(cnn, 1, seed=0), random_directions(cnn, 1, seed=0, norm="none")
    changes = {  # setting: (file made with, then asked for), each a line(...) call
        "direction_seed": ((cnn, dirs, x, y), (cnn, random_directions(cnn, 1, seed=1), x, y)),
        "direction_norm": ((cnn, dirs, x, y), (cnn, random_directions(cnn, 1, seed=0, norm="layer"), x, y)),
        "resolution": ((cnn, dirs, x, y), (cnn, dirs, x, y, {"resolution": 5})),
        "model_sha256": ((cnn, raw, x, y), (cnn_b, random_directions(cnn_b, 1, seed=0, norm="none"), x, y)),
        "data_sha256": ((cnn, dirs, x, y), (cnn, dirs, x.flip(0), y.flip(0))),
        "bn_(data_sha256|mode)": ((cnn, dirs, x, y), (cnn, dirs, x, y, {"bn_mode": "recalibrate", "bn_x": x})),
    }
    for i, (setting, (made, asked)) in enumerate(changes.items()):
        path = tmp_path / f"s{i}.nc"
        first = line(*made[:4], resolution=3, path=path)
        with pytest.warns(StaleCacheWarning, match=rf"{path.name} was made with {setting}=.*recomputing"):
            ds = line(*asked[:4], path=path, **{"resolution": 3, **(asked[4] if len(asked) > 4 else {})})
        stored = load_surface(path)  # replaced by the new surface
        assert stored.attrs["created"] == ds.attrs["created"]
        assert any(stored.attrs[k] != first.attrs[k] for k in stored.attrs if k in ("directions_sha256", "resolution",
                   "model_sha256", "data_sha256", "bn_mode")), setting
        np.testing.assert_allclose(stored.loss.values, ds.loss.values)
        if setting == "resolution":
            assert len(stored.alpha) == 5


def test_speed_options_are_recorded_but_do_not_invalidate_a_file(cnn, xy, tmp_path, recwarn):
    path = tmp_path / "s.nc"
    dirs = random_directions(cnn, 2, seed=0)
    first = grid(cnn, dirs, *xy, resolution=3, path=path, batch_size=16)
    assert first.attrs["batch_size"] == 16 and first.attrs["fold_bn"] == 1
    again = grid(cnn, dirs, *xy, resolution=3, path=path, batch_size=64, points_per_forward=3, fold_bn=False,
                   callback=lambda d, t: pytest.fail("recomputed"))
    assert again.attrs["created"] == first.attrs["created"]
    assert not [w for w in recwarn if issubclass(w.category, StaleCacheWarning)]


def test_surface_settings_are_the_files_attributes_and_are_checked():
    settings = SurfaceSettings(span=0.5, resolution=5, model_name="base", quantities=["loss"], batch_size=32)
    assert settings.span == (-0.5, 0.5) and settings.quantities == ("loss",)  # normalized once
    attrs = settings.as_attrs()
    assert attrs["model"] == "base" and attrs["quantities"] == "loss" and attrs["beta_span"] == "none"
    stored = {k: np.asarray(v) if isinstance(v, list) else v for k, v in attrs.items()}  # as netCDF reads them
    assert SurfaceSettings.from_attrs(stored) == settings
    assert "batch_size" in attrs and "batch_size" not in settings.cache_key()  # speed only: not in the key
    assert settings.replace(resolution=7).cache_key()["resolution"] == 7
    for bad, match in ((dict(resolution=1), "resolution must be an integer >= 2"),
                       (dict(bn_mode="train"), "bn_mode='train'"), (dict(precision="fp16"), "precision='fp16'"),
                       (dict(span=(1.0, -1.0)), "low < high"), (dict(quantities=("loss", "hessian")), "hessian"),
                       (dict(points_per_forward=0), "points_per_forward"), (dict(fold_bn="yes"), "fold_bn")):
        with pytest.raises(ValueError, match=match):
            SurfaceSettings(**bad)
    with pytest.raises(ValueError, match=r"unknown surface setting\(s\) \['spam'\]"):
        settings.replace(spam=1)
    with pytest.raises(ValueError, match="record no settings"):
        SurfaceSettings.from_attrs({"model": "base"})


def test_vmap_and_folded_paths_equal_the_plain_loop(cnn, cnn_b, xy):
    dirs = random_directions(cnn, 2, seed=2)
    plain = grid(cnn, dirs, *xy, resolution=3, fold_bn=False, points_per_forward=1)
    assert plain.attrs["fold_bn_pairs"] == 0
    for ppf, fold in ((1, True), (4, False), (4, True)):
        ds = grid(cnn, dirs, *xy, resolution=3, fold_bn=fold, points_per_forward=ppf)
        assert ds.attrs["fold_bn_pairs"] == (3 if fold else 0) and ds.attrs["fold_bn_static"] == int(fold)
        np.testing.assert_allclose(ds.loss.values, plain.loss.values, rtol=1e-5)
        np.testing.assert_allclose(ds.accuracy.values, plain.accuracy.values)
    # batched BatchNorm statistics (an interpolation) through vmap and folding too
    a = interpolation(cnn, cnn_b, *xy, resolution=4, fold_bn=False)
    b = interpolation(cnn, cnn_b, *xy, resolution=4, points_per_forward=3)
    assert b.attrs["fold_bn_pairs"] == 3 and b.attrs["fold_bn_static"] == 0  # statistics move: folded per point
    np.testing.assert_allclose(b.loss.values, a.loss.values, rtol=1e-5)


def test_channels_last_layout_gives_the_same_surface(cnn, xy):
    dirs = random_directions(cnn, 1, seed=2)
    a = line(cnn, dirs, *xy, resolution=3, channels_last=False)
    for ppf in (1, 3):
        b = line(cnn, dirs, *xy, resolution=3, channels_last=True, points_per_forward=ppf)
        np.testing.assert_allclose(b.loss.values, a.loss.values, rtol=1e-5)


def test_recalibrated_batchnorm_matches_update_bn(cnn, train_xy, xy):
    from torch.optim.swa_utils import update_bn

    dirs = random_directions(cnn, 1, seed=4)
    bn_x = train_xy[0][:128]
    ds = line(cnn, dirs, *xy, span=(0, 0.5), resolution=2, bn_mode="recalibrate", bn_x=bn_x, bn_batch_size=32)
    moved = copy.deepcopy(cnn)
    with torch.no_grad():
        for name, p in moved.named_parameters():
            p.add_(0.5 * dirs.vectors[0][name])
    update_bn([bn_x[i:i + 32] for i in range(0, 128, 32)], moved)
    moved.eval()
    assert ds.loss.values[1] == pytest.approx(own_loss(moved, *xy)[0], rel=1e-5)
    eval_mode = line(cnn, dirs, *xy, span=(0, 0.5), resolution=2)
    assert abs(eval_mode.loss.values[1] - ds.loss.values[1]) > 1e-4  # the two modes really differ


def _fgsm(model, x, y, eps=0.1):
    x = x.clone().requires_grad_(True)
    grad, = torch.autograd.grad(F.cross_entropy(model(x), y), x)
    return (x + eps * grad.sign()).clamp(0, 1).detach()


def test_robust_loss_reruns_the_attack_at_each_point(cnn, xy):
    dirs = random_directions(cnn, 1, seed=0)
    attack = functools.partial(_fgsm, eps=0.1)
    ds = line(cnn, dirs, *xy, span=0.5, resolution=3, attack=attack)
    assert "eps=0.1" in ds.attrs["attack"] and "0x" not in ds.attrs["attack"]
    assert ds.attrs["robust"] == "attack re-run at each point"
    centre_adv = attack(cnn, *xy)
    assert ds.robust_loss.values[1] == pytest.approx(own_loss(cnn, centre_adv, xy[1])[0], rel=1e-5)
    assert (ds.robust_loss.values > ds.loss.values).all()
    fixed = line(cnn, dirs, *xy, span=0.5, resolution=3, x_adv=centre_adv)
    assert fixed.attrs["robust"] == "fixed adversarial examples"
    assert "fixed adversarial examples" in fixed.robust_loss.attrs["long_name"]
    assert fixed.robust_loss.values[1] == pytest.approx(ds.robust_loss.values[1], rel=1e-6)
    assert not np.allclose(fixed.robust_loss.values[[0, 2]], ds.robust_loss.values[[0, 2]], rtol=1e-3)


def test_real_pgd_can_be_passed_with_partial(cnn, xy):
    pgd = pytest.importorskip("advkit.attacks.pgd").pgd
    ds = line(cnn, random_directions(cnn, 1, seed=0), xy[0][:16], xy[1][:16], span=0.5, resolution=2,
                attack=functools.partial(pgd, eps=0.1, steps=2), quantities=("robust_accuracy",))
    assert list(ds.data_vars) == ["robust_accuracy", "computed"]
    assert "pgd" in ds.attrs["attack"] and "steps=2" in ds.attrs["attack"]


def test_bf16_autocast_error_helper_on_cpu(cnn, xy):
    err = autocast_error(cnn, *xy)
    with torch.no_grad():
        fp32 = F.cross_entropy(cnn(xy[0]), xy[1]).item()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = F.cross_entropy(cnn(xy[0]).float(), xy[1]).item()
    # a difference of two float32 means (~1e-7 relative each) of losses 3e-5 apart: 1e-2 is rounding
    assert err == pytest.approx(abs(bf16 - fp32) / fp32, rel=1e-2)
    assert 0 < err < 0.1  # bf16 really changes the loss, but not wildly
    assert choose_precision(cnn, *xy, "auto") == ("fp32", None)  # CPU: fp32 unless asked
    assert choose_precision(cnn, *xy, "auto", check_on_cpu=True, tolerance=err * 2)[0] == "bf16"
    assert choose_precision(cnn, *xy, "auto", check_on_cpu=True, tolerance=err / 2)[0] == "fp32"
    ds = line(cnn, random_directions(cnn, 1, seed=0), *xy, resolution=3, precision="bf16", fold_bn=False)
    # the largest error over the line's probe points: its centre (the model's weights), both ends
    assert ds.attrs["precision"] == "bf16" and ds.attrs["precision_probe_points"] == 3
    assert ds.attrs["autocast_relative_error"] >= err * (1 - 1e-3)


def test_bad_inputs_raise_before_computing(cnn, xy):
    dirs = random_directions(cnn, 1, seed=0)
    with pytest.raises(ValueError, match="bn='none'.*ignore"):
        random_directions(cnn, 1, seed=0, bn="none")
    with pytest.raises(ValueError, match="bn_mode='train'"):
        line(cnn, dirs, *xy, bn_mode="train")
    with pytest.raises(ValueError, match="robust quantities need attack"):
        line(cnn, dirs, *xy, quantities=("robust_loss",))
    with pytest.raises(ValueError, match="needs 2 direction"):
        grid(cnn, dirs, *xy)
    with pytest.raises(ValueError, match="needs bn_x"):
        line(cnn, dirs, *xy, bn_mode="recalibrate")


# --- numbers for "sharper" ----------------------------------------------------------------------


def _quadratic(h, span=1.0, n=21, c=0.5, g=(0.0, 0.0)):
    a = np.linspace(-span, span, n)
    aa, bb = np.meshgrid(a, a, indexing="ij")
    pts = np.stack([aa, bb], -1)
    loss = c + pts @ np.asarray(g) + 0.5 * np.einsum("...i,ij,...j->...", pts, np.asarray(h), pts)
    return xr.Dataset({"loss": (("alpha", "beta"), loss)}, coords={"alpha": a, "beta": a},
                      attrs={"direction_norm": "filter"})


def test_quadratic_fit_recovers_hessian_eigenvalues():
    h = np.array([[6.0, 1.0], [1.0, 1.0]])
    fit = quadratic_fit(_quadratic(h, g=(0.3, -0.1)), radius=0.5)
    np.testing.assert_allclose([fit["curvature_min"], fit["curvature_max"]], np.linalg.eigvalsh(h), rtol=1e-8)
    assert fit["centre_fit"] == pytest.approx(0.5) and fit["gradient_norm"] == pytest.approx(np.hypot(0.3, 0.1))
    one_d = _quadratic(h).loss.sel(beta=0, drop=True).to_dataset()
    assert quadratic_fit(one_d, radius=0.5)["curvature_max"] == pytest.approx(6.0)
    with pytest.raises(ValueError, match="radius"):
        quadratic_fit(one_d, radius=0.01)


def test_mean_increase_and_sharpness_table():
    flat, sharp = _quadratic(np.eye(2)), _quadratic(4 * np.eye(2))
    # mean of (a^2 + b^2) / 2 over the disc points; 4x larger for the sharper surface
    assert mean_increase(sharp, radius=0.3) == pytest.approx(4 * mean_increase(flat, radius=0.3))
    table = sharpness_table({"flat": flat, "sharp": sharp}, radius=0.3)
    assert list(table.index) == ["flat", "sharp"]
    assert table.loc["sharp", "curvature_max"] == pytest.approx(4.0)
    assert table.loc["flat", "centre"] == pytest.approx(0.5)


def test_sensitivity_table_detects_a_changed_ordering():
    surfaces = {}
    for span in (0.5, 1.0):
        surfaces["filter", span, "base"] = _quadratic(np.eye(2), span=span)
        surfaces["filter", span, "pgd"] = _quadratic(3 * np.eye(2), span=span)
        surfaces["filter", span, "fgsm"] = _quadratic(2 * np.eye(2), span=span)
        surfaces["none", span, "base"] = _quadratic(5 * np.eye(2), span=span)  # order flips
        surfaces["none", span, "pgd"] = _quadratic(3 * np.eye(2), span=span)
        surfaces["none", span, "fgsm"] = _quadratic(2 * np.eye(2), span=span)
    table = sensitivity_table(surfaces)
    filt = table[table.norm == "filter"]
    assert filt.same_ordering.all() and (filt.ordering == "pgd > fgsm > base").all()
    none = table[table.norm == "none"]
    assert not none.same_ordering.any() and none.kendall_tau.iloc[0] == pytest.approx(-1 / 3)
    assert table.attrs["reference"] == "filter @ span 1"


def _hand_curvature_and_increase(model, norm, span, x, y):
    """Curvature and mean increase of the 1D loss over 5 points of [-span, span], by hand: weights
    moved in a copy of the model, and the least-squares parabola through symmetric points in closed
    form (a = span * (-1, -1/2, 0, 1/2, 1): a^2 - mean = span^2 (1/2, -1/4, -1/2, -1/4, 1/2), whose
    squares sum to 7/8 span^4)."""
    d = random_directions(model, 1, seed=0, norm=norm).vectors[0]
    losses = []
    for a in np.linspace(-span, span, 5):
        moved = copy.deepcopy(model)
        with torch.no_grad():
            for name, p in moved.named_parameters():
                p.add_(float(a) * d[name])
            losses.append(F.cross_entropy(moved(x), y, reduction="none").double().mean().item())
    lm2, lm1, l0, l1, l2 = losses
    c2 = (0.5 * (lm2 + l2) - 0.25 * (lm1 + l1) - 0.5 * l0) / (7 / 8 * span ** 2)
    return 2 * c2, float(np.mean(losses)) - l0


def _kendall_tau_by_hand(u, v):
    """(concordant - discordant) / pairs, for values without ties."""
    pairs = [(i, j) for i in range(len(u)) for j in range(i + 1, len(u))]
    return sum(np.sign(u[i] - u[j]) * np.sign(v[i] - v[j]) for i, j in pairs) / len(pairs)


def test_sensitivity_ordering_against_a_hand_computed_case(cnn, cnn_b, cnn_c, xy, tmp_path):
    """Li et al. 2018's point, by hand: shrinking a model's conv filters 5x (BatchNorm statistics
    compensating: the same function) keeps its filter-normalized curvature, the flattest here, but
    makes it by far the sharpest under unnormalized directions of the same raw draw."""
    x, y = xy[0][:16], xy[1][:16]
    small = copy.deepcopy(cnn)
    with torch.no_grad():
        for i in (1, 2, 3):
            getattr(small, f"conv{i}").weight.mul_(0.2)
            getattr(small, f"bn{i}").running_mean.mul_(0.2)
            getattr(small, f"bn{i}").running_var.mul_(0.04)
    models = {"small": small, "b": cnn_b, "c": cnn_c}
    spans = {"filter": [0.25, 0.5], "none": [0.05]}
    surfaces = sensitivity_surfaces(models, x, y, Run(tmp_path), SurfaceSettings(resolution=5),
                                    SensitivitySettings(norms=("filter", "none"), spans=spans))
    assert len(list((tmp_path / "landscapes" / "sensitivity").glob("*_1d.nc"))) == 9
    hand = {(n, s): {m: _hand_curvature_and_increase(model, n, s, x, y) for m, model in models.items()}
            for n in spans for s in spans[n]}
    order = {k: sorted(v, key=lambda m: -v[m][0]) for k, v in hand.items()}
    assert order["filter", 0.5] == ["b", "c", "small"] and order["none", 0.05] == ["small", "b", "c"]  # the flip
    table = sensitivity_summary(surfaces, radius_fraction=1.0, reference=("filter", 0.5))
    for metric, k in (("curvature", 0), ("mean_increase", 1)):
        for (norm, span), values in hand.items():
            row = table[(table.metric == metric) & (table.norm == norm) & (table.span == span)].iloc[0]
            for m in models:
                assert row[m] == pytest.approx(values[m][k], rel=1e-4, abs=1e-6), (metric, norm, span, m)
            ref = [hand["filter", 0.5][m][k] for m in models]
            tau = _kendall_tau_by_hand([values[m][k] for m in models], ref)
            assert row.kendall_tau == pytest.approx(tau), (metric, norm, span)
            by_hand = sorted(models, key=lambda m: -values[m][k])
            assert row.ordering == " > ".join(by_hand)
            assert row.same_ordering == (by_hand == sorted(models, key=lambda m: -hand["filter", 0.5][m][k]))
    curvature = table[table.metric == "curvature"].set_index(["norm", "span"])
    assert curvature.loc[("none", 0.05), "kendall_tau"] == pytest.approx(-1 / 3)  # 1 pair of 3 concordant
    assert not curvature.loc[("none", 0.05), "same_ordering"]


def test_sensitivity_analysis_reads_its_run_files(cnn, cnn_b, xy, tmp_path):
    x, y = xy[0][:32], xy[1][:32]
    run = Run(tmp_path)
    table = sensitivity_analysis({"a": cnn, "b": cnn_b}, x, y, run, SurfaceSettings(resolution=11),
                                 SensitivitySettings(norms=("filter", "none"), spans=(0.5,)), radius_fraction=0.4)
    assert len(table) == 2 and set(table.columns) >= {"a", "b", "kendall_tau", "same_ordering"}
    for norm in ("filter", "none"):  # each value is the fit on its file, at radius 0.4 * span
        row = table[table.norm == norm].iloc[0]
        for m in ("a", "b"):
            ds = load_surface(run.sensitivity_surface(m, norm, 0.5, 1))
            assert ds.attrs["model"] == m and ds.attrs["span"].tolist() == [-0.5, 0.5]
            assert row[m] == pytest.approx(quadratic_fit(ds, radius=0.2)["curvature_max"])
    assert table.loc[table.norm == "none", "a"].item() != pytest.approx(table.loc[table.norm == "filter", "a"].item())


# --- figures --------------------------------------------------------------------------------


def test_comparison_figure_shares_one_colour_scale(tmp_path):
    plots = pytest.importorskip("advkit.plots.figures")
    surfaces = {"base": _quadratic(np.eye(2)), "pgd": _quadratic(4 * np.eye(2))}
    for kind in ("contour", "contourf", "heatmap", "surface"):
        for log in (False, True):
            fig = plots.compare_surfaces(surfaces, kind=kind, log=log)
            norms = {(m.norm.vmin, m.norm.vmax) for m in plots.colour_mappables(fig)}
            assert len(norms) == 1, (kind, log)
            vmin, vmax = norms.pop()
            lo = min(float(s.loss.min()) for s in surfaces.values())
            hi = max(float(s.loss.max()) for s in surfaces.values())
            assert vmin == pytest.approx(lo) and vmax == pytest.approx(hi)
            plots.plt.close(fig)
    a = plots.save_figure(plots.curves_1d({"base": _quadratic(np.eye(2)).sel(beta=0)}), "c", tmp_path)
    first = a[1].read_bytes()
    plots.save_figure(plots.curves_1d({"base": _quadratic(np.eye(2)).sel(beta=0)}), "c", tmp_path)
    assert a[1].read_bytes() == first and a[0].stat().st_size > 0  # reproducible PDF


# --- the notebook's helpers (model_surfaces, sharpness_summary, sensitivity_summary, compare_curves) -----


@pytest.mark.slow
def test_model_surfaces_are_consistent_cached_and_checked(cnn, cnn_b, xy, tmp_path):
    x, y = xy[0][:32], xy[1][:32]
    models = {"base": cnn, "ft": cnn_b}
    settings = SurfaceSettings(span=0.5, resolution=5)
    kw = dict(attack=functools.partial(_fgsm, eps=0.1), attack_name="FGSM 0.1")
    run = Run(tmp_path)
    out = model_surfaces(models, x, y, run, settings, ComparisonSettings(seed=0), **kw)
    assert set(out) == {"grid", "line", "interpolation"} and list(out["interpolation"]) == ["ft"]
    assert sorted(p.name for p in (tmp_path / "landscapes").glob("*.nc")) == [
        "base_grid.nc", "base_line.nc", "ft_grid.nc", "ft_interpolation.nc", "ft_line.nc"]
    for name, model in models.items():
        grid, line = out["grid"][name], out["line"][name]
        # the line runs along the grid's first direction: it is the grid's beta = 0 row
        np.testing.assert_allclose(line.loss.values, grid.loss.sel(beta=0).values, rtol=1e-5)
        assert line.robust_loss.values[2] == pytest.approx(own_loss(model, _fgsm(model, x, y), y)[0], rel=1e-5)
        assert line.attrs["attack"] == "FGSM 0.1"
    interp = out["interpolation"]["ft"]
    assert interp.attrs["model"] == "base -> ft"
    assert interp.loss.values[[0, -1]] == pytest.approx([own_loss(cnn, x, y)[0], own_loss(cnn_b, x, y)[0]], rel=1e-5)
    again = model_surfaces(models, x, y, run, settings, ComparisonSettings(seed=0), **kw)  # reused, not recomputed
    assert again["grid"]["ft"].attrs["created"] == out["grid"]["ft"].attrs["created"]
    np.testing.assert_array_equal(again["line"]["base"].robust_loss.values, out["line"]["base"].robust_loss.values)
    with pytest.warns(StaleCacheWarning) as stale:
        other = model_surfaces({"base": cnn}, x, y, run, settings, ComparisonSettings(seed=1), **kw)
    assert sorted(str(w.message).partition(" was made with direction_seed=0, this call asks for direction_seed=1")[0]
                  .rpartition("/")[2] for w in stale) == ["base_grid.nc", "base_line.nc"]
    assert other["grid"]["base"].attrs["direction_seed"] == 1
    assert load_surface(run.surface("base", "grid")).attrs["direction_seed"] == 1  # the file was replaced
    redone = model_surfaces({"base": cnn}, x, y, run, settings, ComparisonSettings(seed=1), **kw, overwrite=True)
    assert redone["grid"]["base"].attrs["created"] >= other["grid"]["base"].attrs["created"]
    with pytest.raises(ValueError, match="radius=0.1 holds only 1 point"):
        model_surfaces(models, x, y, Run(tmp_path / "new"), settings, ComparisonSettings(radius=0.1), **kw)
    assert not (tmp_path / "new").exists()  # failed before computing anything
    with pytest.raises(ValueError, match="robust_resolution > 0 needs attack"):
        model_surfaces(models, x, y, comparison=ComparisonSettings(robust_resolution=5))
    with pytest.raises(ValueError, match=r"span centred on the model"):
        model_surfaces(models, x, y, settings=SurfaceSettings(span=(0, 1)))


@pytest.mark.parametrize("fields, match", [
    (dict(robust_resolution=1), "robust_resolution must be 0"), (dict(norm="filters"), "norm"),
    (dict(line_resolution=1), "line_resolution"), (dict(robust_n=0), "robust_n"), (dict(seed=-1), "seed")])
def test_comparison_settings_name_the_bad_field(fields, match):
    with pytest.raises(ValueError, match=match):
        ComparisonSettings(**fields)


@pytest.mark.parametrize("fields, match", [
    (dict(norms=("filter", "filters")), "norms entry"), (dict(spans=()), "non-empty"), (dict(spans=(0,)), "spans"),
    (dict(dims=3), "dims"), (dict(bn="exclude"), "bn"), (dict(seed=-1), "seed")])
def test_sensitivity_settings_name_the_bad_field(fields, match):
    with pytest.raises(ValueError, match=match):
        SensitivitySettings(**fields)


def test_model_surfaces_robust_subset_and_robust_grid(cnn, xy):
    x, y = xy[0][:32], xy[1][:32]
    out = model_surfaces({"base": cnn}, x, y, settings=SurfaceSettings(span=0.5, resolution=3, data_name="test"),
                         comparison=ComparisonSettings(robust_resolution=3, robust_n=8),
                         attack=functools.partial(_fgsm, eps=0.1))
    assert set(out) == {"grid", "line", "robust_grid"}  # one model: nothing to interpolate
    assert out["grid"]["base"].attrs["data_n"] == 32 and out["line"]["base"].attrs["data_n"] == 8
    assert out["robust_grid"]["base"].attrs["data"] == "test, first 8"
    rg = out["robust_grid"]["base"]
    assert set(rg.data_vars) == {"robust_loss", "robust_accuracy", "computed"}
    np.testing.assert_allclose(rg.robust_loss.sel(beta=0).values, out["line"]["base"].robust_loss.values, rtol=1e-5)


def test_check_radius_counts_points_within_the_radius():
    assert check_radius(0.2, 1.0, 21, dims=1) == 5
    assert check_radius(0.2, 1.0, 21, dims=2) == 13  # (0,0), 4 at 0.1, 4 at 0.2, 4 at (0.1, 0.1)
    with pytest.raises(ValueError, match="radius=0.2 holds only 1 point.*needs 7"):
        check_radius(0.2, 1.0, 9, dims=2)


def test_sharpness_summary_has_one_row_per_model():
    clean = {"flat": _quadratic(np.eye(2)), "sharp": _quadratic(np.diag([4.0, 2.0]))}
    robust = {m: ds.rename(loss="robust_loss").sel(beta=0, drop=True) for m, ds in clean.items()}
    table = sharpness_summary(clean, robust, radius=0.3)
    assert list(table.index) == ["flat", "sharp"] and table.index.name == "model"
    assert table.loc["sharp", "loss_curvature_max"] == pytest.approx(4.0)
    assert table.loc["sharp", "loss_curvature_min"] == pytest.approx(2.0)
    assert table.loc["sharp", "robust_loss_curvature_max"] == pytest.approx(4.0)  # 1D: along alpha
    assert (table["surface_sharpness"] == table["loss_curvature_max"]).all()
    assert table.loc["flat", "loss_dims"] == 2 and table.loc["flat", "robust_loss_dims"] == 1
    assert table.loc["sharp", "robust_loss_mean_increase"] > table.loc["flat", "robust_loss_mean_increase"]
    assert "robust_loss_centre" not in sharpness_summary(clean, radius=0.3)


def test_sensitivity_summary_per_norm_spans_and_one_model(cnn, cnn_b, xy, tmp_path):
    x, y = xy[0][:16], xy[1][:16]
    spans = {"filter": [0.1, 0.2], "none": [0.01]}
    surfaces = sensitivity_surfaces({"a": cnn, "b": cnn_b}, x, y, Run(tmp_path), SurfaceSettings(resolution=5),
                                    SensitivitySettings(norms=("filter", "none"), spans=spans))
    assert sorted(surfaces) == [("filter", 0.1, "a"), ("filter", 0.1, "b"), ("filter", 0.2, "a"),
                                ("filter", 0.2, "b"), ("none", 0.01, "a"), ("none", 0.01, "b")]
    table = sensitivity_summary(surfaces, radius_fraction=1.0, reference=("filter", 0.2))
    assert list(table.metric) == ["curvature"] * 3 + ["mean_increase"] * 3
    assert table.attrs["reference"] == "filter @ span 0.2"
    for row in table.itertuples():  # radius_fraction 1: each value is the metric within r = span
        for m in ("a", "b"):
            ds = surfaces[row.norm, row.span, m]
            want = quadratic_fit(ds, radius=row.span)["curvature_max"] if row.metric == "curvature" else \
                mean_increase(ds, radius=row.span)
            assert getattr(row, m) == pytest.approx(want)
    single = sensitivity_summary({k: v for k, v in surfaces.items() if k[2] == "a"}, radius_fraction=1.0)
    assert single.same_ordering.all() and single.kendall_tau.isna().all()  # one model: trivially the same
    with pytest.raises(ValueError, match="spans has no entry.*'layer'"):
        SensitivitySettings(norms=("filter", "layer"), spans=spans)
    fig = pytest.importorskip("advkit.plots.figures").sensitivity_figure(table)
    assert len(fig.axes) == 4  # 2 metrics x 2 normalizations
    fig.clf()


def test_compare_curves_draws_each_model_clean_and_robust():
    plots = pytest.importorskip("advkit.plots.figures")
    a = np.linspace(-1, 1, 5)
    lines = {}
    for name, k in (("base", 1.0), ("pgd", 3.0)):
        lines[name] = xr.Dataset({"loss": ("alpha", k * a ** 2), "accuracy": ("alpha", 1 - a ** 2 / 2),
                                  "robust_loss": ("alpha", k * a ** 2 + 1),
                                  "robust_accuracy": ("alpha", 0.5 - a ** 2 / 4)},
                                 coords={"alpha": a}, attrs={"attack": "PGD-5"})
    fig = plots.compare_curves(lines)
    ax_loss, ax_acc = fig.axes[:2]
    drawn = [ln for ln in ax_loss.get_lines() if len(ln.get_xdata()) == 5]
    assert len(drawn) == 4  # 2 models x (clean, robust)
    np.testing.assert_allclose(drawn[3].get_ydata(), 3 * a ** 2 + 1)
    assert drawn[3].get_linestyle() == "--" and drawn[2].get_color() == drawn[3].get_color()
    assert ax_acc.get_ylim() == pytest.approx((-0.02, 1.02))
    assert "PGD-5" in " ".join(t.get_text() for t in fig.legends[0].get_texts())
    plots.plt.close(fig)
    with pytest.raises(ValueError, match="is 2D"):
        plots.compare_curves({"base": _quadratic(np.eye(2))})


@pytest.mark.slow
def test_models_of_different_architectures_are_not_interpolated(tmp_path):
    """The paper profile's AT models are ResNet-18s beside a ResNet-32 base: interpolations and
    planes need one parameter space, so they are skipped with the reason (or refused clearly)."""
    torch.manual_seed(0)
    base, ft, at = get_model("resnet32").eval(), get_model("resnet32").eval(), get_model("resnet18").eval()
    x, y = torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    with pytest.raises(ValueError, match=r"different architectures \(resnet32 vs resnet18\)"):
        model_difference(base, at)
    with pytest.raises(ValueError, match="different architectures"):
        plane(base, ft, at, x, y, resolution=3)
    hundred = get_model("resnet32", num_classes=100)  # same names, another shape
    with pytest.raises(ValueError, match=r"resnet32 vs resnet32\): '.+' is \(10, 64\) vs \(100, 64\)"):
        model_difference(base, hundred)
    models = {"base": base, "ft": ft, "pgd_at": at}
    ok, skipped = interpolation_pairs(models)
    assert ok == ["ft"] and list(skipped) == ["pgd_at"] and "resnet32 vs resnet18" in skipped["pgd_at"]
    out = model_surfaces(models, x, y, Run(tmp_path), SurfaceSettings(span=0.5, resolution=3))
    assert list(out["interpolation"]) == ["ft"] and set(out["grid"]) == set(models)
    # random directions are drawn per architecture: the ResNet-18 grid is centred on its own loss
    assert out["grid"]["pgd_at"].loss.sel(alpha=0, beta=0).item() == pytest.approx(
        F.cross_entropy(at(x), y).item(), rel=1e-4)
