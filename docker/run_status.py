"""How a run on a SuperLink ended: exit non-zero unless it finished "completed".

    flwr run . CONNECTION --format json | python3 docker/run_status.py --run-id   # prints the run id
    python3 docker/run_status.py FLWR CONNECTION [RUN_ID]

`flwr run --stream` exits 0 even when the ServerApp failed (Flower 1.41); this asks the
SuperLink how the run really ended, so that `make run` and `make demo` fail when it did.
Ask about RUN_ID: the newest run on a shared SuperLink may be someone else's (without RUN_ID the
newest run is reported, which is right only where nobody else submits runs).

`flwr run --format json` prints the run id as JSON ("run-id"); `--run-id` reads it from there and
fails with Flower's message if the run did not start. With `--format json`, Flower 1.41 swallows
what `--stream` would show, so stream the logs with `flwr log RUN_ID CONNECTION --stream`.
"""

from __future__ import annotations  # the host's python3 may be older than 3.10

import json
import subprocess
import sys


def run_id_from(printed: str) -> str:
    """The run id in `flwr run --format json`'s output."""
    try:
        result = json.loads(printed)
    except json.JSONDecodeError:
        sys.exit(f"`flwr run --format json` printed no JSON:\n{printed}")
    if not result.get("success") or not result.get("run-id"):
        sys.exit(f"the run did not start: {result.get('error-message', printed)}")
    return str(result["run-id"])


def report(flwr: str, connection: str, run_id: str | None) -> None:
    command = [flwr, "ls", connection, "--format", "json", *(["--run-id", run_id] if run_id else [])]
    listing = subprocess.run(command, capture_output=True, text=True)
    try:
        runs = json.loads(listing.stdout)["runs"]
    except (json.JSONDecodeError, KeyError):
        sys.exit(f"could not list runs on '{connection}': {listing.stdout}{listing.stderr}")
    if run_id:
        runs = [r for r in runs if r["run-id"] == run_id]
    if not runs:
        sys.exit(f"no run {run_id} on '{connection}'" if run_id else f"no run on '{connection}'")
    run = runs[0] if run_id else max(runs, key=lambda r: r.get("pending-at") or "")
    print(f"run {run['run-id']}: {run['status']}")
    if run["status"] != "finished:completed":
        sys.exit(f"run {run['run-id']} did not complete: `flwr log {run['run-id']} {connection}` shows why")


if __name__ == "__main__":
    if sys.argv[1:] == ["--run-id"]:
        print(run_id_from(sys.stdin.read()))
    else:
        report(sys.argv[1], sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else None)
