"""advkit.training.variants: Stutz et al. Table 1 variants as specs; one train_variant call per notebook-03 variant."""

import pytest
import torch

from advkit.runs.checkpoints import load_checkpoint, load_model
from advkit.runs.run import list_models
from advkit.training.objectives import AWP, FGSMRS, MART, PGDAT, TRADES
from advkit.training.robust_overfitting import epoch_robust_metrics, stutz_subsets
from advkit.training.variants import OBJECTIVE_TOKENS, parse_variant, train_variant, variant_config, variant_objective

EPS = 8 / 255
# Every objective and regularizer of Stutz et al. Table 1 that advkit has, as one at_variants list.
TABLE1 = ["pgd_at", "fgsm_rs", "trades", "trades+b3", "mart", "awp", "awp_trades+g0.01", "pgd_at+ls0.1",
          "pgd_at+ln0.1", "pgd_at+wd0.005", "pgd_at+ema0.999", "pgd_at+swa0.75", "pgd_at+aa", "pgd_at+eps0.0353"]


def test_table1_specs_parse_to_their_settings():
    v = {s: parse_variant(s) for s in TABLE1}
    assert v["trades+b3"].objective == "trades" and v["trades+b3"].objective_kwargs == {"beta": 3.0}
    assert (v["awp_trades+g0.01"].objective, v["awp_trades+g0.01"].inner) == ("awp", "trades")
    assert v["awp"].inner == "pgd_at" and v["awp_trades+g0.01"].objective_kwargs == {"gamma": 0.01}
    assert v["pgd_at+ls0.1"].config_overrides == {"label_smoothing": 0.1}
    assert v["pgd_at+ln0.1"].label_noise == 0.1 and v["pgd_at+aa"].autoaugment
    assert v["pgd_at+wd0.005"].config_overrides == {"weight_decay": 0.005}
    assert v["pgd_at+ema0.999"].config_overrides == {"ema_decay": 0.999}
    assert v["pgd_at+swa0.75"].config_overrides == {"swa_start": 0.75}
    assert v["pgd_at+eps0.0353"].eps == 0.0353
    assert variant_config("pgd_at+wd0.005", 10).weight_decay == 0.005
    assert variant_config("pgd_at", 10, seed=3).weight_decay == 5e-4  # the paper's (Rice et al.)


@pytest.mark.parametrize("spec, match", [
    ("pgdat", "objective 'pgdat' is not available"),
    ("trades+ls0.1", "label smoothing"),
    ("pgd_at+b3", "beta"),
    ("pgd_at+g0.01", "gamma"),
    ("pgd_at+ls1.5", r"ls must be in \(0, 1\)"),
    ("pgd_at+xyz", "modifier 'xyz'"),
    ("pgd_at+ema0.99+swa0.5", "exclusive"),
    ("pgd_at+wd0.1+wd0.2", "twice"),
    ("", "non-empty"),
    (3, "non-empty"),
])
def test_bad_specs_name_the_token(spec, match):
    with pytest.raises(ValueError, match=match):
        parse_variant(spec)


def test_fgsm_rs_gets_one_step_of_1_25_eps_whatever_the_notebook_budget():
    objective = variant_objective("fgsm_rs", EPS, steps=10, alpha=0.0157)
    assert isinstance(objective, FGSMRS)
    assert objective.steps == 1 and objective.alpha == pytest.approx(1.25 * EPS)


def test_every_objective_builds_with_the_budget():
    built = {s: variant_objective(s, EPS, steps=7) for s in OBJECTIVE_TOKENS}
    assert isinstance(built["pgd_at"], PGDAT) and built["pgd_at"].steps == 7 and built["pgd_at"].eps == EPS
    assert isinstance(built["trades"], TRADES) and isinstance(built["mart"], MART)
    assert built["trades"].alpha == 0.007  # alpha=None: the paper's step
    awp = built["awp"]
    assert isinstance(awp, AWP) and isinstance(awp.inner, PGDAT) and awp.inner.steps == 7 and awp.gamma == 5e-3
    assert isinstance(built["awp_trades"].inner, TRADES)
    assert built["awp_fgsm_rs"].inner.steps == 1
    smoothed = variant_objective("awp+ls0.1", EPS, steps=7)
    assert smoothed.inner.label_smoothing == 0.1
    assert variant_objective("trades+b3", EPS, 7).beta == 3.0
    assert variant_objective("pgd_at+eps0.0353", EPS, 7).eps == 0.0353


@pytest.mark.parametrize("spec", list(OBJECTIVE_TOKENS) + TABLE1[7:13])
def test_train_variant_saves_final_and_early_stopped_weights(digits, tmp_path, spec):
    s = stutz_subsets(digits, n_train=32, n_test=32, n_val=32)
    attack = dict(eps=0.1, alpha=0.04, steps=2)
    from advkit.attacks.evaluate import AttackSpec
    evaluate = epoch_robust_metrics(None, s["test_sub"], s["val"], AttackSpec("pgd", attack))
    train = (s["train"][0][:64], s["train"][1][:64])
    result = train_variant(spec, "small_cnn", train, epochs=2, eps=0.1, steps=2, alpha=0.04, num_classes=10,
                           batch_size=32, evaluate=evaluate, select="val_robust_loss", run=tmp_path, progress=False)
    assert len(result.history) == 2 and torch.isfinite(torch.tensor(result.history["train_loss"].to_numpy())).all()
    assert {spec, f"{spec}_early"} <= set(list_models(tmp_path))  # zoo members, not epoch checkpoints
    final, early = load_model(tmp_path / "models" / f"{spec}.pt"), load_model(tmp_path / "models" / f"{spec}_early.pt")
    assert all(torch.equal(a, b) for a, b in zip(final.state_dict().values(), result.model.state_dict().values()))
    assert all(torch.equal(a, b) for a, b in zip(early.state_dict().values(), result.early.state_dict().values()))
    assert load_checkpoint(tmp_path / "models" / f"{spec}_early.pt")["epoch"] == result.best_epoch


def test_label_noise_variant_trains_on_noisy_labels(digits, tmp_path, monkeypatch):
    from advkit.training import variants

    seen = {}
    real_fit = variants.fit

    def spy(model, batcher, config, **kw):
        seen["y"], seen["batcher"] = batcher.y.clone(), batcher.settings()
        return real_fit(model, batcher, config, **kw)

    monkeypatch.setattr(variants, "fit", spy)
    x, y = digits.x_train[:100], digits.y_train[:100]
    train_variant("pgd_at+ln0.2", "small_cnn", (x, y), epochs=1, eps=0.1, steps=1, batch_size=50, seed=4,
                  progress=False)
    assert (seen["y"] != y).sum().item() == 20
    assert {k: seen["batcher"][k] for k in ("batch_size", "augment", "padding", "seed")} == \
        {"batch_size": 50, "augment": True, "padding": 1, "seed": 4}  # the batcher fit uses as given


@pytest.mark.slow
def test_resnet18_pgd7_variant_on_cifar_shaped_images(tmp_path):
    """Stutz et al.'s AT model and attack (ResNet-18, PGD-7 at 8/255) at CIFAR-10's shape."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8, generator=gen)
    y = torch.randint(0, 10, (16,), generator=gen)
    result = train_variant("pgd_at", "resnet18", (x, y), epochs=1, eps=EPS, steps=7, batch_size=16,
                           run=tmp_path, progress=False)
    saved = load_model(tmp_path / "models" / "pgd_at.pt")
    assert saved.advkit_spec["arch"] == "resnet18"
    assert load_checkpoint(tmp_path / "models" / "pgd_at.pt")["config"]["milestones"] == (0.5, 0.75)
    assert result.early is None and not (tmp_path / "models" / "pgd_at_early.pt").exists()  # no select, no early


def test_train_variant_rejects_unknown_arch():
    with pytest.raises(ValueError, match="arch='resnet17'"):
        train_variant("pgd_at", "resnet17", (torch.zeros(2, 1, 8, 8, dtype=torch.uint8), torch.zeros(2).long()),
                      epochs=1, eps=0.1, steps=1)
