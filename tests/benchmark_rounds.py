"""Where a round's time goes on this machine: per stage and per round, wall time, the slowest node's
compute and the rest, for SecAgg+ and plain FedAvg.

    make bench            (or: python tests/benchmark_rounds.py --rounds 3)

Starts the same real loopback federation as the tests (TLS SuperLink, three SuperNodes with one
torch thread each, tiny model), runs the app once with SecAgg+ and once with plain FedAvg, and
prints the figures the runs recorded in metrics.jsonl: each message stage's wall time as the
ServerApp saw it (app/grid.py), and "compute", the slowest node's time inside our ClientApp where
nodes report it (the fit: data from the latent cache, model load, held-out evaluation of the
received adapter, training; the final evaluate). "rest" is wall minus compute: Flower's message
path (SuperNode polls, a fresh ClientApp process per message) and our imports in that process.
The last line is for scripts: the SecAgg+ medians over rounds.

Each node starts Flower's processes through the bundle-approval wrappers (docker/bin) with this
checkout's bundle approved, as the app image does; --no-approval leaves them out. Do not edit app/
or pyproject.toml during a run: `flwr run .` bundles the tree anew for each mode, and the nodes
refuse a bundle nobody approved.

--flower-polls S (a measurement, not a setting): starts the SuperNodes with Flower's hard-coded
sleeps (3 s when idle, 0.5 s while a reply is awaited) cut to S, to show what they cost.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ["HF_HUB_OFFLINE"] = "1"

from conftest import ORGS, load_certs_tool, tiny_run_config  # noqa: E402
from federation import REPO, SUPERNODE, LocalFederation, approving_env, load_module  # noqa: E402

bundles = load_module("bundles_tool", REPO / "docker" / "bundles.py")

# Flower's SuperNode with one of its hard-coded constants changed, for measurements only:
# --flower-polls S caps the sleeps of its main loop (flwr/supernode/start_client_internal.py);
# bench-scale's claim window gives a fresh ClientApp process longer than Flower's 30 s to check in
# (HEARTBEAT_DEFAULT_INTERVAL, flwr/supercore/corestate/in_memory_corestate.py's claim_task).
CAPPED_POLLS = """
import time
import flwr.supernode.start_client_internal as loop
class Capped:
    def __getattr__(self, name): return getattr(time, name)
    def sleep(self, s): time.sleep(min(s, {cap}))
loop.time = Capped()
"""
CLAIM_WINDOW = """
import flwr.supercore.corestate.in_memory_corestate as corestate
corestate.HEARTBEAT_DEFAULT_INTERVAL = {seconds}
"""
PATCHED_SUPERNODE = """
import runpy, sys
{patch}
sys.argv[0] = {launcher!r}
runpy.run_path({launcher!r}, run_name="__main__")
"""


class PatchedFederation(LocalFederation):
    def __init__(self, *args, patch: str, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.patch = patch

    def _spawn(self, name, args, env=None):
        if args[:2] == SUPERNODE:
            args = [args[0], "-c", PATCHED_SUPERNODE.format(patch=self.patch, launcher=args[1]), *args[2:]]
        return super()._spawn(name, args, env)


IMPORTS = """
import json, time
t = [time.perf_counter()]
from flwr.supernode.cli import flwr_clientapp  # what Flower's flwr-clientapp process imports first
t.append(time.perf_counter())
import app.client_app
t.append(time.perf_counter())
import app.model  # torch, diffusers, peft: the stages that train or evaluate
t.append(time.perf_counter())
print(json.dumps([b - a for a, b in zip(t, t[1:])]))
"""


def import_seconds() -> list[float]:
    """A fresh process's imports, in the order a ClientApp process pays them: Flower's, ours, torch's."""
    done = subprocess.run([sys.executable, "-c", IMPORTS], cwd=REPO, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.splitlines()[-1])


def org_names(n: int) -> list[str]:
    return [f"org-{i}" for i in range(1, n + 1)]


def local_federation(tmp: Path, orgs: int, approval: bool = True, flower_polls: float | None = None,
                     images_per_org: int = 16, node_nice: int = 0,
                     claim_window: float | None = None) -> tuple[LocalFederation, Path]:
    """`orgs` organisations' demo data, certificates and a loopback federation over them (not started),
    and the tiny model. approval: each node runs Flower's commands through the app image's
    bundle-approval wrappers, with this checkout's bundle approved, as a deployed node does."""
    from app.offline import write_demo_data, write_tiny_model

    with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
        model = write_tiny_model(tmp / "tiny-sd")
        write_demo_data(tmp / "data", orgs=orgs, images_per_org=images_per_org)
        load_certs_tool().generate(tmp / "certs", [])
        if approval:
            fab = bundles.build(REPO)
            for org in org_names(orgs):
                bundles.approve(fab, "this checkout", tmp / "approval" / org, "benchmark")
    nodes = {o: {"data-dir": str(tmp / "data" / o), "org": o, "cache-dir": str(tmp / f"cache-{o}")}
             for o in org_names(orgs)}
    node_env = {o: approving_env(o, tmp / "approval" / o) for o in nodes} if approval else None
    patch = (CAPPED_POLLS.format(cap=flower_polls) if flower_polls else "") + (
        CLAIM_WINDOW.format(seconds=claim_window) if claim_window else "")
    cls = functools.partial(PatchedFederation, patch=patch) if patch else LocalFederation
    return cls(tmp / "fed", tmp / "certs", nodes, node_env=node_env, node_nice=node_nice), model


def run_mode(fed: LocalFederation, model: Path, out: Path, mode: str, rounds: int, local_steps: int,
             timeout: float = 900, **settings) -> float:
    """One run of the app in `mode`; its wall time. Exits when it did not complete every round."""
    cfg = tiny_run_config(model, out, **{"num-server-rounds": rounds, "aggregation": mode,
                                         "local-steps": local_steps, "sample-every": 0, **settings})
    t0 = time.perf_counter()
    result = fed.run_app(cfg, timeout=timeout)
    if (status := fed.last_run_status()) != "finished:completed":
        superlink = "\n".join(fed.log("superlink").splitlines()[-40:])
        sys.exit(f"{mode} run ended {status}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}\n"
                 f"the SuperLink's log ends:\n{superlink}")
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds per aggregation mode")
    parser.add_argument("--local-steps", type=int, default=8, help="local training steps per round")
    parser.add_argument("--modes", default="secagg+,fedavg", help="aggregation modes to run, in order")
    parser.add_argument("--approval", action=argparse.BooleanOptionalAction, default=True,
                        help="nodes start Flower's processes through the bundle-approval wrappers, as the app image "
                             "does (default); --no-approval: Flower's own commands, to measure the wrappers' share")
    parser.add_argument("--flower-polls", type=float, metavar="S",
                        help="cap the SuperNodes' hard-coded poll sleeps at S seconds (what they cost)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="fedlora-bench-") as tmp:
        tmp = Path(tmp)
        fed, model = local_federation(tmp, len(ORGS), args.approval, args.flower_polls)
        print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; 3 SuperNodes + SuperLink on "
              f"loopback over TLS; tiny model, 32 px, {args.local_steps} local steps x batch 4"
              + ("; bundle approval on" if args.approval else "; no bundle approval")
              + (f"; SuperNode polls capped at {args.flower_polls} s" if args.flower_polls else ""))
        flower, ours, torch = import_seconds()
        print(f"imports of each message's fresh ClientApp process: Flower's flwr-clientapp {flower:.1f} s, app.client_app "
              f"{ours:.1f} s more, torch/diffusers {torch:.1f} s more in the stages that train or evaluate")
        medians = {}
        with fed:
            for mode in args.modes.split(","):
                out = tmp / f"out-{mode}"
                medians[mode] = report(mode, out, run_mode(fed, model, out, mode, args.rounds, args.local_steps))
        overhead, compute = medians.get("secagg+", (float("nan"), float("nan")))
        print(f"\noverhead_s_per_round={overhead:.1f} compute_s_per_round={compute:.1f}")


def row(label: str, wall: float, compute: float | None) -> str:
    figures = f"{compute:>9.1f} {wall - compute:>7.1f}" if compute is not None else f"{'-':>9} {wall:>7.1f}"
    return f"  {label:<34} {wall:>7.1f} {figures}"


def report(mode: str, out: Path, total: float) -> tuple[float, float]:
    """Prints the run's table; returns the medians over rounds of (round wall - compute, compute)."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rounds = rows[1:]
    print(f"\n{mode}: whole run {total:.1f} s (rounds {sum(m['seconds']['round'] for m in rounds):.1f} s; the rest "
          "is the ServerApp's start, model load, round 0 and the final evaluate stage)")
    print(f"  {'round / stage':<34} {'wall s':>7} {'compute s':>9} {'rest s':>7}")
    overheads, computes = [], []
    for m in rounds:
        s, compute = m["seconds"], m.get("stage_compute_seconds", {})
        slowest = max(v["fit"] for v in m["client_seconds"].values())  # the slowest node gates the round
        print(row(f"{m['round']} prepare (admission)", s["prepare"], None))
        for stage, wall in s["stages"].items():
            print(row(f"{m['round']} {stage}", wall, compute.get(stage)))
        print(row(f"{m['round']} round", s["round"], slowest))
        overheads.append(s["round"] - slowest)
        computes.append(slowest)
    final = rounds[-1].get("final_evaluate")
    if final:
        for stage, wall in final["stages"].items():
            print(row(f"final {stage}", wall, final.get("compute_seconds") if stage == "evaluate" else None))
    overhead, compute = statistics.median(overheads), statistics.median(computes)
    print(f"  median round: wall {statistics.median(m['seconds']['round'] for m in rounds):.1f} s, slowest compute "
          f"{compute:.1f} s, overhead {overhead:.1f} s; held-out loss by round "
          + ", ".join("-" if m["heldout_loss"] is None else f"{m['heldout_loss']:.5f}" for m in rounds))
    return overhead, compute


if __name__ == "__main__":
    main()
