"""End to end on a real federation: TLS SuperLink, three SuperNodes, `flwr run`, SecAgg+.

One federation serves the whole module: the main 2-round run, then a resumed run, then a run
that must fail, then nodes that must be refused.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import numpy as np
import pytest

from app.config import NodeConfig, RunConfig
from app.outputs import ADAPTER_FILE, read_adapter
from conftest import ORGS, load_certs_tool, tiny_run_config, with_defaults
from federation import LocalFederation, write_node_key
from leaks import log_leaks, record_leaks

pytestmark = pytest.mark.federation


@pytest.fixture(scope="module")
def fed(tmp_path_factory, tls, demo_data):
    work = tmp_path_factory.mktemp("federation")
    # min-peers=1: test_only_registered_organisations_take_part_under_their_registered_names aggregates
    # a SecAgg+ round of two, which the default (2 others, docs/node-guard.md) refuses.
    nodes = {org: {"data-dir": str(demo_data / org), "org": org, "cache-dir": str(work / f"cache-{org}"), "min-peers": 1}
             for org in ORGS}
    with LocalFederation(work, tls, nodes) as federation:
        yield federation


@pytest.fixture(scope="module")
def run(fed, tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("outputs")
    cfg = tiny_run_config(tiny_model, out)
    result = fed.run_app(cfg)
    print(result.stdout[-5000:], result.stderr[-3000:])
    assert result.returncode == 0 and fed.last_run_status() == "finished:completed", result.stderr
    return {"out": out, "cfg": cfg, "log": result.stdout + result.stderr}


def history(out: Path) -> dict[int, dict]:
    return {m["round"]: m for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


def adapter(out: Path, rnd: int) -> list[np.ndarray]:
    return list(read_adapter(out / "rounds" / f"round-{rnd:04d}").values())


def train_counts(demo_data: Path, cfg: dict) -> dict[str, int]:
    """Each organisation's training images, by the same split the nodes use."""
    from app.data import discover, split

    run_cfg = RunConfig.from_flower(with_defaults(cfg))
    return {org: len(split(discover(demo_data / org, None), run_cfg.heldout_fraction, run_cfg.seed)[0]) for org in ORGS}


def test_every_round_aggregated_all_nodes(run, demo_data):
    h = history(run["out"])
    counts = train_counts(demo_data, run["cfg"])
    assert len(set(counts.values())) == len(ORGS), counts  # unequal: the weighting matters
    assert sorted(h) == [0, 1, 2]
    for rnd in (1, 2):
        assert h[rnd]["aggregated"] == list(ORGS), h[rnd]
        assert h[rnd]["aggregation"] == "secagg+"
        assert h[rnd]["num_examples_by_org"] == counts and h[rnd]["num_examples"] == sum(counts.values())
    assert "did not aggregate" not in run["log"]


def test_secagg_aggregate_equals_plain_weighted_fedavg(run, demo_data):
    """Recompute each organisation's update outside Flower (training is deterministic given its
    inputs) and compare the weighted mean with what SecAgg+ revealed to the server. The
    organisations hold different numbers of images, so an unweighted mean would not match."""
    import torch

    from app.training import local_update

    cfg = RunConfig.from_flower(with_defaults(run["cfg"]))
    threads = torch.get_num_threads()
    for rnd in (1, 2):
        before, after = adapter(run["out"], rnd - 1), adapter(run["out"], rnd)
        revealed = [a.astype(np.float64) - b for a, b in zip(after, before)]
        updates, counts = [], []
        # One thread, as the nodes train (LocalFederation's OMP_NUM_THREADS=1): another thread count
        # sums in another order, and the same update then differs by ~7e-6, near the 1e-5 tolerance.
        torch.set_num_threads(1)
        try:
            for org in ORGS:
                node = NodeConfig(demo_data / org, org, None, run["out"].parent / f"recompute-{org}")
                update, n, _ = local_update(cfg, node, before, rnd)
                updates.append(update)
                counts.append(n)
        finally:
            torch.set_num_threads(threads)
        plain = [sum(n * u[i].astype(np.float64) for u, n in zip(updates, counts)) / sum(counts)
                 for i in range(len(before))]
        err = max(float(np.max(np.abs(p - r))) for p, r in zip(plain, revealed))
        scale = max(float(np.max(np.abs(p))) for p in plain)
        assert scale > 1e-4, "the round's update is too small for the comparison to mean anything"
        assert err < 1e-5, f"round {rnd}: SecAgg+ differs from plain FedAvg by {err:.2e} (update scale {scale:.2e})"
        assert len(set(counts)) == len(counts), counts
        unweighted = [sum(u[i].astype(np.float64) for u in updates) / len(updates) for i in range(len(before))]
        off = max(float(np.max(np.abs(m - r))) for m, r in zip(unweighted, revealed))
        print(f"round {rnd}: counts {counts}, SecAgg+ vs weighted FedAvg {err:.2e}, vs unweighted mean {off:.2e}")
        # The weighting is what passes: the unweighted mean misses the same tolerance many times over.
        assert off > 10 * 1e-5, f"round {rnd}: the unweighted mean is within {off:.2e} too"


def test_every_stage_is_timed(run):
    """metrics.jsonl says where each round's time went: every SecAgg+ stage as the ServerApp waited
    for it, and the slowest node's compute in the stage that trains; likewise the final evaluate."""
    h = history(run["out"])
    for rnd in (1, 2):
        s = h[rnd]["seconds"]
        assert list(s["stages"]) == ["setup", "share_keys", "collect_masked_vectors", "unmask"], s
        assert all(v > 0 for v in s["stages"].values()) and s["prepare"] >= 0
        assert sum(s["stages"].values()) <= s["fit"] <= s["round"]
        slowest = max(c["fit"] for c in h[rnd]["client_seconds"].values())
        assert h[rnd]["stage_compute_seconds"] == {"collect_masked_vectors": slowest}
        assert slowest < s["stages"]["collect_masked_vectors"]
    final = h[2]["final_evaluate"]
    assert list(final["stages"]) == ["evaluate"] and final["stages"]["evaluate"] <= final["seconds"]
    assert 0 < final["compute_seconds"] < final["seconds"]


def test_round_2_started_from_round_1_global(run):
    from app.model import weights_fingerprint

    h = history(run["out"])
    round1 = weights_fingerprint(adapter(run["out"], 1))
    assert h[2]["global_sent_fingerprint"] == round1
    # Each node reads the weights back out of its UNet after loading them: this is what it trained from.
    assert h[2]["received_fingerprints"] == {org: round1 for org in ORGS}
    assert h[1]["received_fingerprints"] == {org: weights_fingerprint(adapter(run["out"], 0)) for org in ORGS}


def test_each_node_kept_its_model_loaded_across_the_run(fed, run):
    """Warm nodes (app/trainer.py): every message of an organisation went to one trainer process,
    which loaded the model once, at round 1's fit; round 2 and the final evaluation found it loaded."""
    served = re.compile(r"\[(\S+)\] (\w+) on warm trainer pid (\d+) \(model loads (\d+), data loads (\d+), message \d+\)(.*)")
    for org in ORGS:
        lines = [m.groups()[1:] for m in served.finditer(fed.log(org)) if m.group(1) == org][:4]
        assert [op for op, *_ in lines] == ["prepare", "fit", "fit", "evaluate"], lines
        assert len({pid for _, pid, *_ in lines}) == 1, lines
        assert [(models, data) for _, _, models, data, _ in lines] == [("0", "1")] + [("1", "1")] * 3, lines
        print(f"{org} round 2 fit: {lines[2][-1].lstrip('; ')}")


def test_heldout_loss_improves_on_base_model(run):
    h = history(run["out"])
    assert h[0]["heldout_loss"] is not None and set(h[0]["heldout_loss_by_org"]) == set(ORGS)
    assert [m["heldout_orgs"] for m in h.values()] == [list(ORGS)] * len(h)  # every figure over the same orgs
    assert h[2]["heldout_loss"] < h[0]["heldout_loss"], {r: m["heldout_loss"] for r, m in h.items()}


def test_outputs_per_round_and_final(run):
    out = run["out"]
    for rnd in (0, 1, 2):
        d = out / "rounds" / f"round-{rnd:04d}"
        assert (d / ADAPTER_FILE).is_file() and (d / "metrics.json").is_file()
        assert (d / "samples.png").stat().st_size > 0
    assert (out / "final" / ADAPTER_FILE).read_bytes() == (out / "rounds" / "round-0002" / ADAPTER_FILE).read_bytes()


def test_final_adapter_loads_in_diffusers_and_changes_output(run, tiny_model):
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model, local_files_only=True)

    def render():
        return pipe("a red circle on a white background", height=32, width=32, num_inference_steps=3,
                    generator=torch.Generator().manual_seed(0), output_type="np").images[0]

    base = render()
    pipe.load_lora_weights(run["out"] / "final")
    tuned = render()
    assert np.abs(tuned - base).max() > 1e-3


def test_rerun_resumes_after_last_complete_round(fed, run):
    cfg = run["cfg"] | {"num-server-rounds": 3}
    before = (run["out"] / "rounds" / "round-0002" / ADAPTER_FILE).read_bytes()
    result = fed.run_app(cfg)
    assert fed.last_run_status() == "finished:completed", result.stdout[-3000:] + result.stderr[-3000:]
    assert "resuming after round 2" in result.stdout + result.stderr
    h = history(run["out"])
    assert sorted(h) == [0, 1, 2, 3]
    assert h[3]["aggregated"] == list(ORGS)
    assert (run["out"] / "rounds" / "round-0002" / ADAPTER_FILE).read_bytes() == before
    from app.model import weights_fingerprint
    assert h[3]["received_fingerprints"]["org-1"] == weights_fingerprint(adapter(run["out"], 2))


def test_round_that_cannot_aggregate_fails_the_run(fed, tiny_model, tmp_path):
    # An absurd learning rate makes every node's loss non-finite: no update may be aggregated,
    # and the run must not end "completed".
    cfg = tiny_run_config(tiny_model, tmp_path / "out", **{"learning-rate": 1e30, "round-timeout": 120})
    result = fed.run_app(cfg)
    text = result.stdout + result.stderr
    assert "round 1 did not aggregate" in text, text[-3000:]
    assert not (tmp_path / "out" / "rounds" / "round-0001").exists()
    assert fed.last_run_status() == "finished:failed"


def test_plain_fedavg_run(fed, tiny_model, tmp_path):
    """The comparison mode: plain FedAvg messages pass by the SecAgg+ machinery."""
    result = fed.run_app(tiny_run_config(tiny_model, tmp_path, **{"aggregation": "fedavg", "num-server-rounds": 1,
                                                                  "sample-every": 0}))
    assert fed.last_run_status() == "finished:completed", result.stdout[-3000:]
    h = history(tmp_path)
    assert h[1]["aggregation"] == "fedavg" and h[1]["aggregated"] == list(ORGS)
    assert list(h[1]["seconds"]["stages"]) == ["train"] and set(h[1]["stage_compute_seconds"]) == {"train"}
    assert h[1]["heldout_loss"] < h[0]["heldout_loss"]


def test_private_org_metrics_run(fed, tiny_model, demo_data, tmp_path):
    """org-metrics="private": the coordinator's log and metrics.jsonl hold no organisation's loss or
    count, and the federated figures still equal what shared figures give, within the precision
    the run records (each organisation's figures are recomputed outside the federation)."""
    from app.training import local_update

    out = tmp_path / "private"
    run_cfg = tiny_run_config(tiny_model, out, **{"org-metrics": "private", "sample-every": 0})
    result = fed.run_app(run_cfg)
    log = result.stdout + result.stderr
    assert fed.last_run_status() == "finished:completed", log[-3000:]
    h = history(out)
    assert sorted(h) == [0, 1, 2]
    for m in h.values():
        # The slowest node's compute time is one node's figure too.
        private_keys = [k for k in m if k.endswith("_by_org") or k in ("client_seconds", "client_eval_seconds",
                                                                             "stage_compute_seconds")]
        assert not private_keys, m
        assert "compute_seconds" not in m.get("final_evaluate", {})
        assert m["heldout_orgs"] == list(ORGS)  # participation: what the held-out figure covers
    assert "ready (org-metrics=private" in log and "train / " not in log

    cfg = RunConfig.from_flower(with_defaults(run_cfg))
    figures = {org: {} for org in ORGS}  # each organisation's own figures, every round
    for rnd in (1, 2, 3):  # round 3 only measures round 2's adapter, as the final stage did
        received = adapter(out, rnd - 1)
        reports, counts = [], []
        for org in ORGS:
            node = NodeConfig(demo_data / org, org, None, tmp_path / f"recompute-{org}")
            _, n, report = local_update(cfg, node, received, rnd)
            reports.append(report)
            counts.append(n)
            figures[org] |= {f"round {rnd - 1} held-out loss": report["heldout_loss"], "held-out images": report["num_heldout"]}
            if rnd <= 2:
                figures[org] |= {f"round {rnd} train loss": report["train_loss"], "train images": n}
        heldout = sum(r["heldout_loss"] * r["num_heldout"] for r in reports) / sum(r["num_heldout"] for r in reports)
        errors = h[min(rnd, 2)]["private_errors"]
        assert h[rnd - 1]["num_heldout"] == sum(r["num_heldout"] for r in reports)
        assert abs(h[rnd - 1]["heldout_loss"] - heldout) <= errors["heldout_loss"] + 1e-6, (rnd, h[rnd - 1], heldout)
        if rnd <= 2:
            assert h[rnd]["num_examples"] == sum(counts) and h[rnd]["aggregated"] == list(ORGS)
            train = sum(r["train_loss"] * n for r, n in zip(reports, counts)) / sum(counts)
            assert abs(h[rnd]["train_loss"] - train) <= errors["train_loss"] + 1e-6, (rnd, h[rnd]["train_loss"], train)
    # Neither metrics.jsonl nor the ServerApp's log holds an organisation's figure, in any form
    # (tests/leaks.py: by value, and any number tied to an organisation's name).
    leaks = [f for m in h.values() for f in record_leaks(m, figures)] + log_leaks(log, figures)
    assert not leaks, leaks


def test_the_privacy_check_sees_a_shared_runs_figures(run):
    """The control for the check above: on the shared run's log it finds each organisation's figures."""
    found = log_leaks(run["log"], {org: {} for org in ORGS})
    assert all(any(org in f for f in found) for org in ORGS), found
    assert all(record_leaks(m, {org: {} for org in ORGS}) for m in history(run["out"]).values() if m["round"] > 0)


def test_node_without_the_federation_ca_is_refused(fed, tmp_path):
    other_ca = tmp_path / "other"
    load_certs_tool().generate(other_ca, [])
    fed.nodes["intruder"] = {"data-dir": "/nonexistent", "org": "intruder"}
    proc = fed.start_supernode("intruder", root_certificates=other_ca / "ca.pem", register=False)
    assert proc.wait(timeout=120) != 0
    assert "CERTIFICATE_VERIFY_FAILED" in fed.log("intruder") or "certificate verify failed" in fed.log("intruder")


# --- Who may take part: registered organisations only, each under its registered name ---------

def test_register_holds_one_key_per_name_and_one_name_per_key(fed, tmp_path):
    key, other = write_node_key(tmp_path / "clinic.key"), write_node_key(tmp_path / "other.key")
    assert fed.orgs("register", "clinic-x", str(key.with_suffix(".pub"))).returncode == 0
    listing = fed.orgs("list").stdout
    assert "clinic-x" in listing and all(f"{org} " in listing for org in ORGS), listing

    same_name = fed.orgs("register", "clinic-x", str(other.with_suffix(".pub")))
    assert same_name.returncode == 1 and "'clinic-x' is already registered" in same_name.stderr
    same_key = fed.orgs("register", "clinic-y", str(key.with_suffix(".pub")))
    assert same_key.returncode == 1 and "already registered as 'clinic-x'" in same_key.stderr
    bad_name = fed.orgs("register", "Clinic Y", str(other.with_suffix(".pub")))
    assert bad_name.returncode == 1 and "lowercase" in bad_name.stderr

    assert fed.orgs("unregister", "clinic-x").returncode == 0
    assert "clinic-x" not in fed.orgs("list").stdout


def test_only_registered_organisations_take_part_under_their_registered_names(fed, tiny_model, demo_data, tmp_path):
    def node(org: str) -> dict:
        return {"data-dir": str(demo_data / org), "org": org, "cache-dir": str(tmp_path / f"cache-{org}")}

    # A key nobody registered: the SuperLink refuses the node at once.
    fed.nodes["stranger"] = node("org-1") | {"org": "stranger"}
    stranger = fed.start_supernode("stranger", register=False)
    # org-2's key on a second machine while org-2 is connected: refused too.
    fed.nodes["clone"] = node("org-2")
    clone = fed.start_supernode("clone", key=fed.key("org-2"), register=False)
    assert stranger.wait(timeout=120) != 0 and clone.wait(timeout=120) != 0
    # Each refused for its own reason, as each node's own log and the SuperLink's say (a non-zero
    # exit alone: any crash gives one).
    assert "Failed to activate SuperNode" in fed.log("stranger"), fed.log("stranger")[-2000:]
    assert "Failed to activate SuperNode" in fed.log("clone"), fed.log("clone")[-2000:]
    link = fed.log("superlink")
    assert "No SuperNode found with the given public key" in link, link[-3000:]
    assert re.search(r"SuperNode with node ID \d+ could not be activated", link), link[-3000:]

    # Registered as org-4 but configured as org-1; and a second key registered as org-3 with
    # Flower's own CLI, bypassing docker/orgs.py's check: the ServerApp refuses all three.
    fed.nodes["impostor"] = node("org-1")
    impostor = fed.start_supernode("impostor", register_as="org-4")
    twin_key = write_node_key(tmp_path / "twin.key")
    registered = fed.flwr("supernode", "register", str(twin_key.with_suffix(".pub")), "local", "--name", "org-3")
    assert registered.returncode == 0, registered.stdout + registered.stderr
    fed.nodes["twin"] = node("org-3")
    twin = fed.start_supernode("twin", key=twin_key, register=False)
    # A key registered without a name, on a node configured the way Flower's Simulation Engine
    # configures its nodes: only the simulation's ServerApp names a node from its own config.
    nameless_key = write_node_key(tmp_path / "nameless.key")
    registered = fed.flwr("supernode", "register", str(nameless_key.with_suffix(".pub")), "local", "--format", "json")
    assert registered.returncode == 0, registered.stdout + registered.stderr
    nameless_id = str(json.loads(registered.stdout)["node-id"])
    fed.nodes["nameless"] = {"partition-id": 0, "num-partitions": 3}
    nameless = fed.start_supernode("nameless", key=nameless_key, register=False)
    try:
        deadline = time.monotonic() + 60
        while fed.orgs("list").stdout.count(" online ") < 6:
            assert time.monotonic() < deadline, fed.orgs("list").stdout
            time.sleep(1)
        cfg = tiny_run_config(tiny_model, tmp_path / "out", **{"num-server-rounds": 1, "min-nodes": 2,
                                                                "sample-every": 0})
        result = fed.run_app(cfg)
        log = result.stdout + result.stderr
        assert fed.last_run_status() == "finished:completed", log[-3000:]
        assert history(tmp_path / "out")[1]["aggregated"] == ["org-1", "org-2"]
        assert "registered as 'org-4' but configured as 'org-1'" in log
        assert log.count("2 connected nodes are registered as 'org-3'") == 2
        assert f"refused node {nameless_id}: its key was registered without an organisation name" in log
    finally:
        for proc in (impostor, twin, nameless):
            proc.terminate()
            proc.wait(timeout=30)
        fed.orgs("unregister", "org-4")
        fed.flwr("supernode", "unregister", nameless_id, "local")
        twin_id = next(line.split()[1] for line in fed.orgs("list").stdout.splitlines()
                       if line.startswith("org-3 ") and "offline" in line)
        fed.flwr("supernode", "unregister", twin_id, "local")


def test_a_superlink_that_loses_its_port_starts_on_another(tls, tmp_path, monkeypatch):
    """free_port() only guesses (Flower's CLIs refuse port 0): a start that finds the port taken is
    retried on another port instead of failing the module."""
    import socket

    import federation

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    ports = iter([taken.getsockname()[1]])
    real = federation.free_port
    monkeypatch.setattr(federation, "free_port", lambda: next(ports, None) or real())
    with taken, LocalFederation(tmp_path, tls, {}) as fresh:
        assert fresh.port != taken.getsockname()[1]
        assert json.loads(fresh.flwr("ls", "local", "--format", "json").stdout)["runs"] == []
