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


def test_union_is_the_mean_over_every_held_out_image():
    # 1 held-out image at 1.0 and 3 at 2.0: the mean over the 4 images, not of the 2 organisations.
    assert bc.union_loss({"a": 1.0, "b": 2.0}, {"a": 1, "b": 3}) == pytest.approx(1.75)


def test_early_stopping_keeps_the_best_round_and_stops_after_patience_rounds_without_one():
    consumed = []

    def rounds(losses):
        for rnd, loss in enumerate(losses):
            consumed.append(rnd)
            yield loss, f"adapter {rnd}"

    assert bc.early_stop(rounds([1.0, 0.8, 0.9, 0.85, 0.7]), patience=2, max_rounds=10) == (1, "adapter 1", [1.0, 0.8, 0.9, 0.85])
    assert consumed == [0, 1, 2, 3], "trained past the stopping round"
    assert bc.early_stop(rounds([1.0, 0.8, 0.9, 0.85, 0.7]), patience=3, max_rounds=10)[0] == 4
    assert bc.early_stop(rounds([1.0, 0.8, 0.7, 0.6]), patience=2, max_rounds=2)[:2] == (2, "adapter 2")
    assert bc.early_stop(rounds([1.0, 1.1, 1.2]), patience=2, max_rounds=5)[:2] == (0, "adapter 0")  # the base


def test_the_expectations_read_the_mean_test_losses():
    orgs = ["a", "b"]
    rows = {bc.BASE: (1.2, 1.2, 1.2), bc.alone("a"): (1.10, 1.00, 1.20), bc.alone("b"): (1.05, 1.10, 1.00),
            bc.FEDAVG: (0.96, 0.98, 0.95), bc.SECAGG: (0.96, 0.98, 0.95), bc.POOLED: (0.90, 0.9, 0.9)}
    table = {m: {c: (v, 0.01) for c, v in zip((bc.UNION, "a", "b"), r)} for m, r in rows.items()}
    assert all(e.holds for e in bc.expectations(table, orgs))
    table[bc.SECAGG][bc.UNION] = (1.00, 0.0)  # beats alone, closes under half of 1.05 -> 0.90
    table[bc.FEDAVG]["a"] = table[bc.FEDAVG]["b"] = (1.05, 0.0)  # worse for both on their own images
    failed = {e.text for e in bc.expectations(table, orgs) if not e.holds}
    assert failed == {"SecAgg+ closes at least half of the alone-to-pooled gap",
                      "FedAvg: each organisation does at least as well on its own test images, for at least 1 of 2"}


@pytest.mark.federation
def test_compare_on_the_pretrained_digits_base(digits_model, tiny_model, tmp_path):
    """One seed of `make compare`, short, on the short-recipe base: what a user gets."""
    import json
    import subprocess
    import sys

    from app.partition import main as partition
    from app.pretrain import PRETRAIN_CLASSES, RESOLUTION, pretrain_split
    from conftest import REPO

    data = tmp_path / "digits"
    partition(["sklearn-digits", "--out", str(data), "--partitions", "3", "--alpha", "0.3", "--test-fraction", "0.1",
               "--max-images", "16"])
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, str(REPO / "tests" / "benchmark_compare.py"), "--seeds", "0", "--rounds", "2",
                           "--patience", "1", "--local-steps", "4", "--eval-timesteps", "4", "--sample-steps", "2",
                           "--model", str(digits_model), "--resolution", str(RESOLUTION), "--data-dir", str(data),
                           "--out", str(out)], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    methods = {bc.BASE, *(bc.alone(o) for o in ORGS), bc.FEDAVG, bc.SECAGG, bc.POOLED}
    (run,) = results["runs"]
    assert set(run["test_loss"]) == methods
    # Every method trained at least one round, or fell back to the base by its validation loss.
    assert all(0 <= run["rounds_chosen"][m] <= 2 for m in methods)
    assert all(len(run["validation_losses"][m]) >= 2 for m in methods - {bc.BASE})
    assert results["checks"][0]["nodes_gap"] <= 1e-4
    assert results["checks"][0]["secagg_round_1_gap"] <= results["checks"][0]["allowed"]
    for method in methods:
        row = run["test_loss"][method]
        assert {bc.UNION, *ORGS} <= set(row) and any(c.startswith("digit ") for c in row)
    assert any("unseen" in run["test_loss"][bc.alone(o)] for o in ORGS)
    for line in ("test loss", bc.POOLED, "beats every organisation alone on the union"):
        assert line in done.stdout
    from PIL import Image

    with Image.open(out / "samples.png") as sheet:
        assert sheet.width == 64 * len(methods) and sheet.height > 64

    # The pretrained base beats the random one on digits it was pretrained on, never on these images.
    from app.config import RunConfig
    from conftest import tiny_run_config, with_defaults

    (_, _), (images, labels) = pretrain_split()
    folder = tmp_path / "pretraining-classes-test"
    folder.mkdir()
    rows = []
    for i, (x, y) in enumerate(zip(images, labels)):
        Image.fromarray(x).save(folder / f"{i:04d}.png")
        rows.append(json.dumps({"file_name": f"{i:04d}.png", "text": f"a handwritten digit {y}", "label": str(y)}))
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    loss = {}
    for name, base in (("random", tiny_model), ("pretrained", digits_model)):
        cfg = RunConfig.from_flower(with_defaults(tiny_run_config(base, tmp_path / "unused", resolution=RESOLUTION)))
        table = bc.test_table(cfg, bc.test_sets(cfg, {"test": folder}), {bc.BASE: bc.initial_adapter(cfg)}, {})
        loss[name] = table[bc.BASE]
    assert {f"digit {d}" for d in PRETRAIN_CLASSES} <= set(loss["pretrained"])
    assert loss["pretrained"][bc.UNION] < 0.8 * loss["random"][bc.UNION], loss
