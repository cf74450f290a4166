"""Which GPU each container gets under compose.gpu.yaml, and a refusal where organisations would share one.

    docker compose -f compose.yaml -f compose.gpu.yaml config --format json | python3 docker/gpu_plan.py

Prints the placement (GPU id -> services) and exits 1 if two organisations' containers reserve the same
GPU, unless ALLOW_SHARED_GPUS=1: an organisation sharing a GPU trains slower and can run out of its
memory, which the operator must choose knowingly. The ServerApp (sample grids at checkpoints) may
share an organisation's GPU: .env says which one it uses.
"""

from __future__ import annotations

import json
import os
import sys
from collections import defaultdict


def placement(config: dict) -> dict[str, list[tuple[str, str | None]]]:
    """GPU id -> [(service, its organisation or None)], from the merged Compose configuration."""
    gpus: dict[str, list[tuple[str, str | None]]] = defaultdict(list)
    for name, svc in sorted(config.get("services", {}).items()):
        for device in svc.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", []):
            # ["0,1"]: Docker's nvidia driver joins the ids into NVIDIA_VISIBLE_DEVICES=0,1.
            for gpu in (i.strip() for ids in device.get("device_ids") or [] for i in ids.split(",")):
                gpus[gpu].append((name, (svc.get("environment") or {}).get("ORG")))
    return dict(gpus)


def shared(gpus: dict[str, list[tuple[str, str | None]]]) -> dict[str, list[str]]:
    """GPU id -> the organisations that would share it (only GPUs with two or more)."""
    orgs = {gpu: sorted({org for _, org in users if org}) for gpu, users in gpus.items()}
    return {gpu: o for gpu, o in orgs.items() if len(o) > 1}


def main() -> int:
    gpus = placement(json.load(sys.stdin))
    for gpu, users in sorted(gpus.items()):
        print(f"GPU {gpu}: {', '.join(name for name, _ in users)}")
    clash = shared(gpus)
    if clash and os.environ.get("ALLOW_SHARED_GPUS") != "1":
        for gpu, orgs in sorted(clash.items()):
            print(f"GPU {gpu} is given to {' and '.join(orgs)}: organisations would share it.", file=sys.stderr)
        print("Give each organisation its own GPUs in .env (ORG1_GPU, ORG2_GPU, ...; e.g. ORG1_GPU=0,1 "
              "ORG2_GPU=2 ORG3_GPU=3), or set ALLOW_SHARED_GPUS=1 to share them knowingly.", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
