"""`flwr run . local-simulation`: the same app in Flower's Simulation Engine, for trying it without Docker.

The real CLI, with the connection `make simulation-config` writes: Flower starts its local SuperLink
in the background, which simulates three nodes on Ray. Each one must read its own organisation's
folder, every round must go through SecAgg+, and the outputs must be those of a deployment.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from app.outputs import ADAPTER_FILE
from conftest import ORGS, REPO, tiny_run_config
from federation import BIN, free_port, kv, offline_env
from test_federation import history, train_counts

pytestmark = pytest.mark.federation


def local_superlinks(flwr_home: Path) -> list[int]:
    """The local SuperLinks `flwr` started for this FLWR_HOME (detached, so not our children)."""
    database = str(flwr_home / "local-superlink" / "state.db")
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if proc.name.isdigit() and any(a.endswith(b"flower-superlink") for a in argv) and database.encode() in argv:
            pids.append(int(proc.name))
    return pids


def stop_local_superlinks(flwr_home: Path) -> None:
    # Flower starts it in a session of its own: its process group holds it and what it launched.
    pids = local_superlinks(flwr_home)
    for pid in pids:
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while any(Path(f"/proc/{pid}").exists() for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.5)
    for pid in pids:
        if Path(f"/proc/{pid}").exists():
            os.killpg(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def simulation(tmp_path_factory, tiny_model, demo_data):
    work = tmp_path_factory.mktemp("simulation")
    home = work / "flwr-home"
    declared = subprocess.run([sys.executable, str(REPO / "docker" / "flwr_connection.py"), str(home / "config.toml"),
                               "local-simulation", "--simulation", str(len(ORGS))], capture_output=True, text=True)
    assert declared.returncode == 0, declared.stderr
    env = offline_env(
        FLWR_HOME=str(home), FEDLORA_CACHE=str(work / "cache"),
        # Where Flower's local SuperLink listens (39091 unless told): one of this test's own.
        FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(free_port()), FLWR_LOCAL_CONTROL_API_PORT=str(free_port()),
        # As `make simulate` does: run in this environment, never `uv sync` a fresh one per run.
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
    )
    out = work / "outputs"
    cfg = tiny_run_config(tiny_model, out, **{"sim-data-dir": str(demo_data), "sample-every": 0})

    def flwr(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "flwr"), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)

    try:
        t0 = time.monotonic()
        result = flwr("run", ".", "local-simulation", "--stream", "--run-config", kv(cfg))
        seconds = time.monotonic() - t0
        print(result.stdout[-5000:], result.stderr[-3000:])
        print(f"flwr run . local-simulation: {seconds:.0f} s")
        runs = json.loads(flwr("ls", "local-simulation", "--format", "json").stdout)["runs"]
        yield {"out": out, "cfg": cfg, "log": result.stdout + result.stderr, "status": runs[0]["status"]}
    finally:
        stop_local_superlinks(home)
    assert not local_superlinks(home)


def test_simulated_organisations_train_through_secagg_into_deployment_outputs(simulation, demo_data):
    assert simulation["status"] == "finished:completed", simulation["log"][-3000:]
    assert "Flower Simulation Engine: for trying and developing on one machine, not for deploying" in simulation["log"]
    h = history(simulation["out"])
    assert sorted(h) == [0, 1, 2]
    # Each simulated node read its own organisation's folder: the organisations hold different counts.
    counts = train_counts(demo_data, simulation["cfg"])
    assert len(set(counts.values())) == len(ORGS), counts
    for rnd in (1, 2):
        assert h[rnd]["aggregated"] == list(ORGS), h[rnd]
        assert h[rnd]["aggregation"] == "secagg+" and h[rnd]["quantization"]["max_weight"] == max(counts.values())
        assert h[rnd]["num_examples_by_org"] == counts
    assert simulation["log"].count("Secure aggregation completed") == 2
    assert [m["heldout_orgs"] for m in h.values()] == [list(ORGS)] * 3
    final = simulation["out"] / "final" / ADAPTER_FILE
    assert final.read_bytes() == (simulation["out"] / "rounds" / "round-0002" / ADAPTER_FILE).read_bytes()
    assert final.read_bytes() != (simulation["out"] / "rounds" / "round-0001" / ADAPTER_FILE).read_bytes()
