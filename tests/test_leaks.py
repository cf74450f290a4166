"""tests/leaks.py, the privacy checks of the coordinator's record and log, on forms a leak could take."""

from __future__ import annotations

import pytest

from leaks import log_leaks, record_leaks

FIGURES = {"org-1": {"train_loss": 1.234567, "train_images": 12}, "org-2": {"train_loss": 0.98765, "train_images": 7}}


@pytest.mark.parametrize("record", [
    {"train_loss_by_org": {"org-1": 1.234567}},                     # the shared form
    {"losses": [0.5, 1.234567]},                                     # a float by value, under any key
    {"detail": "org-2 0.98765"},                                     # written in a string
    {"per_node": {"org-2": {"images": 7}}},                          # an integer tied to the organisation
])
def test_a_record_that_reveals_a_figure_is_caught(record):
    assert record_leaks(record, FIGURES)


def test_federated_figures_and_participation_pass():
    record = {"round": 2, "train_loss": 1.1, "num_examples": 19, "aggregated": ["org-1", "org-2"],
              "seconds": {"round": 3.2}, "received_fingerprints": {"org-1": "3f0a9e1b", "org-2": "3f0a9e1b"}}
    assert not record_leaks(record, FIGURES)


@pytest.mark.parametrize("line", [
    "INFO :      org-1 loss 1.2",                                    # few digits, next to the name
    "INFO :      node of org-2 ready: 7 train / 2 held-out images",  # an integer next to the name
    "INFO :      round 1 adapter: held-out loss 1.10000 (org-1 1.23457, org-2 0.98765)",
    "INFO :      best node: 1.235",                                  # org-1's loss by value, no name
    "\x1b[92mINFO \x1b[0m:      org-1 12",
    "INFO :      held-out loss by round: 0: 1.10000; not comparable, other organisations: 2: 0.40000 (org-2)",
])
def test_a_log_line_that_reveals_a_figure_is_caught(line):
    assert log_leaks(line, FIGURES)


def test_private_log_lines_pass():
    log = "\n".join([
        "\x1b[92mINFO \x1b[0m:      [ROUND 1/2] secagg+ over org-1, org-2",
        "INFO :      prepare: org-1 answered in 3.2 s",
        "INFO :      node of org-2 ready (org-metrics=private: its image counts stay on the node)",
        "INFO :      round 1 adapter: held-out loss 1.10000 (6 held-out images; per-organisation losses stay private)",
        "INFO :      encoded 8 images in 1.2 s",
        "INFO :      held-out loss by round: 0: 1.10000, 1: 1.05000, 2: 1.01000 (org-1, org-2)",
    ])
    assert not log_leaks(log, FIGURES), log_leaks(log, FIGURES)
