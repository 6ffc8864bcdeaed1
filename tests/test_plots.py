"""Figures: byte-identical saves (no dates, no versions) and a sane perturbation scale in the attack gallery."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from advkit.plots import amplified_perturbation, attack_gallery, save_figure  # noqa: E402


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
