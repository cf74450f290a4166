"""Add or replace one SuperLink connection in Flower's CLI config, leaving the rest untouched.

    python3 docker/flwr_connection.py CONFIG_TOML NAME ADDRESS ROOT_CERTIFICATES

Flower 1.41 reads connections from $FLWR_HOME/config.toml (default ~/.flwr); writing one there
lets `flwr run . NAME` work without touching any tracked file of this repository.
"""

import sys
from pathlib import Path

config, name, address, ca = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
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
block = [header, f'address = "{address}"', f'root-certificates = "{ca}"', "insecure = false"]
config.parent.mkdir(parents=True, exist_ok=True)
config.write_text("\n".join(kept + ([""] if kept else []) + block) + "\n")
print(f"flwr connection '{name}' -> {address} (TLS, CA {ca}) in {config}")
