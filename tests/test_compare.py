"""The pieces of `make compare` (tests/benchmark_compare.py) that are not Flower's: training alone,
pooling, measuring. The federation runs themselves are the loopback federation the other tests use."""

from __future__ import annotations

import numpy as np
import pytest

import benchmark_compare as bc
from app.training import local_update
from app.config import NodeConfig, RunConfig
from conftest import ORGS, tiny_run_config, with_defaults


@pytest.fixture(scope="module")
def setup(tiny_model, demo_data, tmp_path_factory):
    cache = tmp_path_factory.mktemp("compare-cache")
    cfg = RunConfig.from_flower(with_defaults(tiny_run_config(tiny_model, cache / "unused", **{"local-steps": 3})))
    nodes = {o: NodeConfig.from_flower({"data-dir": str(demo_data / o), "org": o, "cache-dir": str(cache / o)})
             for o in ORGS}
    return cfg, nodes, bc.org_data(cfg, nodes)


def test_alone_computes_what_the_node_of_a_one_organisation_federation_computes(setup):
    cfg, nodes, data = setup
    org = ORGS[0]
    start = bc.initial_adapter(cfg)
    # The node's own function, round by round, with the coordinator's step of a one-node FedAvg.
    global_arrays, measured = start, []
    for rnd in (1, 2):
        update, _, report = local_update(cfg, nodes[org], global_arrays, rnd)
        measured.append(report["heldout_loss"])  # of the adapter the node received
        global_arrays = [(g + u).astype(np.float32) for g, u in zip(global_arrays, update)]

    after_one = bc.train_rounds(cfg, data[org], start, 1, cfg.local_steps, org)
    after_two = bc.train_rounds(cfg, data[org], start, 2, cfg.local_steps, org)
    assert max(float(np.max(np.abs(a - s))) for a, s in zip(after_two, start)) > 1e-4, "nothing trained"
    # Not bit-equal: the node restarts round 2 from global + (local - global), one float32 rounding
    # away from where training alone goes on, and Adam's normalised step turns that into up to a
    # few 1e-6 where a gradient is near zero (2.3e-6 seen on this CPU). A wrong round, seed or
    # starting point differs by a whole step (learning rate 1e-3): 1e-5 still catches it.
    for mine, node in zip(after_two, global_arrays):
        np.testing.assert_allclose(mine, node, rtol=0, atol=1e-5)
    # The benchmark's measurement is the one the node makes of what it receives.
    table = bc.heldout_table(cfg, {org: data[org]}, {bc.BASE: start, "after one round": after_one})
    assert table[bc.BASE][org] == pytest.approx(measured[0], abs=1e-6)
    assert table["after one round"][org] == pytest.approx(measured[1], abs=1e-6)


def test_pooled_trains_on_every_organisations_training_images_and_holds_out_theirs(setup):
    _, _, data = setup
    pooled = bc.pooled_data(data)
    assert pooled.num_train == sum(d.num_train for d in data.values())
    assert pooled.num_heldout == sum(d.num_heldout for d in data.values())
    # No held-out image of any organisation is trained on.
    train = {t.numpy().tobytes() for t in pooled.train_latents}
    assert all(h.numpy().tobytes() not in train for d in data.values() for h in d.heldout_latents)


def test_union_is_the_mean_over_every_held_out_image_and_the_verdict_reads_it():
    # 1 held-out image at 1.0 and 3 at 2.0: the mean over the 4 images, not of the 2 organisations.
    assert bc.union_loss({"a": 1.0, "b": 2.0}, {"a": 1, "b": 3}) == pytest.approx(1.75)
    rows = {bc.BASE: 1.2, bc.alone("a"): 1.10, bc.alone("b"): 1.05, bc.FEDAVG: 1.00, bc.SECAGG: 1.00,
            bc.POOLED: 0.90}
    table = {m: {bc.UNION: v} for m, v in rows.items()}
    v = bc.verdict(table, ["a", "b"])
    assert (v.federated_beats_alone, v.best_alone, v.pooled_is_ceiling) == (True, bc.alone("b"), True)
    table[bc.SECAGG][bc.UNION] = 1.06  # the worse of the two federated runs counts
    table[bc.POOLED][bc.UNION] = 1.07
    v = bc.verdict(table, ["a", "b"])
    assert (v.federated_beats_alone, v.pooled_is_ceiling) == (False, False)
