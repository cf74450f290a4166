"""Add or replace one SuperLink connection in Flower's CLI config, leaving the rest untouched.

    python3 docker/flwr_connection.py CONFIG_TOML NAME ADDRESS ROOT_CERTIFICATES
    python3 docker/flwr_connection.py CONFIG_TOML NAME --simulation NUM_SUPERNODES

Flower 1.41 reads connections from $FLWR_HOME/config.toml (default ~/.flwr); writing one there
lets `flwr run . NAME` work without touching any tracked file of this repository. The second form
declares a federation of Flower's Simulation Engine: `flwr run` starts a local SuperLink in the
background (address ":local:") and simulates NUM_SUPERNODES nodes, one CPU each.
"""

import sys
from pathlib import Path

config, name = Path(sys.argv[1]), sys.argv[2]
header = f"[superlink.{name}]"
lines = config.read_text().splitlines() if config.exists() else []
kept, skipping = [], False
for line in lines:
    stripped = line.strip()
    if stripped.startswith("["):
        skipping = stripped == header
    if not skipping:
        kept.append(line)
while kept and not kept[-1].strip():
    kept.pop()
if sys.argv[3] == "--simulation":
    nodes = int(sys.argv[4])
    # Flower 1.41 warns that `options.` in a connection is deprecated in favour of
    # `flwr run --federation-config`, but it is the only way to give a named federation its size.
    block = [header, 'address = ":local:"', f"options.num-supernodes = {nodes}",
             "options.backend.client-resources.num-cpus = 1", "options.backend.client-resources.num-gpus = 0.0"]
    said = f"Flower's Simulation Engine, {nodes} simulated nodes"
else:
    address, ca = sys.argv[3], sys.argv[4]
    block = [header, f'address = "{address}"', f'root-certificates = "{ca}"', "insecure = false"]
    said = f"{address} (TLS, CA {ca})"
config.parent.mkdir(parents=True, exist_ok=True)
config.write_text("\n".join(kept + ([""] if kept else []) + block) + "\n")
print(f"flwr connection '{name}' -> {said} in {config}")
