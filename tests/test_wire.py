"""The adapter crosses Flower as one vector (app/wire.py): what every message of a round carries."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.common import parameters_to_ndarrays

from app import wire
from app.config import RunConfig
from app.aggregate import RoundStrategy
from conftest import with_defaults

# The offline tiny model's adapter has 96 matrices; SD 1.5's hundreds.
ADAPTER = [np.arange(8 * 32, dtype=np.float32).reshape(8, 32), np.ones((32, 8), np.float32),
           np.full((4, 1, 3), -2.5, np.float32)]


def test_a_fit_message_carries_the_adapter_as_one_array_and_its_shapes():
    strategy = RoundStrategy(RunConfig.from_flower(with_defaults({})))
    strategy.global_arrays = ADAPTER
    strategy.participants = ["node"]  # configure_fit only pairs each participant with the instructions
    ((_, ins),) = strategy.configure_fit(1, strategy.initialize_parameters(None), None)
    (sent,) = parameters_to_ndarrays(ins.parameters)
    assert sent.shape == (sum(a.size for a in ADAPTER),)
    for a, b in zip(ADAPTER, wire.unpack([sent], ins.config[wire.SHAPES_KEY])):
        np.testing.assert_array_equal(a, b)


def test_a_reply_of_figures_only_stays_empty():
    assert wire.pack([]) == [] and wire.unpack([], "[[2, 2]]") == []


@pytest.mark.parametrize("sent", [ADAPTER, [np.zeros(7, np.float32)], [np.zeros((2, 2), np.float32)]])
def test_arrays_of_another_layout_are_refused_with_the_likely_cause(sent):
    with pytest.raises(ValueError, match="another version of this app"):
        wire.unpack(sent, wire.shapes_config(ADAPTER)[wire.SHAPES_KEY])
