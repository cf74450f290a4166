"""What a federation of N organisations costs the coordinator and each node, for N = 3, 10 and 20.

    make bench-scale      (or: python tests/benchmark_scale.py --orgs 3,10,20 --rounds 2)

For each N, a real loopback federation as `make bench` starts it (TLS SuperLink behind the Fleet
guard, N SuperNodes with registered keys, the bundle-approval wrappers first on PATH as in the app
image, warm trainers, the tiny model), runs the app with SecAgg+ and then with plain FedAvg, and
samples every process of it four times a second (psutil), attributing each to:

- SuperLink:  flower-superlink (with the Fleet guard) and the SuperExec it starts for ServerApps;
- ServerApp:  the run's flwr-serverapp process (admission, SecAgg+'s share routing and unmasking,
              aggregation, checkpoints);
- node ORG:   its flower-supernode, its SuperExec, the flwr-clientapp processes it starts per
              message, and its warm trainer (found by its --org; it runs in a session of its own).

Per N it first measures the SuperLink with the N nodes connected and no run for 20 s ("idle": the
cores their polls keep busy), then, per mode, rounds completed, round 1's prepare (admission: every
node's first data preparation), and for the rounds after round 1 (medians): the round's wall time
and its overhead (wall minus the slowest node's compute, as `make bench`), the coordinator's CPU
seconds per round (SuperLink, ServerApp; each round from the previous round's checkpoint to its own)
and the nodes' CPU seconds per round, all of them together; then peak memory: SuperLink, ServerApp,
the largest node, and all of the federation's processes together. Memory
is resident set size summed over a party's processes (shared library pages count in each). CPU of a
process that exits between two samples is undercounted by at most a quarter of a second: the fresh
flwr-clientapp processes lose a little, the long-lived coordinator processes nothing.

Two things make one 2-core host stand in for N hosts: the nodes run at nice 10, so the coordinator
keeps the CPU it would have on its own host, and their SuperNodes give a fresh ClientApp process
600 s instead of Flower's hard-coded 30 s to check in (CLAIM_WINDOW, --claim-window 0 for Flower's),
since N processes starting at once on 2 cores take longer than 30 s at N = 20.

On one host every node shares the same cores, so round wall time here grows with N through the
nodes' own work (N fresh ClientApp processes per stage on 2 cores). In a real federation each
organisation has its own host: what grows with N is the coordinator's cost, which this reports
apart. The last line is for scripts.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.outputs import ADAPTER_FILE  # noqa: E402
from benchmark_rounds import local_federation, run_mode  # noqa: E402

SUPERLINK, SERVERAPP = "SuperLink", "ServerApp"
GIB = 2**30
IDLE_SECONDS = 20
# The nodes' niceness: with many nodes on one host, the coordinator keeps the CPU share it would have
# on a host of its own.
NODE_NICE = 10
# Seconds a fresh ClientApp process has to check in with its SuperNode before Flower hands its
# message to another process (30 s, hard-coded). At N = 20 on 2 cores, 20 processes starting at once
# take longer: each node's message was reclaimed and restarted over and over, every process's token
# rejected, and no stage ended (seen in round 1 of SecAgg+). One host per organisation starts one
# process in 2-3 s; the benchmark widens the window (its SuperNodes only) so that it measures that.
CLAIM_WINDOW = 600


class Meter:
    """Samples the federation's processes: per party, cumulative CPU seconds and resident memory."""

    def __init__(self, fed, interval: float = 0.25) -> None:
        self.fed, self.interval = fed, interval
        self.cpu: dict[int, tuple[str, list[tuple[float, float]]]] = {}  # pid: (party, [(t, cpu seconds)])
        self.rss: dict[str, float] = defaultdict(float)  # party: peak summed RSS
        self.total = 0.0  # peak RSS of all the federation's processes together
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> Meter:
        # A sample now, before any window starts: a window opened right after this is charged from it,
        # not from each process's start (which charged the SuperLink's start-up to its idle load).
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def parties(self) -> dict[int, str]:
        roots = {proc.pid: name for name, proc in self.fed.procs.items() if proc.poll() is None}
        children, orgs = defaultdict(list), {}
        for p in psutil.process_iter(["pid", "ppid", "cmdline"]):
            cmd = p.info["cmdline"] or []
            children[p.info["ppid"]].append((p.info["pid"], cmd))
            if any(arg == "app.trainer" for arg in cmd) and "--org" in cmd:
                orgs[p.info["pid"]] = cmd[cmd.index("--org") + 1]
        party: dict[int, str] = {}

        def walk(pid: int, name: str) -> None:
            for child, cmd in children.get(pid, ()):
                party[child] = SERVERAPP if any("flwr-serverapp" in a for a in cmd) else name
                walk(child, party[child])

        for pid, name in {**roots, **orgs}.items():
            name = SUPERLINK if name == "superlink" else self.fed.nodes[name]["org"] if name in self.fed.nodes else name
            party[pid] = name
            walk(pid, name)
        return party

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def _sample(self) -> None:
        now, rss = time.monotonic(), defaultdict(float)
        for pid, name in self.parties().items():
            try:
                p = psutil.Process(pid)
                with p.oneshot():
                    times, mem = p.cpu_times(), p.memory_info().rss
            except psutil.Error:
                continue
            self.cpu.setdefault(pid, (name, []))[1].append((now, times.user + times.system))
            rss[name] += mem
        for name, total in rss.items():
            self.rss[name] = max(self.rss[name], total)
        self.total = max(self.total, sum(rss.values()))

    def cpu_seconds(self, start: float, end: float) -> dict[str, float]:
        """CPU seconds each party spent between two monotonic times."""
        spent: dict[str, float] = defaultdict(float)
        for name, samples in self.cpu.values():
            before = [c for t, c in samples if t <= start]
            upto = [c for t, c in samples if t <= end]
            if upto:
                spent[name] += upto[-1] - (before[-1] if before else 0.0)
        return spent


def round_ends(out: Path) -> list[float]:
    """Each checkpointed round's end, round 0 (the initial adapter) first, as monotonic times."""
    offset = time.time() - time.monotonic()
    # Written once per round (app/outputs.py); metrics.json is rewritten when the next round measures it.
    ends = sorted((p.parent.name, p.stat().st_mtime) for p in out.rglob(f"round-*/{ADAPTER_FILE}"))
    return [mtime - offset for _, mtime in ends]


def measure(n: int, rounds: int, local_steps: int, modes: list[str], nice: int = NODE_NICE,
            keep: Path | None = None, claim_window: float | None = CLAIM_WINDOW) -> list[dict]:
    rows = []
    with contextlib.ExitStack() as stack:
        tmp = keep / f"scale-{n}" if keep else Path(stack.enter_context(tempfile.TemporaryDirectory(
            prefix=f"fedlora-scale-{n}-")))
        tmp.mkdir(parents=True, exist_ok=True)
        fed, model = local_federation(tmp, n, node_nice=nice, claim_window=claim_window)
        t0 = time.perf_counter()
        with fed:
            started = time.perf_counter() - t0
            # What N connected nodes cost the SuperLink with no run: their polls alone.
            with Meter(fed) as meter:
                a = time.monotonic()
                time.sleep(IDLE_SECONDS)
            idle = meter.cpu_seconds(a, time.monotonic())[SUPERLINK] / IDLE_SECONDS
            for mode in modes:
                out = tmp / f"out-{mode}"
                with Meter(fed) as meter:
                    wall = run_mode(fed, model, out, mode, rounds, local_steps, timeout=3 * 3600, **{
                        "min-nodes": n, "node-wait-timeout": 600, "round-timeout": 1800, "eval-timesteps": 2})
                rows.append(summarise(n, mode, rounds, out, meter, wall, started) | {"superlink_idle_cores": idle})
                print_row(rows[-1])
    return rows


def summarise(n: int, mode: str, rounds: int, out: Path, meter: Meter, wall: float, started: float) -> dict:
    records = [json.loads(line) for line in next(out.rglob("metrics.jsonl")).read_text().splitlines()][1:]
    ends = round_ends(out)
    per_round = [meter.cpu_seconds(a, b) for a, b in zip(ends, ends[1:])]
    # Round 1 also admits the nodes (their first data preparation included): the steady figures are
    # from the rounds after it.
    steady, steady_cpu = (records[1:], per_round[1:]) if len(records) > 1 else (records, per_round)
    nodes = [name for name in meter.rss if name not in (SUPERLINK, SERVERAPP)]
    return {
        "orgs": n, "mode": mode, "rounds": f"{len(records)}/{rounds}", "run_s": wall, "nodes_start_s": started,
        "fewest_aggregated": min(len(r["aggregated"]) for r in records),
        "prepare_s": records[0]["seconds"]["prepare"],
        "round_s": statistics.median(r["seconds"]["round"] for r in steady),
        "overhead_s": statistics.median(r["seconds"]["round"] - max(c["fit"] for c in r["client_seconds"].values())
                                        for r in steady),
        "superlink_cpu_s": statistics.median(c[SUPERLINK] for c in steady_cpu),
        "serverapp_cpu_s": statistics.median(c[SERVERAPP] for c in steady_cpu),
        "nodes_cpu_s": statistics.median(sum(c[o] for o in nodes) for c in steady_cpu),
        "superlink_gib": meter.rss[SUPERLINK] / GIB, "serverapp_gib": meter.rss[SERVERAPP] / GIB,
        "node_gib": max(meter.rss[o] for o in nodes) / GIB, "federation_gib": meter.total / GIB,
    }


HEADER = (f"{'N':>3} {'mode':<8} {'rounds':>6} {'prepare':>8} {'round':>7} {'overhead':>8} | {'idle':>5} {'SuperLink':>9} "
          f"{'ServerApp':>9} {'nodes':>7} | {'SuperLink':>9} {'ServerApp':>9} {'node max':>8} {'all':>6}")


def print_row(r: dict) -> None:
    print(f"{r['orgs']:>3} {r['mode']:<8} {r['rounds']:>6} {r['prepare_s']:>8.1f} {r['round_s']:>7.1f} "
          f"{r['overhead_s']:>8.1f} | {r['superlink_idle_cores']:>5.2f} {r['superlink_cpu_s']:>9.1f} {r['serverapp_cpu_s']:>9.1f} {r['nodes_cpu_s']:>7.1f} | "
          f"{r['superlink_gib']:>9.2f} {r['serverapp_gib']:>9.2f} {r['node_gib']:>8.2f} {r['federation_gib']:>6.1f}",
          flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--orgs", default="3,10,20", help="federation sizes, in order")
    parser.add_argument("--rounds", type=int, default=2, help="rounds per aggregation mode (the figures: after the first)")
    parser.add_argument("--local-steps", type=int, default=4, help="local training steps per round")
    parser.add_argument("--modes", default="secagg+,fedavg", help="aggregation modes, in order")
    parser.add_argument("--nice", type=int, default=NODE_NICE, help="the nodes' niceness (0: none)")
    parser.add_argument("--claim-window", type=float, default=CLAIM_WINDOW, metavar="S",
                        help="seconds a fresh ClientApp process has to check in (Flower's: 30; 0 keeps Flower's)")
    parser.add_argument("--keep", type=Path, metavar="DIR", help="work in DIR and keep it (logs, outputs)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    sizes = [int(n) for n in args.orgs.split(",")]
    print(f"machine: {os.cpu_count()} cores, {psutil.virtual_memory().total / GIB:.0f} GiB, load average "
          f"{os.getloadavg()[0]:.1f}; loopback federations over TLS with bundle approval and warm trainers; tiny model, "
          f"32 px, {args.rounds} rounds x {args.local_steps} local steps x batch 4 per mode; nodes at nice {args.nice}; "
          f"claim window {args.claim_window or 30:.0f} s")
    print("seconds: round 1's prepare (admission), then the median round after round 1: wall, overhead, CPU s "
          f"per party; idle: the SuperLink's cores in use over {IDLE_SECONDS} s with the nodes connected and no run; "
          "GiB peak resident "
          "('all': every process of the federation together)")
    print(HEADER, flush=True)
    rows = [row for n in sizes
            for row in measure(n, args.rounds, args.local_steps, args.modes.split(","), args.nice, args.keep,
                               args.claim_window or None)]
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    largest = [r for r in rows if r["orgs"] == max(sizes)]
    print("\n" + " ".join(f"{r['mode']}_{r['orgs']}_rounds={r['rounds']}" for r in largest))


if __name__ == "__main__":
    main()
