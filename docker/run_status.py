"""Exit non-zero unless the newest run on a SuperLink finished "completed".

    python3 docker/run_status.py FLWR CONNECTION

`flwr run --stream` exits 0 even when the ServerApp failed (Flower 1.41); this asks the
SuperLink how the run really ended, so that `make run` and `make demo` fail when it did.
"""

import json
import subprocess
import sys

flwr, connection = sys.argv[1], sys.argv[2]
listing = subprocess.run([flwr, "ls", connection, "--format", "json"], capture_output=True, text=True)
try:
    runs = json.loads(listing.stdout)["runs"]
except (json.JSONDecodeError, KeyError):
    sys.exit(f"could not list runs on '{connection}': {listing.stdout}{listing.stderr}")
if not runs:
    sys.exit(f"no run on '{connection}'")
newest = max(runs, key=lambda r: r.get("pending-at") or "")
print(f"run {newest['run-id']}: {newest['status']}")
if newest["status"] != "finished:completed":
    sys.exit(f"run {newest['run-id']} did not complete: `flwr log {newest['run-id']} {connection}` shows why")
