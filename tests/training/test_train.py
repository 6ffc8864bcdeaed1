import pandas as pd
import pytest
import torch

from advkit._torch import loss_and_accuracy
from advkit.data import CIFAR10_CLASSES, Batcher, Dataset
from advkit.models import get_model
from advkit.runs.checkpoints import load_model
from advkit.runs.run import Run
from advkit.training.fit import TrainConfig, fit, pretrained_fit


def _small(digits, n=256):
    return digits.x_train[:n], digits.y_train[:n]


def _batcher(x, y, batch_size=32, **kw):
    return Batcher(x, y, batch_size, **{**dict(augment=True, padding=1, seed=3), **kw})


def _config(**kw):
    base = dict(epochs=4, lr=0.05, schedule="multistep", seed=3)
    return TrainConfig(**{**base, **kw})


@pytest.mark.slow
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
    # the returned histories too: the resumed one's first epochs come from the CSV
    pd.testing.assert_frame_equal(once.history.drop(columns="time_s"), resumed.history.drop(columns="time_s"))


@pytest.mark.slow
def test_a_fresh_and_a_resumed_fit_return_and_plot_the_same_history(digits, tmp_path):
    """The history of a run is the CSV's numbers, fresh or resumed, so `make run` twice draws
    the same learning curves, byte for byte."""
    import matplotlib

    matplotlib.use("Agg")
    from advkit.plots.figures import learning_curves, save_figure

    results = [fit(get_model("small_cnn", 10, 1), _batcher(*_small(digits, 128)), _config(epochs=2),
                   test=(digits.x_test[:64], digits.y_test[:64]), run=tmp_path, name="m", progress=False)
               for _ in range(2)]  # the second finds the training complete and reads it back
    assert results[1].resumed_from == 2
    pd.testing.assert_frame_equal(results[0].history, results[1].history, check_exact=True)
    pd.testing.assert_frame_equal(results[0].history, pd.read_csv(tmp_path / "history" / "m.csv"), check_exact=True)
    figures = [save_figure(learning_curves(r.history), "curves", tmp_path / f"figures_{i}")
               for i, r in enumerate(results)]
    assert [p.read_bytes() for p in figures[0]] == [p.read_bytes() for p in figures[1]]


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
    from advkit.training.fit import _named_objective
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


# --- speed: the fast recipe, fused optimizers, torch.compile (issue 12) -------------------------------

def test_fast_config_is_the_documented_recipe():
    from advkit.training.fit import FAST_RECIPE, apply_recipe, fast_config

    config = fast_config()
    assert FAST_RECIPE["batch_size"] == 512 and config.lr == pytest.approx(0.1 * 512 / 128)  # linear scaling
    assert (config.epochs, config.schedule, config.optimizer, config.nesterov) == (40, "onecycle", "sgd", True)
    assert (config.weight_decay, config.label_smoothing, config.recipe, config.compile) == (5e-4, 0.1, "fast", False)
    assert fast_config(epochs=60, seed=2, compile=True) == TrainConfig(
        **{**{k: v for k, v in FAST_RECIPE.items() if k != "batch_size"}, "epochs": 60, "seed": 2, "compile": True})
    given = TrainConfig(epochs=7, lr=0.01, seed=5)
    assert apply_recipe("paper", given, 64) == (given, 64)  # the parameters as given, untouched
    assert apply_recipe("fast", given, 64) == (fast_config(seed=5), 512)
    with pytest.raises(ValueError, match=r"recipe='bogus' is not available; choose one of \['paper', 'fast'\]"):
        apply_recipe("bogus", given, 64)


def test_recipe_parameter_is_validated_and_paper_by_default():
    from advkit.pipeline import driver as pipeline
    from advkit.pipeline import params

    declared = params.notebook_parameters(pipeline.notebook_paths())
    assert declared["01_train"]["recipe"]["default"] == "paper"
    assert pipeline.load_profile("paper")["recipe"] == pipeline.load_profile("quick")["recipe"] == "paper"
    with pytest.raises(ValueError, match=r"recipe='bogus'.*\['paper', 'fast'\]"):
        params.checked_values({"recipe": "bogus"}, declared)
    with pytest.raises(ValueError, match="recipe"):
        TrainConfig(recipe="bogus")


def test_fast_recipe_trains_through_fit_and_the_checkpoint_records_it(tmp_path):
    """notebook 01's recipe="fast" on CIFAR-shaped images and a BatchNorm ResNet: one epoch, then the
    training state names the recipe and its batch size; resuming under the paper recipe names it."""
    from advkit.runs.checkpoints import load_checkpoint
    from advkit.runs.run import Run
    from advkit.training.fit import apply_recipe

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (64, 3, 32, 32), generator=g, dtype=torch.uint8)
    y = torch.randint(0, 10, (64,), generator=g)
    config, batch_size = apply_recipe("fast", TrainConfig(seed=1), 128)
    torch.manual_seed(0)
    result = fit(get_model("resnet20", 10, 3), Batcher(x, y, batch_size, augment=True, seed=1), config,
                 run=tmp_path, name="base", stop_after=1, progress=False)
    assert len(result.history) == 1 and torch.isfinite(torch.tensor(result.history["train_loss"])).all()
    state = load_checkpoint(Run.of(tmp_path).training_state("base"))
    recorded = (state["config"]["recipe"], state["config"]["label_smoothing"], state["data"]["batch_size"])
    assert recorded == ("fast", 0.1, 512)
    with pytest.raises(ValueError, match="trained with recipe='fast', but this call asks for recipe='paper'"):
        fit(get_model("resnet20", 10, 3), Batcher(x, y, batch_size, augment=True, seed=1),
            TrainConfig(**{**vars(config), "recipe": "paper"}), run=tmp_path, name="base", progress=False)


def test_checkpoint_from_before_recipe_and_compile_resumes_with_their_defaults(digits, tmp_path):
    from advkit.runs.artifacts import atomic_path
    from advkit.runs.checkpoints import load_checkpoint
    from advkit.runs.run import Run

    fit(get_model("small_cnn", 10, 1), _batcher(*_small(digits)), _config(epochs=2), run=tmp_path, name="m",
        stop_after=1, progress=False)
    path = Run.of(tmp_path).training_state("m")
    state = load_checkpoint(path)
    for added in ("recipe", "compile"):  # as an older advkit wrote it
        del state["config"][added]
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    with pytest.raises(ValueError, match="trained with compile=False, but this call asks for compile=True"):
        fit(get_model("small_cnn", 10, 1), _batcher(*_small(digits)), _config(epochs=2, compile=True), run=tmp_path,
            name="m", progress=False)
    resumed = fit(get_model("small_cnn", 10, 1), _batcher(*_small(digits)), _config(epochs=2), run=tmp_path,
                  name="m", progress=False)
    assert resumed.resumed_from == 1 and len(resumed.history) == 2


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_fused_optimizer_only_on_cuda_and_kept_across_devices(optimizer):
    """The fused kernels are asked for on CUDA only (a device string stands in for the GPU); a state
    saved by one implementation loads into the other and keeps the loading optimizer's."""
    from advkit.training.fit import _load_optimizer, _make_optimizer

    model = get_model("small_cnn", 10, 1)
    config = _config(optimizer=optimizer, lr=1e-3)
    cpu, _ = _make_optimizer(model, config, 4, torch.device("cpu"))
    cuda, _ = _make_optimizer(model, config, 4, "cuda")
    assert not cpu.param_groups[0]["fused"] and cuda.param_groups[0]["fused"] is True
    model(torch.rand(2, 1, 8, 8)).sum().backward()
    cpu.step()
    _load_optimizer(cuda, cpu.state_dict())
    assert cuda.param_groups[0]["fused"] is True
    _load_optimizer(cpu, cuda.state_dict())
    assert not cpu.param_groups[0]["fused"]
    for p in model.parameters():
        assert torch.equal(cpu.state[p][next(iter(cpu.state[p]))], cuda.state[p][next(iter(cuda.state[p]))])


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_fused_update_is_the_default_update(optimizer):
    """The options given to the fused kernels (Nesterov, momentum, weight decay) mean what they mean
    for torch's default: three steps of torch's CPU fused implementation match it."""
    from advkit.training.fit import _make_optimizer

    config = _config(optimizer=optimizer, lr=0.05 if optimizer == "sgd" else 1e-3, weight_decay=5e-4)
    torch.manual_seed(0)
    x, y = torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))
    models = {}
    for device in ("cpu", "cuda"):  # "cuda": the fused flag, run here by torch's CPU fused kernel
        torch.manual_seed(0)
        model = models[device] = get_model("small_cnn", 10, 1)
        opt, _ = _make_optimizer(model, config, 3, device)
        for _ in range(3):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    torch.manual_seed(0)
    init = next(iter(get_model("small_cnn", 10, 1).parameters()))
    assert not torch.equal(next(iter(models["cpu"].parameters())), init)  # it trained
    for (k, a), b in zip(models["cpu"].state_dict().items(), models["cuda"].state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=k)


def test_compiled_training_step_matches_eager():
    """TrainConfig(compile=True): one epoch of a BatchNorm conv net on CIFAR-shaped images ends with the
    eager run's weights and running statistics, within float tolerance."""
    from torch import nn

    def net():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (32, 3, 32, 32), generator=g, dtype=torch.uint8)
    y = torch.randint(0, 10, (32,), generator=g)
    runs = {c: fit(net(), Batcher(x, y, 16, augment=True, seed=0), _config(epochs=1, compile=c), progress=False)
            for c in (False, True)}
    eager, compiled = (runs[c].model.state_dict() for c in (False, True))
    assert not torch.equal(eager["0.weight"], net().state_dict()["0.weight"])  # it trained
    for k, v in eager.items():
        torch.testing.assert_close(compiled[k], v, rtol=1e-4, atol=1e-5, msg=k)
    assert runs[True].history["train_loss"][0] == pytest.approx(runs[False].history["train_loss"][0], rel=1e-5)


def test_pretrained_fit_saves_the_akamaster_weights_as_base_with_their_clean_test_row(digits, tmp_path):
    src = get_model("resnet20")
    torch.save({"state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}}, tmp_path / "r20.th")
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8, generator=gen), torch.arange(6)
    cifar = Dataset("cifar10", x, y, x, y, list(CIFAR10_CLASSES))
    run = Run(tmp_path / "run")
    result = pretrained_fit(run, cifar, "resnet20", tmp_path / "r20.th")
    base = load_model(run.model("base")).eval()
    for k, v in src.state_dict().items():
        assert torch.equal(base.state_dict()[k], v)
    loss, acc = loss_and_accuracy(base, x.float().div(255), y)
    row = result.history.to_dict("records")
    assert row == [{"epoch": 0, "test_acc": pytest.approx(acc), "test_loss": pytest.approx(loss)}]
    with pytest.raises(ValueError, match="needs dataset='cifar10'.*'digits'"):
        pretrained_fit(run, digits, "resnet20", tmp_path / "r20.th")
    with pytest.raises(ValueError, match="resnet20-56.*'resnet18'"):
        pretrained_fit(run, cifar, "resnet18", tmp_path / "r20.th")
