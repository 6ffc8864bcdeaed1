"""Stutz et al. 2021's robust-overfitting split: where does the test robust loss come from?

Stutz, Hein & Schiele (2021, Sec. 4) trace robust overfitting to the adversarial examples the
model gets wrong: their cross-entropy keeps growing (confidently wrong) while the loss on the
examples it still gets right stays small. `robust_loss_split` splits the robust loss (RLoss,
mean CE on the attack's examples) of one model into those two groups; `robust_split_table`
does it for every model of a run, epoch checkpoints (`<name>_eNNN`) included, and puts the
zoo's average-case flatness on test and training examples (Stutz et al. Fig. 7) beside it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from advkit._torch import Attack, chunks, eval_mode, model_device, to_float
from advkit.curvature.operator import adversarial_inputs, check_data, per_example_cross_entropy
from advkit.runs.checkpoints import load_checkpoint, load_model
from advkit.runs.run import Run
from advkit.studies.zoo import split_name

SPLIT_COLUMNS = ("robust_loss", "robust_loss_correct", "robust_loss_incorrect", "robust_acc")
FLATNESS_COLUMNS = ("avg_case_flatness", "avg_case_flatness_train")


def robust_loss_split(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attack: Attack, *,
                      batch_size: int = 500) -> dict[str, float]:
    """RLoss over (x, y) and its split by whether the attack's example is classified correctly.

    robust_loss = robust_acc * robust_loss_correct + (1 - robust_acc) * robust_loss_incorrect;
    a group without examples has a NaN mean. Eval mode, fp32; x in [0, 1].
    """
    check_data(x, y)
    device = model_device(model)
    x, y = to_float(x.to(device)), y.to(device)
    x_adv = adversarial_inputs(model, x, y, attack, batch_size)
    losses, correct = [], []
    with torch.no_grad(), eval_mode(model):
        for s in chunks(len(x), batch_size):
            logits = model(x_adv[s]).float()
            losses.append(per_example_cross_entropy(logits, y[s]))
            correct.append(logits.argmax(1) == y[s])
    loss, ok = torch.cat(losses).cpu().numpy(), torch.cat(correct).cpu().numpy()
    mean = lambda v: float(v.mean()) if len(v) else float("nan")  # noqa: E731
    return {"robust_loss": mean(loss), "robust_loss_correct": mean(loss[ok]),
            "robust_loss_incorrect": mean(loss[~ok]), "robust_acc": float(ok.mean())}


def robust_split_table(run: Run | str, x: torch.Tensor, y: torch.Tensor, attack: Attack, *,
                       models: Sequence[str] | None = None, flatness: pd.DataFrame | None = None,
                       device: str | torch.device = "cpu", batch_size: int = 500) -> pd.DataFrame:
    """`robust_loss_split` for every model of the run (default `run.models(epochs=True)`), one row each
    indexed by model, with its `family` and `epoch` (as `zoo.flatness_table`: the checkpoint's); with a
    zoo `flatness` table, its `avg_case_flatness` (test) and `avg_case_flatness_train` columns joined."""
    run = Run.of(run)
    names = run.models(epochs=True) if models is None else list(models)
    if not names:
        raise ValueError(f"no models in {run}: run notebooks 01 and 03 first")
    rows = {}
    for name in names:
        family, epoch = split_name(name)
        epoch = load_checkpoint(run.model(name)).get("epoch") if epoch is None else epoch
        model = load_model(run.model(name), device=device)
        rows[name] = {"family": family, "epoch": np.nan if epoch is None else epoch,
                      **robust_loss_split(model, x, y, attack, batch_size=batch_size)}
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = "model"
    if flatness is not None:
        table = table.join(flatness[[c for c in FLATNESS_COLUMNS if c in flatness.columns]])
    return table
