import pandas as pd
import pytest
import torch

from advkit.data import Batcher
from advkit.models import get_model
from advkit.train import TrainConfig, fit, loss_and_accuracy


def _small(digits, n=256):
    return digits.x_train[:n], digits.y_train[:n]


def _batcher(x, y, batch_size=32, **kw):
    return Batcher(x, y, batch_size, **{**dict(augment=True, padding=1, seed=3), **kw})


def _config(**kw):
    base = dict(epochs=4, lr=0.05, schedule="multistep", seed=3)
    return TrainConfig(**{**base, **kw})


def test_training_learns(digits):
    torch.manual_seed(0)
    model = get_model("small_cnn", 10, 1)
    before = loss_and_accuracy(model, digits.x_test, digits.y_test)[1]
    result = fit(model, _batcher(*_small(digits, 600)), _config(epochs=6), test=(digits.x_test, digits.y_test),
                 progress=False)
    assert result.history["test_acc"].iloc[-1] > max(0.8, before + 0.5)
    assert list(result.history["epoch"]) == list(range(1, 7))


@pytest.mark.parametrize("kw", [dict(), dict(ema_decay=0.9), dict(optimizer="adam", lr=1e-3, schedule="onecycle")])
def test_interrupted_run_resumes_to_identical_weights(digits, tmp_path, kw):
    config = _config(**kw)
    torch.manual_seed(0)
    init = get_model("small_cnn", 10, 1).state_dict()

    def fresh():
        m = get_model("small_cnn", 10, 1)
        m.load_state_dict(init)
        return m

    once = fit(fresh(), _batcher(*_small(digits)), config, run=tmp_path / "a", name="m", progress=False)
    # "Kill" the second run after epoch 2, then start it again from scratch objects.
    part = fit(fresh(), _batcher(*_small(digits)), config, run=tmp_path / "b", name="m", stop_after=2,
               progress=False)
    assert len(part.history) == 2 and "model" not in part.files
    torch.manual_seed(123)  # the global RNG state at restart must not matter
    resumed = fit(fresh(), _batcher(*_small(digits)), config, run=tmp_path / "b", name="m", progress=False)
    assert resumed.resumed_from == 2
    for k, v in once.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
    a = pd.read_csv(tmp_path / "a" / "history" / "m.csv")
    b = pd.read_csv(tmp_path / "b" / "history" / "m.csv")
    pd.testing.assert_frame_equal(a.drop(columns="time_s"), b.drop(columns="time_s"))


def test_resume_with_other_config_names_the_setting(digits, tmp_path):
    fit(get_model("small_cnn", 10, 1), _batcher(*_small(digits)), _config(epochs=2), run=tmp_path, name="m",
        stop_after=1, progress=False)
    with pytest.raises(ValueError, match="lr=0.05.*lr=0.1"):
        fit(get_model("small_cnn", 10, 1), _batcher(*_small(digits)), _config(epochs=2, lr=0.1), run=tmp_path,
            name="m", progress=False)


def test_select_keeps_best_epoch_and_keep_epochs(digits, tmp_path):
    scores = iter([0.5, 0.2, 0.9, 0.4])
    model = get_model("small_cnn", 10, 1)
    snapshots = {}

    def evaluate(m):
        snapshots[len(snapshots) + 1] = {k: v.clone() for k, v in m.state_dict().items()}
        return {"val_score": next(scores)}

    result = fit(model, _batcher(*_small(digits)), _config(), evaluate=evaluate, select="val_score",
                 keep_epochs=(1, 3), run=tmp_path, name="m", progress=False)
    assert result.best_epoch == 2
    for k, v in snapshots[2].items():
        assert torch.equal(result.early.state_dict()[k], v)  # early stopped: epoch 2
    for k, v in snapshots[4].items():
        assert torch.equal(result.model.state_dict()[k], v)  # the result stays the final weights
    assert sorted(p.name for p in (tmp_path / "models").glob("*.pt")) == ["m.pt", "m_e001.pt", "m_e003.pt",
                                                                       "m_early.pt"]


@pytest.mark.parametrize("schedule", ["constant", "multistep", "cosine", "onecycle"])
def test_schedules_follow_their_shape(digits, schedule):
    result = fit(get_model("small_cnn", 10, 1), _batcher(*_small(digits, 128)), _config(schedule=schedule),
                 progress=False)
    lrs = result.history["lr"].tolist()
    if schedule == "constant":
        assert lrs == [0.05] * 4
    elif schedule == "multistep":
        assert lrs == pytest.approx([0.05, 0.05, 0.005, 0.0005])
    elif schedule == "cosine":
        assert lrs[0] == 0.05 and all(a > b for a, b in zip(lrs, lrs[1:]))
    else:
        assert lrs[0] < lrs[1]  # one-cycle warms up first


@pytest.mark.parametrize("bad, match", [(dict(epochs=0), "epochs"), (dict(optimizer="rmsprop"), "optimizer"),
                                        (dict(schedule="step"), "schedule"), (dict(lr=-1), "lr"),
                                        (dict(label_smoothing=1.0), "label_smoothing")])
def test_bad_config_names_the_setting(bad, match):
    with pytest.raises(ValueError, match=match):
        _config(**bad)


def test_label_smoothing_reaches_named_objectives(digits):
    from advkit.train import _named_objective
    assert _named_objective("clean", 0.1).label_smoothing == 0.1
    assert _named_objective("pgd_at", 0.2).label_smoothing == 0.2
    with pytest.raises(ValueError, match="label_smoothing=0.1 but objective 'trades'"):
        _named_objective("trades", 0.1)


def test_on_epoch_start_hook_sees_every_epoch(digits):
    seen = []

    class Recording:
        def on_epoch_start(self, epoch):
            seen.append(epoch)

        def __call__(self, model, x, y):
            return torch.nn.functional.cross_entropy(model(x), y)

    fit(get_model("small_cnn", 10, 1), _batcher(*_small(digits, 64)), _config(epochs=3),
        objective=Recording(), progress=False)
    assert seen == [1, 2, 3]


class _DivergesAt:
    """Cross-entropy that turns NaN from epoch `bad` on (a stand-in for a diverging objective)."""

    def __init__(self, bad):
        self.bad, self.epoch = bad, 0

    def on_epoch_start(self, epoch):
        self.epoch = epoch

    def __call__(self, model, x, y):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        return loss * float("nan") if self.epoch >= self.bad else loss


def test_non_finite_loss_fails_fast_and_saves_no_nan_model(digits, tmp_path):
    model = get_model("small_cnn", 10, 1)
    with pytest.raises(FloatingPointError, match=r"training 'probe' diverged in epoch 2: mean training loss nan"):
        fit(model, _batcher(*_small(digits)), _config(epochs=4), objective=_DivergesAt(2), run=tmp_path,
            name="probe", keep_epochs=(2,), progress=False)
    assert not list((tmp_path / "models").glob("probe*.pt"))  # neither the final model nor epoch 2's
    assert list(pd.read_csv(tmp_path / "history" / "probe.csv")["epoch"]) == [1]
    finite = fit(get_model("small_cnn", 10, 1), _batcher(*_small(digits)), _config(epochs=2),
                 objective=_DivergesAt(3), progress=False)
    assert all(torch.isfinite(p).all() for p in finite.model.parameters())


def test_fit_uses_the_batcher_as_given(digits):
    """`fit` leaves its Batcher alone: Batcher(augment=False) with a default config trains on the
    images themselves, in batches of the Batcher's size (it used to get the config's crop + flip)."""
    x, y = _small(digits, 64)
    rows = {tuple(r.flatten().tolist()) for r in x.float().div(255)}
    batcher = Batcher(x, y, 16, augment=False, seed=5)
    seen = []

    def objective(model, xb, yb):
        seen.append(len(xb))
        assert all(tuple(r.flatten().tolist()) in rows for r in xb), "fit augmented a Batcher(augment=False)"
        return torch.nn.functional.cross_entropy(model(xb), yb)

    fit(get_model("small_cnn", 10, 1), batcher, TrainConfig(epochs=2), objective=objective, progress=False)
    assert seen == [16] * 8
    assert (batcher.batch_size, batcher.augment, batcher.padding, batcher.seed) == (16, False, 4, 5)


def test_resume_with_another_batcher_names_the_setting(digits, tmp_path):
    fit(get_model("small_cnn", 10, 1), _batcher(*_small(digits)), _config(epochs=2), run=tmp_path, name="m",
        stop_after=1, progress=False)
    with pytest.raises(ValueError, match="m.state.pt was trained with data=.*'batch_size': 32.*'batch_size': 64"):
        fit(get_model("small_cnn", 10, 1), _batcher(*_small(digits), 64), _config(epochs=2), run=tmp_path,
            name="m", progress=False)


@pytest.mark.parametrize("bad", [dict(precision="fp16"), dict(precision=True), dict(seed=-1),
                                 dict(milestones=(0.5, 1.0))])
def test_precision_and_seed_are_checked(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        _config(**bad)
