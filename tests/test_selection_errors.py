"""Duplicate, overlapping and shared-weight module selections are rejected with a clear message."""

import pytest
from torch import nn

from lightning_influence.errors import TrackingError
from lightning_influence import find_tracked_layers


def net():
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)))


def test_duplicate_pattern():
    with pytest.raises(TrackingError, match=r"\['0'\] are listed more than once"):
        find_tracked_layers(net(), ["0", "0"])


def test_overlapping_patterns():
    with pytest.raises(TrackingError, match=r"module '2.0' is selected by overlapping patterns \['2.\*', '2.0'\]"):
        find_tracked_layers(net(), ["2.*", "2.0"])


def test_disjoint_patterns_are_fine():
    assert list(find_tracked_layers(net(), ["0", "2.*"])) == ["0", "2.0", "2.1"]


def test_shared_weight_is_rejected():
    model = net()
    model[2][1] = nn.Linear(4, 4)
    model[2][1].weight = model[2][0].weight
    with pytest.raises(TrackingError, match="share one weight tensor"):
        find_tracked_layers(model)
    # The default selection leaves out a layer tied to an untracked one; a pattern naming it keeps it, warning.
    assert list(find_tracked_layers(model, exclude=["2.1"])) == ["0"]
    with pytest.warns(UserWarning, match="shares its weight with untracked module"):
        assert list(find_tracked_layers(model, ["0", "2.0"])) == ["0", "2.0"]
