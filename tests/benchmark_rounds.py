"""Where a round's time goes on this machine: our compute vs Flower's messaging, SecAgg+ vs FedAvg.

    make bench            (or: python tests/benchmark_rounds.py --rounds 3)

Starts the same real loopback federation as the tests (TLS SuperLink, three SuperNodes, tiny
model), runs the app once with SecAgg+ and once with plain FedAvg, and prints per-round figures
from the run's own metrics. "client fit" is the slowest node's time inside our ClientApp
(loading data and model, measuring the received adapter's held-out loss, training); everything else in a round is Flower: message polling
(SuperNode and ServerApp sleep 3 s between polls), a fresh ClientApp process per message, and for
SecAgg+ the key exchange and masking stages.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ["HF_HUB_OFFLINE"] = "1"

from conftest import ORGS, load_certs_tool, tiny_run_config  # noqa: E402
from federation import REPO, LocalFederation  # noqa: E402


def import_seconds(module: str) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", f"import {module}"], cwd=REPO, check=True, capture_output=True)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds per aggregation mode")
    parser.add_argument("--local-steps", type=int, default=8, help="local training steps per round")
    args = parser.parse_args()

    from app.offline import write_demo_data, write_tiny_model

    with tempfile.TemporaryDirectory(prefix="fedlora-bench-") as tmp:
        tmp = Path(tmp)
        with open(os.devnull, "w") as quiet:
            stdout, sys.stdout = sys.stdout, quiet
            model = write_tiny_model(tmp / "tiny-sd")
            write_demo_data(tmp / "data", orgs=len(ORGS), images_per_org=16)
            load_certs_tool().generate(tmp / "certs", [])
            sys.stdout = stdout
        nodes = {o: {"data-dir": str(tmp / "data" / o), "org": o, "cache-dir": str(tmp / f"cache-{o}")} for o in ORGS}
        print(f"machine: {os.cpu_count()} cores; 3 SuperNodes + SuperLink on loopback over TLS; tiny model, 32 px, "
              f"{args.local_steps} local steps x batch 4")
        print(f"process start + import, per ClientApp message: app.client_app {import_seconds('app.client_app'):.1f} s; "
              f"+ torch/diffusers (train/evaluate only) {import_seconds('app.model'):.1f} s")
        with LocalFederation(tmp / "fed", tmp / "certs", nodes) as fed:
            for mode in ("secagg+", "fedavg"):
                out = tmp / f"out-{mode}"
                cfg = tiny_run_config(model, out, **{"num-server-rounds": args.rounds, "aggregation": mode,
                                                     "local-steps": args.local_steps, "sample-every": 0})
                t0 = time.perf_counter()
                result = fed.run_app(cfg)
                if fed.last_run_status() != "finished:completed":
                    sys.exit(f"{mode} run failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
                report(mode, out, time.perf_counter() - t0)


def report(mode: str, out: Path, total: float) -> None:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    print(f"\n{mode}: whole run {total:.1f} s, of which prepare, startup and the final evaluate stage "
          f"{total - sum(m['seconds']['round'] for m in rows[1:]):.1f} s")
    print(f"  {'round':>5} {'round s':>8} {'fit stages':>10} {'client fit':>10} {'(train)':>8} {'Flower+rest':>11} "
          f"{'held-out loss':>13}")
    for m in rows[1:]:
        s, c = m["seconds"], m["client_seconds"]
        client = max(v["fit"] for v in c.values())  # the slowest node gates the round
        print(f"  {m['round']:>5} {s['round']:>8.1f} {s['fit']:>10.1f} {client:>10.1f} "
              f"{max(v['train'] for v in c.values()):>8.1f} {s['round'] - client:>11.1f} {m['heldout_loss']:>13.5f}")
    if "evaluate_stage_seconds" in rows[-1]:
        print(f"  final evaluate stage: {rows[-1]['evaluate_stage_seconds']:.1f} s")


if __name__ == "__main__":
    main()
