import pytest
import torch

from advkit.models import MODELS, get_model, load_akamaster_checkpoint, num_parameters


def akamaster_resnet_keys(depth: int, num_classes: int = 10) -> dict[str, tuple[int, ...]]:
    """State-dict keys and shapes of akamaster/pytorch_resnet_cifar10's resnet.py (option A)."""
    def bn(p, c):
        return {f"{p}.weight": (c,), f"{p}.bias": (c,), f"{p}.running_mean": (c,),
                f"{p}.running_var": (c,), f"{p}.num_batches_tracked": ()}

    keys = {"conv1.weight": (16, 3, 3, 3), **bn("bn1", 16)}
    n, in_planes = (depth - 2) // 6, 16
    for stage, planes in enumerate((16, 32, 64), start=1):
        for b in range(n):
            p = f"layer{stage}.{b}"
            keys[f"{p}.conv1.weight"] = (planes, in_planes, 3, 3)
            keys.update(bn(f"{p}.bn1", planes))
            keys[f"{p}.conv2.weight"] = (planes, planes, 3, 3)
            keys.update(bn(f"{p}.bn2", planes))
            in_planes = planes
    keys["linear.weight"], keys["linear.bias"] = (num_classes, 64), (num_classes,)
    return keys


@pytest.mark.parametrize("depth", [20, 32, 44, 56])
def test_cifar_resnet_matches_akamaster_state_dict(depth):
    model = get_model(f"resnet{depth}", 10, 3)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == akamaster_resnet_keys(depth)


def test_resnet32_has_046m_parameters():
    assert num_parameters(get_model("resnet32")) == 464_154  # He et al. 2016 Table 6: 0.46M


def test_load_akamaster_checkpoint(tmp_path):
    src = get_model("resnet32")
    torch.save({"best_prec1": 92.63, "state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}},
               tmp_path / "resnet32-d509ac18.th")
    model = load_akamaster_checkpoint(tmp_path / "resnet32-d509ac18.th", depth=32)
    assert torch.allclose(model.mean.flatten(), torch.tensor([0.485, 0.456, 0.406]))
    for k, v in src.state_dict().items():
        assert torch.equal(model.state_dict()[k], v)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_models_take_unit_images_and_return_logits(name):
    channels, size = (1, 8) if name == "small_cnn" else (3, 32)
    model = get_model(name, num_classes=7, in_channels=channels).eval()
    out = model(torch.rand(2, channels, size, size))
    assert out.shape == (2, 7) and torch.isfinite(out).all()
    assert model.advkit_spec["arch"] == name


def test_normalization_is_inside_the_model():
    model = get_model("resnet20").eval()
    assert "mean" not in model.state_dict()  # non-persistent: keys stay akamaster's
    x = torch.rand(1, 3, 32, 32)
    torch.testing.assert_close(model.normalize(x), (x - model.mean) / model.std)


def test_unknown_model_names_choices():
    with pytest.raises(ValueError, match="model='resnet33'.*resnet32"):
        get_model("resnet33")


def test_resnet18_cifar_variant_has_11m_parameters():
    model = get_model("resnet18", 10, 3)
    assert num_parameters(model) == 11_173_962  # He et al. 2016 ResNet-18, CIFAR stem (3x3, no max-pool)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in model.modules())
    model.eval()
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("name", ["resnet20", "resnet18", "preact_resnet18", "small_cnn"])
def test_every_model_takes_grey_digits(name):
    """A CIFAR architecture on 1-channel 8x8 digits: no RGB statistics forced on one channel."""
    model = get_model(name, 10, in_channels=1).eval()
    assert model(torch.rand(2, 1, 8, 8)).shape == (2, 10)


def test_bad_akamaster_files_are_errors_naming_the_file(tmp_path):
    import os

    (tmp_path / "random.th").write_bytes(os.urandom(4096))
    (tmp_path / "empty.th").write_bytes(b"")
    for name in ("random.th", "empty.th"):
        with pytest.raises(ValueError, match=f"{tmp_path / name} is not a readable PyTorch checkpoint"):
            load_akamaster_checkpoint(tmp_path / name)
    state = {"module." + k: v for k, v in get_model("resnet20", 10, 3).state_dict().items()}
    torch.save({"state_dict": state}, tmp_path / "resnet20.th")
    with pytest.raises(ValueError, match=r"resnet20.th does not fit a ResNet-32 \(it holds a ResNet-20\)"):
        load_akamaster_checkpoint(tmp_path / "resnet20.th", depth=32)
    load_akamaster_checkpoint(tmp_path / "resnet20.th", depth=20)
    state["module.linear.weight"] = torch.full_like(state["module.linear.weight"], float("nan"))
    torch.save({"state_dict": state}, tmp_path / "nan.th")
    with pytest.raises(ValueError, match=r"nan.th: 1 tensor\(s\) hold NaN or inf values \(linear.weight\)"):
        load_akamaster_checkpoint(tmp_path / "nan.th", depth=20)


@pytest.mark.parametrize("kwargs", [{"std": [0]}, {"std": [-0.2]}, {"mean": [float("nan")]}, {"std": [float("inf")]}])
def test_normalization_constants_must_be_finite_and_positive(kwargs):
    with pytest.raises(ValueError, match="standard deviations positive and finite"):
        get_model("small_cnn", 10, 1, **kwargs)


@pytest.mark.filterwarnings("ignore:.*has no recorded checksum")  # the hand-edited files
def test_saved_models_with_bad_normalization_or_nan_weights_are_refused(tmp_path):
    from advkit.runs.checkpoints import load_model, save_model

    model = get_model("small_cnn", 10, 1)
    path = save_model(tmp_path / "m.pt", model)
    for key, value in (("std", [0.0]), ("mean", [float("nan")])):
        payload = torch.load(path, weights_only=True)
        payload["spec"] = {**payload["spec"], "model_kwargs": {**payload["spec"].get("model_kwargs", {}), key: value}}
        bad = tmp_path / f"{key}.pt"
        torch.save(payload, bad)
        with pytest.raises(ValueError, match=f"{bad}: {key}="):
            load_model(bad)
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    save_model(tmp_path / "nan.pt", model)
    with pytest.raises(ValueError, match=r"nan.pt: 1 tensor\(s\) hold NaN"):
        load_model(tmp_path / "nan.pt")
