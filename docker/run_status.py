"""How a run on a SuperLink ended: exit non-zero unless it finished "completed".

    flwr run . CONNECTION --format json | python3 docker/run_status.py --run-id   # prints the run id
    python3 docker/run_status.py FLWR CONNECTION [RUN_ID]

`flwr run --stream` exits 0 even when the ServerApp failed (Flower 1.41); this asks the
SuperLink how the run really ended, so that `make run` and `make demo` fail when it did.
Ask about RUN_ID: the newest run on a shared SuperLink may be someone else's (without RUN_ID the
newest run is reported, which is right only where nobody else submits runs).

    python3 docker/run_status.py --wait FLWR CONNECTION RUN_ID   # first wait until the run has finished

`flwr log --stream` also ends when the SuperLink restarts, while the run may go on (Flower keeps a
running ServerApp through a short SuperLink restart): `--wait` asks again until the run has
finished, for as long as the SuperLink answers within WAIT_UNREACHABLE seconds.

`flwr run --format json` prints the run id as JSON ("run-id"); `--run-id` reads it from there and
fails with Flower's message if the run did not start. With `--format json`, Flower 1.41 swallows
what `--stream` would show, so stream the logs with `flwr log RUN_ID CONNECTION --stream`.
"""

from __future__ import annotations  # the host's python3 may be older than 3.10

import json
import subprocess
import sys
import time


def run_id_from(printed: str) -> str:
    """The run id in `flwr run --format json`'s output."""
    try:
        result = json.loads(printed)
    except json.JSONDecodeError:
        sys.exit(f"`flwr run --format json` printed no JSON:\n{printed}")
    if not result.get("success") or not result.get("run-id"):
        sys.exit(f"the run did not start: {result.get('error-message', printed)}")
    return str(result["run-id"])


WAIT_POLL, WAIT_UNREACHABLE = 5.0, 600.0


def list_runs(flwr: str, connection: str, run_id: str | None) -> list[dict]:
    command = [flwr, "ls", connection, "--format", "json", *(["--run-id", run_id] if run_id else [])]
    listing = subprocess.run(command, capture_output=True, text=True)
    try:
        return json.loads(listing.stdout)["runs"]
    except (json.JSONDecodeError, KeyError):
        raise ConnectionError(f"could not list runs on '{connection}': {listing.stdout}{listing.stderr}") from None


def wait(flwr: str, connection: str, run_id: str) -> None:
    """Until the run has finished, or the SuperLink stayed unreachable for WAIT_UNREACHABLE seconds."""
    told, unreachable_since = False, None
    while True:
        try:
            runs = [r for r in list_runs(flwr, connection, run_id) if r["run-id"] == run_id]
            unreachable_since = None
        except ConnectionError:
            runs = []
            unreachable_since = unreachable_since or time.monotonic()
            if time.monotonic() - unreachable_since > WAIT_UNREACHABLE:
                return  # report() says why
        if runs and runs[0]["status"].startswith("finished"):
            return
        if not told:
            print(f"the log stream ended, but run {run_id} has not finished (the SuperLink restarting?): waiting for "
                  f"it; `flwr log {run_id} {connection} --stream` follows its log again", file=sys.stderr, flush=True)
            told = True
        time.sleep(WAIT_POLL)


def report(flwr: str, connection: str, run_id: str | None) -> None:
    try:
        runs = list_runs(flwr, connection, run_id)
    except ConnectionError as err:
        sys.exit(str(err))
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
    elif sys.argv[1] == "--wait":
        wait(*sys.argv[2:5])
        report(*sys.argv[2:5])
    else:
        report(sys.argv[1], sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else None)
