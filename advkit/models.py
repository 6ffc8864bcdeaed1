"""Model registry: CIFAR ResNets and ResNet-18 (He et al. 2016), PreAct ResNet-18 and a small CNN.

Every model takes images in [0, 1] and normalizes them itself, so attack budgets
and landscapes are always expressed in pixel space. The normalization constants
are non-persistent buffers: state-dict keys stay those of the reference
implementations (akamaster/pytorch_resnet_cifar10 for the CIFAR ResNets).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
# akamaster's checkpoints were trained with ImageNet statistics.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Normalized(nn.Module):
    """Base class: subtracts `mean` and divides by `std` before `features`."""

    def __init__(self, in_channels: int, mean: Sequence[float] | None, std: Sequence[float] | None):
        super().__init__()
        mean = _per_channel(mean, in_channels, 0.5)
        std = _per_channel(std, in_channels, 0.5)
        if not all(math.isfinite(v) for v in mean + std) or min(std) <= 0:
            raise ValueError(f"normalization mean={mean}, std={std}: the means must be finite and the standard "
                             f"deviations positive and finite (the images are divided by them)")
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def _per_channel(values: Sequence[float] | None, channels: int, default: float) -> list[float]:
    if values is None:
        return [default] * channels
    values = list(values)
    if len(values) == 1:
        values = values * channels
    if len(values) != channels:
        raise ValueError(f"normalization needs {channels} values (one per channel), got {len(values)}")
    return values


# --- CIFAR ResNet (He et al. 2016, Sec. 4.2), option A shortcuts ---------------------------


class _ShortcutA(nn.Module):
    """Identity shortcut with stride-2 subsampling and zero-padded channels (option A)."""

    def __init__(self, planes: int):
        super().__init__()
        self.pad = planes // 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = _ShortcutA(planes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(Normalized):
    """ResNet-(6n+2) for 32x32 inputs: 3 stages of 16/32/64 channels (He et al. 2016).

    Parameter names and shapes match akamaster/pytorch_resnet_cifar10, so its
    pretrained checkpoints load with `load_akamaster_checkpoint`.
    """

    def __init__(self, depth: int, num_classes: int = 10, in_channels: int = 3,
                 mean: Sequence[float] | None = CIFAR10_MEAN, std: Sequence[float] | None = CIFAR10_STD):
        super().__init__(in_channels, mean, std)
        if (depth - 2) % 6:
            raise ValueError(f"depth must be 6n+2 (20, 32, 44, 56, ...), got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.in_planes = 16
        self.layer1 = self._make_layer(16, n, 1)
        self.layer2 = self._make_layer(32, n, 2)
        self.layer3 = self._make_layer(64, n, 2)
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (blocks - 1):
            layers.append(BasicBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(self.normalize(x))))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


# --- PreAct ResNet-18 (He et al. 2016b), as used by Rice et al. 2020 -----------------------


class PreActBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


def _add_four_stages(net: nn.Module, block: type[nn.Module]) -> None:
    """`layer1`..`layer4` of an 18-layer ResNet: two `block`s per stage, 64-512 channels, the
    first block of stages 2-4 with stride 2 (He et al. 2016; shared by ResNet-18 and PreAct)."""
    in_planes = 64
    for i, (planes, stride) in enumerate(((64, 1), (128, 2), (256, 2), (512, 2)), start=1):
        setattr(net, f"layer{i}", nn.Sequential(block(in_planes, planes, stride), block(planes, planes, 1)))
        in_planes = planes


class PreActResNet18(Normalized):
    """PreAct ResNet-18, the standard adversarial-training architecture (Rice et al. 2020)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3,
                 mean: Sequence[float] | None = CIFAR10_MEAN, std: Sequence[float] | None = CIFAR10_STD):
        super().__init__(in_channels, mean, std)
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        _add_four_stages(self, PreActBlock)
        self.bn = nn.BatchNorm2d(512)
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.normalize(x))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.relu(self.bn(out))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


# --- ResNet-18 (He et al. 2016), CIFAR variant, as used by Stutz et al. 2021 ---------------


class BasicBlockB(BasicBlock):
    """The same basic block with option-B shortcuts (1x1 conv-BN when the shape changes), as in
    ResNet-18."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__(in_planes, planes, stride)
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(planes))


class ResNet18(Normalized):
    """ResNet-18 (He et al. 2016) for 32x32 inputs: 3x3 stride-1 stem, no max-pool, four stages of
    two basic blocks (64-512 channels); 11,173,962 parameters for 10 classes. Stutz et al. (2021,
    Sec. 3)'s adversarial-training baseline."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3,
                 mean: Sequence[float] | None = CIFAR10_MEAN, std: Sequence[float] | None = CIFAR10_STD):
        super().__init__(in_channels, mean, std)
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        _add_four_stages(self, BasicBlockB)
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(self.normalize(x))))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


# --- small CNN for the offline quick profile -----------------------------------------------


class SmallCNN(Normalized):
    """Three conv-BN-ReLU stages and a linear head: trains in seconds on CPU (quick profile)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 32,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None):
        super().__init__(in_channels, mean, std)
        w = width
        self.conv1 = nn.Conv2d(in_channels, w, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        self.conv2 = nn.Conv2d(w, 2 * w, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(2 * w)
        self.conv3 = nn.Conv2d(2 * w, 2 * w, 3, stride=2, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(2 * w)
        self.linear = nn.Linear(2 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(self.normalize(x))))
        out = F.relu(self.bn2(self.conv2(out)))
        out = F.relu(self.bn3(self.conv3(out)))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


MODELS: dict[str, Callable[..., nn.Module]] = {
    "small_cnn": SmallCNN,
    "resnet20": lambda **kw: CifarResNet(20, **kw),
    "resnet32": lambda **kw: CifarResNet(32, **kw),
    "resnet44": lambda **kw: CifarResNet(44, **kw),
    "resnet56": lambda **kw: CifarResNet(56, **kw),
    "preact_resnet18": PreActResNet18,
    "resnet18": ResNet18,
}


def get_model(name: str, num_classes: int = 10, in_channels: int = 3, **kwargs) -> nn.Module:
    """Build a registered model taking [0, 1] images; `kwargs` (mean, std, width) go to its constructor."""
    if name not in MODELS:
        raise ValueError(f"model={name!r} is not available; choose one of {sorted(MODELS)}")
    if in_channels != 3:  # the CIFAR-10 statistics the CIFAR models default to are RGB's
        kwargs = {"mean": None, "std": None, **kwargs}
    model = MODELS[name](num_classes=num_classes, in_channels=in_channels, **kwargs)
    # What `advkit.runs.checkpoints.save_model` stores so `load_model` can rebuild the same architecture.
    model.advkit_spec = {"arch": name, "num_classes": num_classes, "in_channels": in_channels,
                         "model_kwargs": kwargs}
    return model


def num_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def load_akamaster_checkpoint(path: str | Path, depth: int = 32) -> nn.Module:
    """Load a pretrained akamaster/pytorch_resnet_cifar10 checkpoint (e.g. `resnet32-d509ac18.th`).

    Its weights were trained on inputs normalized with ImageNet statistics and saved from
    `nn.DataParallel` (keys prefixed `module.`); both are handled here.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no akamaster checkpoint at {path}")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types (EOFError, IndexError, UnpicklingError) for bad bytes
        raise ValueError(f"{path} is not a readable PyTorch checkpoint (empty, truncated or another format): "
                         f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:200]}") from None
    state = raw.get("state_dict", raw) if isinstance(raw, dict) else raw
    if not isinstance(state, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise ValueError(f"{path} holds no state dict of weights (akamaster's files hold {{'state_dict': ...}})")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    model = CifarResNet(depth, num_classes=10, in_channels=3, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        blocks = {k.split(".")[1] for k in state if k.startswith("layer1.")}
        found = f" (it holds a ResNet-{6 * len(blocks) + 2})" if blocks else ""
        raise ValueError(f"{path} does not fit a ResNet-{depth}{found}: pass its depth, e.g. "
                         f"load_akamaster_checkpoint(path, depth=...); {' '.join(str(err).split())[:300]}") from None
    check_finite_weights(model, path)
    return model


def check_finite_weights(model: nn.Module, source: str | Path = "model") -> None:
    """Every floating-point weight and buffer of `model` is finite: NaN weights (a diverged run)
    would make every logit NaN downstream."""
    bad = [k for k, v in model.state_dict().items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ValueError(f"{source}: {len(bad)} tensor(s) hold NaN or inf values ({', '.join(bad[:5])}"
                         f"{', ...' if len(bad) > 5 else ''}): a diverged training run or a damaged file")
