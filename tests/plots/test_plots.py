"""Figures: byte-identical saves (no dates, no versions) and a sane perturbation scale in the attack gallery."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from advkit.plots.figures import amplified_perturbation, attack_gallery, save_figure


def _figure():
    fig, ax = plt.subplots(figsize=(3, 2))
    ax.plot([0, 1, 2], [1.0, 0.3, 0.7], label="robust loss ε = 8/255")
    ax.imshow(torch.rand(8, 8, generator=torch.Generator().manual_seed(0)))
    ax.legend()
    return fig


def test_saving_twice_gives_identical_bytes(tmp_path, monkeypatch):
    fig = _figure()
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "0")           # a date in the file would differ between the saves
    first = [p.read_bytes() for p in save_figure(fig, "f", tmp_path / "a")]
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    second = save_figure(fig, "f", tmp_path / "b")
    assert [p.suffix for p in second] == [".png", ".pdf"]
    assert [p.read_bytes() for p in second] == first
    pdf = first[1]
    for key in (b"/CreationDate", b"/ModDate", b"/Producer", b"/Creator"):
        assert key not in pdf
    assert b"matplotlib" not in first[0].lower()            # no Software chunk in the PNG
    plt.close(fig)


def test_perturbation_label_for_zero_tiny_and_real_differences():
    zero = torch.zeros(3, 32, 32)
    image, title = amplified_perturbation(zero, "stAdv")
    assert title == "stAdv δ = 0" and torch.equal(image, torch.full_like(zero, 0.5))
    tiny = zero.clone()
    tiny[0, 0, 0] = 1e-9                                      # float noise, not a perturbation: not ×5e8
    assert amplified_perturbation(tiny, "stAdv")[1] == "stAdv δ ≈ 0"
    fgsm = torch.full((3, 32, 32), 8 / 255) * torch.sign(torch.randn(3, 32, 32, generator=torch.Generator()
                                                                       .manual_seed(1)))
    image, title = amplified_perturbation(fgsm, "FGSM")
    assert title == "FGSM δ ×16"                              # 0.5 / (8/255) = 15.9
    assert float(image.min()) == pytest.approx(0) and float(image.max()) == pytest.approx(1)
    assert amplified_perturbation(torch.full((1, 8, 8), 0.2))[1] == "δ ×2.5"


def test_gallery_titles_on_cifar_shaped_images():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 32, 32, generator=gen) * 0.8 + 0.1
    adversarial = {"FGSM": (x + 8 / 255 * torch.sign(torch.randn(x.shape, generator=gen))).clamp(0, 1),
                   "stAdv": x.clone()}
    fig = attack_gallery(x, adversarial, flow=torch.zeros(2, 2, 32, 32), labels=["cat", "dog"])
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[:6] == ["clean (cat)", "FGSM", "FGSM δ ×16", "stAdv", "stAdv δ = 0", "stAdv flow"]
    assert not any("e+" in t or "×0" in t for t in titles)
    plt.close(fig)


# --- zoo scale (issue 13) --------------------------------------------------------------------------


def _zoo_table(n, seed=0):
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(seed)
    names = ["base"] + [f"{v}_s{k}" for k in range(n) for v in ("pgd_at", "trades")][:n - 1]
    flat = rng.uniform(0.3, 2.0, n)
    return pd.DataFrame({"family": names, "avg_case_flatness": flat, "robust_loss_test": 1 + flat + rng.normal(size=n)},
                        index=pd.Index(names, name="model"))


def test_scatter_names_a_readable_subset_of_a_zoo():
    from advkit.plots.models import MAX_LABELS, labelled, model_scatter

    pair = [("avg_case_flatness", "robust_loss_test")]
    small = model_scatter(_zoo_table(11), pair)                    # the quick profile's size: every name
    assert sorted(t.get_text() for t in small.axes[0].texts) == sorted(_zoo_table(11).index)
    zoo = _zoo_table(130)
    ax = model_scatter(zoo, pair).axes[0]
    names = [t.get_text() for t in ax.texts if t.get_text() in zoo.index]
    assert len(names) == MAX_LABELS and names[0] == "base"        # `always` first, then the extremes
    assert any(t.get_text() == f"named: {MAX_LABELS} of 130 (the most extreme)" for t in ax.texts)
    assert len(ax.collections) == 1 and len(ax.collections[0].get_offsets()) == 130   # one call, every point
    x, y = zoo["avg_case_flatness"], zoo["robust_loss_test"]
    corner = ((x.rank(pct=True) - 0.5) ** 2 + (y.rank(pct=True) - 0.5) ** 2).idxmax()
    assert corner in labelled(x, y, 8) and corner not in labelled(x, y, 8, always=["base"])[:1]
    assert labelled(x, y, 5, always=["trades_s3"])[0] == "trades_s3" and len(labelled(x, y, 5)) == 5
    legend = [t.get_text() for t in small.legends[0].get_texts()]
    assert legend == ["base", "pgd_at_s*", "trades_s*"]            # replicates share their variant's entry
    plt.close("all")


def test_compare_surfaces_wraps_a_zoo_into_a_bounded_grid():
    import numpy as np
    import xarray as xr

    from advkit.plots.figures import MAX_COLUMNS, MAX_FIGURE_INCHES, compare_surfaces, panel_grid

    assert panel_grid(3)[:2] == (1, 3) and panel_grid(8)[:2] == (2, 4) and panel_grid(11)[:2] == (2, 6)
    assert panel_grid(8)[2] == (3.4 * 4 + 0.8, 3.3 * 2)           # the quick profile's figure, unchanged
    rows, cols, (width, height) = panel_grid(130)
    assert cols == MAX_COLUMNS and rows * cols >= 130 and (rows - 1) * cols < 130
    assert width <= MAX_FIGURE_INCHES[0] + 1e-9 and height <= MAX_FIGURE_INCHES[1] + 1e-9
    grid = np.linspace(-1, 1, 5)
    surfaces = {f"m{i}": xr.Dataset({"loss": (("alpha", "beta"), (1 + i) * np.add.outer(grid ** 2, grid ** 2))},
                                    coords={"alpha": grid, "beta": grid}) for i in range(20)}
    fig = compare_surfaces(surfaces, kind="heatmap")
    assert fig.get_size_inches()[0] <= MAX_FIGURE_INCHES[0]
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert len(panels) == 20 and len({round(ax.get_position().x0, 3) for ax in panels}) == MAX_COLUMNS
    plt.close("all")
