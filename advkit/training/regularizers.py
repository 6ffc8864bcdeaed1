"""The cheap regularizers of Stutz et al. (2021, Table 1) that are not objectives.

- label smoothing: `Clean(label_smoothing=...)`, `PGDAT(label_smoothing=...)` (advkit.training.objectives);
- label noise: `noisy_labels` corrupts a fixed fraction of the training labels once, seeded;
- stronger weight decay: `TrainConfig(weight_decay=...)` (e.g. 5e-3 instead of 5e-4);
- weight averaging: `TrainConfig(ema_decay=...)` (EMA) or `TrainConfig(swa_start=...)` (SWA via
  torch.optim.swa_utils; BatchNorm statistics recomputed at the end); `fit` evaluates, selects
  and saves the averaged model;
- AutoAugment: `AutoAugmentBatcher`, a drop-in `Batcher` applying torchvision's CIFAR-10 policy.
"""

from __future__ import annotations

import torch
from torchvision.transforms import v2

from advkit._checks import check_choice, check_int, check_number
from advkit.data import Batcher


def noisy_labels(y: torch.Tensor, fraction: float, num_classes: int | None = None,
                 seed: int = 0) -> torch.Tensor:
    """A copy of y in which round(fraction * N) examples, chosen at random, get a uniformly drawn
    *different* class (symmetric label noise, fixed once for the whole training run)."""
    check_number("fraction", fraction, 0.0, 1.0)
    num_classes = int(y.max()) + 1 if num_classes is None else num_classes
    check_int("num_classes", num_classes, 2)
    gen = torch.Generator().manual_seed(seed)
    n_noisy = round(fraction * len(y))
    idx = torch.randperm(len(y), generator=gen)[:n_noisy]
    shift = torch.randint(1, num_classes, (n_noisy,), generator=gen)  # never 0: the label changes
    noisy = y.clone()
    noisy[idx.to(y.device)] = (y[idx.to(y.device)] + shift.to(y.device)) % num_classes
    return noisy


class AutoAugmentBatcher(Batcher):
    """A Batcher whose uint8 batches pass through AutoAugment (Cubuk et al. 2019, torchvision's
    policy, CIFAR-10 by default) before crop + flip, as in Cubuk et al.'s pipeline.

    Per-image randomness without per-image Python work: every image draws its own sub-policy,
    apply-coins and magnitude signs from the Batcher's (seed, epoch) generator; images sharing
    (operation, magnitude) in a stage are transformed together by torchvision's own operation,
    so each batch costs at most a few dozen batched calls, whatever its size. Images must be
    uint8 (the dataset format).
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, *,
                 policy: str = "cifar10", **kwargs):
        policies = {p.value: p for p in v2.AutoAugmentPolicy}
        check_choice("policy", policy, sorted(policies))
        if x.dtype != torch.uint8:
            raise ValueError(f"AutoAugmentBatcher needs uint8 images, got {x.dtype}")
        super().__init__(x, y, batch_size, **kwargs)
        self.policy = policy
        self.autoaugment = v2.AutoAugment(policies[policy])

    def autoaugment_batch(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Apply AutoAugment to each uint8 image of x with its own random draws."""
        aa = self.autoaugment
        n = len(x)
        choice = torch.randint(len(aa._policies), (n,), generator=generator)
        coins = torch.rand(n, 2, generator=generator)
        negative = (torch.rand(n, 2, generator=generator) <= 0.5).long()
        x = x.clone()
        for stage in range(2):
            probability = torch.tensor([policy[stage][1] for policy in aa._policies])
            applied = (coins[:, stage] <= probability[choice]).nonzero().squeeze(1)
            keys = choice[applied] * 2 + negative[applied, stage]  # (sub-policy, sign) per image
            groups: dict[tuple[str, float], list[torch.Tensor]] = {}
            for key in torch.unique(keys).tolist():  # at most 2 x 25 groups, whatever the batch size
                op, magnitude = self._operation(*divmod(key, 2), stage, x.shape[-2], x.shape[-1])
                groups.setdefault((op, magnitude), []).append(applied[keys == key])
            for (op, magnitude), members in groups.items():
                idx = torch.cat(members).to(x.device)
                x[idx] = aa._apply_image_or_video_transform(x[idx], op, magnitude, interpolation=aa.interpolation,
                                                            fill=aa._fill)
        return x

    def _operation(self, sub_policy: int, negative: int, stage: int, height: int, width: int) -> tuple[str, float]:
        """(operation name, signed magnitude) of a sub-policy's stage, as torchvision computes them."""
        aa = self.autoaugment
        op, _, magnitude_idx = aa._policies[sub_policy][stage]
        magnitudes_fn, signed = aa._AUGMENTATION_SPACE[op]
        magnitudes = magnitudes_fn(10, height, width)
        magnitude = 0.0 if magnitudes is None else float(magnitudes[magnitude_idx])
        return op, -magnitude if signed and negative else magnitude

    def transform(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """AutoAugment on the uint8 batch, then the Batcher's crop + flip."""
        return super().transform(self.autoaugment_batch(x, generator), generator)
