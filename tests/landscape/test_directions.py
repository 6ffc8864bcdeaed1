"""Directions' content hash: the kit's one tensor hash, blind to device, storage dtype and name order."""

import pytest
import torch
from torch import nn

from advkit._torch import state_hash, tensors_hash
from advkit.landscape.directions import Directions, directions_hash, explicit_directions, random_directions
from advkit.landscape.surfaces import compute_surface


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))


def test_directions_hash_follows_the_values_only():
    model = net()
    d = random_directions(model, 2, seed=1)
    vectors = [dict(v) for v in d.vectors]
    assert d.sha256 == directions_hash(vectors)
    reordered = [dict(reversed(list(v.items()))) for v in vectors]
    as_double = [{k: t.double() for k, t in v.items()} for v in vectors]
    assert directions_hash(reordered) == directions_hash(as_double) == d.sha256
    changed = [dict(v) for v in vectors]
    changed[1]["2.weight"] = changed[1]["2.weight"].clone()
    changed[1]["2.weight"][0, 0] += 1e-3
    swapped = vectors[::-1]
    assert len({d.sha256, directions_hash(changed), directions_hash(swapped), directions_hash(vectors[:1])}) == 4
    assert d.sha256 == tensors_hash((f"direction{i}.{k}", v[k].float()) for i, v in enumerate(vectors)
                                    for k in sorted(v))
    assert random_directions(model, 2, seed=1).sha256 == d.sha256 != random_directions(model, 2, seed=2).sha256
    assert explicit_directions(model, vectors[0]).sha256 == directions_hash(vectors[:1])


def test_random_directions_checks_its_arguments():
    model = net()
    with pytest.raises(ValueError, match="seed must be an integer >= 0"):
        random_directions(model, seed=-1)
    with pytest.raises(ValueError, match="seed must be an integer"):
        random_directions(model, seed=1.5)
    with pytest.raises(ValueError, match="norm='l3' is not available"):
        random_directions(model, seed=0, norm="l3")
    with pytest.raises(ValueError, match="bn='drop' is not available"):
        random_directions(model, seed=0, bn="drop")


def test_state_hash_of_a_model_with_batchnorm():
    """The centre of a surface: scalar buffers (BatchNorm's num_batches_tracked) hash too."""
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
    before = state_hash(model)
    model[1].num_batches_tracked += 1
    assert state_hash(model) != before
    model[1].num_batches_tracked -= 1
    assert state_hash(model) == before


def test_nothing_to_perturb_is_an_error():
    # A model without parameters (or with only biases and normalization parameters under bn="ignore")
    # gave empty or zero directions and a flat surface: a silent, meaningless result.
    with pytest.raises(ValueError, match="no parameters to perturb"):
        random_directions(nn.Flatten(), seed=0)
    norm_only = nn.Sequential(nn.BatchNorm1d(4))
    with pytest.raises(ValueError, match="bn='ignore' leaves fixed"):
        random_directions(norm_only, seed=0)
    assert random_directions(norm_only, seed=0, bn="include").ndim == 2
    with pytest.raises(ValueError, match="direction 1 is empty"):
        compute_surface(nn.Flatten(), Directions(({}, {})), torch.rand(2, 1, 2, 2),
                        torch.zeros(2, dtype=torch.int64))
