"""Misbehaving members on a real federation (TLS SuperLink, authenticated SuperNodes, `flwr run`).

One federation, four short runs: org-1..3 run the app untouched; org-4 ("mallory") and org-5 ("junk")
run it behind tests/misbehaving_node.py's `flwr-clientapp` wrapper, which rewrites their replies (see
that module for why this way and not a setting in the app).

1. SecAgg+: mallory reports a wrong fingerprint, junk answers prepare with garbage: both refused by
   name and reason (log, metrics.jsonl), the run completes with org-1..3.
2. aggregation="robust": mallory's update sits at the bound on every coordinate; the trimmed mean keeps
   every coordinate within the honest members' range.
3./4. SecAgg+: mallory adds levels to its masked vector to place the aggregate on a target of its
   choosing: at 0.99 x the clipping range the coordinator accepts it (what SecAgg+ cannot prevent,
   docs/threat-model.md); at 1.5 x the range check refuses the round and nothing is saved.
   (The test hands mallory the honest mean so that it can hit its target exactly; a real member would
   aim less precisely, within the same range.)
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from app.config import NodeConfig, RunConfig
from app.outputs import read_adapter
from app.secagg import QuantizationSettings, adam_update_bound, levels
from conftest import ORGS, tiny_run_config, with_defaults
from federation import LocalFederation
from misbehaving_node import write_wrapper

pytestmark = pytest.mark.federation


def _history(out):
    return {m["round"]: m for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


def _flat(arrays) -> np.ndarray:
    return np.concatenate([np.ravel(a).astype(np.float64) for a in arrays])


def _honest_updates(cfg: dict, names: dict[str, str], demo_data, before, work) -> dict[str, np.ndarray]:
    """Each organisation's round-1 update, recomputed outside the federation (one thread, as the nodes)."""
    import torch

    from app.client_app import local_update

    run_cfg = RunConfig.from_flower(with_defaults(cfg))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = {}
        for org, data in names.items():
            update, n, _ = local_update(run_cfg, NodeConfig(demo_data / data, org, None, work / f"recompute-{org}"),
                                        before, 1)
            out[org] = (_flat(update), n)
        return out
    finally:
        torch.set_num_threads(threads)


def test_misbehaving_members_on_a_real_federation(tmp_path_factory, tls, demo_data, tiny_model):
    work = tmp_path_factory.mktemp("robust-federation")
    wrapper_dir = work / "misbehaving-bin"
    write_wrapper(wrapper_dir)
    nodes = {org: {"data-dir": str(demo_data / org), "org": org, "cache-dir": str(work / f"cache-{org}")} for org in ORGS}
    mode = {"org-4": work / "org-4.mode", "org-5": work / "org-5.mode"}
    mode["org-4"].write_text("wrong-fingerprint")
    mode["org-5"].write_text("garbage-props")
    with LocalFederation(work, tls, nodes) as fed:
        for org in mode:  # mallory trains on org-1's images, junk never gets that far
            fed.nodes[org] = {"data-dir": str(demo_data / "org-1"), "org": org, "cache-dir": str(work / f"cache-{org}")}
            fed.start_supernode(org, env={"PATH": f"{wrapper_dir}:{fed.env['PATH']}", "MISBEHAVE_FILE": str(mode[org])})

        def run(name: str, **settings):
            out = work / name
            cfg = tiny_run_config(tiny_model, out, **{"num-server-rounds": 1, "sample-every": 0, "min-nodes": 3,
                                                      "node-wait-timeout": 60, "prepare-timeout": 600, "round-timeout": 300,
                                                      **settings})
            result = fed.run_app(cfg)
            return out, cfg, result.stdout + result.stderr, fed.last_run_status()

        # 1. Wrong fingerprint and garbage properties: dropped by name, the run goes on.
        out, cfg, log, status = run("fingerprint")
        assert status == "finished:completed", log[-4000:]
        h = _history(out)
        assert h[1]["aggregated"] == list(ORGS) and h[1]["dropped"] == ["org-4"], h[1]
        assert "trained from weights other than the global adapter sent" in h[1]["refused"]["org-4"]
        assert "names no organisation (org=7)" in h[1]["refused"]["org-5"]
        assert "org-4 trained from weights other than the global adapter sent" in log
        assert "org-5's prepare reply names no organisation" in log

        before = list(read_adapter(out / "rounds" / "round-0000").values())
        honest = _honest_updates(cfg, {"org-1": "org-1", "org-2": "org-2", "org-3": "org-3", "org-4": "org-1"},
                                 demo_data, before, work)
        c = adam_update_bound(cfg["learning-rate"], cfg["local-steps"])

        # 2. Robust mode: mallory's update at the bound everywhere; every coordinate stays in the honest range.
        mode["org-4"].write_text("poison")
        out, cfg, log, status = run("robust", aggregation="robust")
        assert status == "finished:completed", log[-4000:]
        h = _history(out)
        assert h[1]["aggregated"] == list(ORGS) + ["org-4"] and h[1]["aggregation"] == "robust"
        revealed = _flat(read_adapter(out / "rounds" / "round-0001").values()) - _flat(before)
        others = np.stack([honest[o][0] for o in ORGS])
        # Recomputed updates match the nodes' within ~1e-5 (tests/test_federation.py); C is ~8e-3.
        assert np.all(revealed >= others.min(axis=0) - 2e-5) and np.all(revealed <= others.max(axis=0) + 2e-5)
        fedavg = (sum(u * n for u, n in (honest[o] for o in ORGS)) + 0.999 * c * honest["org-4"][1]) / sum(
            honest[o][1] for o in honest)
        print(f"robust: within the honest range; FedAvg would have moved the honest mean by up to "
              f"{float(np.max(fedavg - others.mean(axis=0))):.3g} (C={c:.3g})")

        # 3./4. SecAgg+: mallory places the aggregate on its target, within the range check and no further.
        counts = {o: n for o, (_, n) in honest.items()}
        q = QuantizationSettings.for_round(cfg["learning-rate"], cfg["local-steps"], list(counts.values()))
        assert q.quantization_range == levels(4)
        q_total = sum(round(n / q.max_weight * q.quantization_range) for n in counts.values())
        honest_mean = sum(u * n for u, n in honest.values()) / sum(counts.values())
        for name, target, accepted in (("shift-in-range", 0.99 * c, True), ("shift-beyond", 1.5 * c, False)):
            add = np.round((target - honest_mean) * q_total / (2 * q.clipping_range)).astype(np.int64) % 2**32
            np.save(work / f"{name}.npy", add)
            mode["org-4"].write_text(f"add-levels {work / f'{name}.npy'}")
            out, cfg, log, status = run(name)
            if accepted:
                assert status == "finished:completed", log[-4000:]
                revealed = _flat(read_adapter(out / "rounds" / "round-0001").values()) - _flat(before)
                assert np.all(np.abs(revealed - target) < 2e-5), float(np.max(np.abs(revealed - target)))
                assert _history(out)[1]["aggregated"] == list(ORGS) + ["org-4"]
            else:
                assert status == "finished:failed", log[-4000:]
                assert "the SecAgg+ aggregate has an element of" in log and "outside" in log, log[-4000:]
                assert not (out / "rounds" / "round-0001").exists()
