"""Static checks of the stack: the merged Compose files and the Dockerfile.

The CUDA path cannot run in CI (no GPU); these checks keep it honest there.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from federation import REPO

SILOS = ("org-1", "org-2", "org-3")


def compose_config(*files: str) -> dict:
    if shutil.which("docker") is None or subprocess.run(["docker", "compose", "version"], capture_output=True).returncode:
        if os.environ.get("CI"):
            pytest.fail("docker compose is missing in CI: .ci/run provisions it with ../shared/ci/docker-engine.sh")
        pytest.skip("docker compose is not installed")
    args = [a for f in files for a in ("-f", f)]
    # The shipped defaults: what .env says, not what this shell (e.g. CI's local images) overrides.
    shipped = {line.split("=", 1)[0] for line in (REPO / ".env").read_text().splitlines() if "=" in line}
    env = {k: v for k, v in os.environ.items() if k not in shipped} | {"HOST_UID": "1000", "HOST_GID": "1000"}
    result = subprocess.run(["docker", "compose", *args, "config", "--format", "json"], cwd=REPO,
                            capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_cpu_stack_shape():
    services = compose_config("compose.yaml")["services"]
    assert set(services) == {"superlink", "serverapp", *SILOS, "prometheus", "grafana"}
    for name, svc in services.items():
        assert svc.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
        assert "ALL" in svc["cap_drop"] and "no-new-privileges:true" in svc["security_opt"], name
        assert svc.get("read_only") is True or name == "grafana", name
        assert not svc.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices")
        # Only the SuperLink faces the network; metrics and UIs stay on this host.
        for port in svc.get("ports", []):
            assert name == "superlink" or port["host_ip"] == "127.0.0.1", (name, port)
    superlink = services["superlink"]
    assert any(a.startswith("--ssl-keyfile") for a in superlink["command"]) and "--insecure" not in superlink["command"]
    assert any(v["target"] == "/state" and v["type"] == "volume" for v in superlink["volumes"])
    for silo in SILOS:
        svc = services[silo]
        assert svc["environment"]["ORG"] == silo and svc["environment"]["OMP_NUM_THREADS"] == "1"
        data = next(v for v in svc["volumes"] if v["target"] == "/data")
        assert data["read_only"] is True and data["source"].endswith(f"data/{silo}")
        assert svc["depends_on"]["superlink"]["condition"] == "service_healthy"
        assert "--insecure" not in " ".join(svc["command"])
    outputs = next(v for v in services["serverapp"]["volumes"] if v["target"] == "/outputs")
    assert outputs["type"] == "bind" and outputs["source"].endswith("outputs")


def test_gpu_overlay_gives_every_supernode_a_gpu_and_a_cuda_image():
    services = compose_config("compose.yaml", "compose.gpu.yaml")["services"]
    for name in (*SILOS, "serverapp"):
        svc = services[name]
        devices = svc["deploy"]["resources"]["reservations"]["devices"]
        assert devices and devices[0]["driver"] == "nvidia" and devices[0]["capabilities"] == ["gpu"], name
        assert "cuda" in svc["image"] and "nvidia/cuda" in svc["build"]["args"]["BASE_IMAGE"], name
        assert svc["build"]["args"]["TORCH_INDEX_URL"] == "", name  # PyPI's torch is the CUDA build
    assert len({services[s]["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"][0] for s in SILOS}) == 3
    assert services["org-2"]["environment"]["ORG"] == "org-2"  # the overlay merges, it does not replace
    assert "deploy" not in services["superlink"] and "cuda" not in services["superlink"]["image"]
    dcgm = services["dcgm-exporter"]  # GPU metrics; Prometheus finds it by this name
    assert dcgm["deploy"]["resources"]["reservations"]["devices"][0]["count"] == -1 and not dcgm.get("ports")


def test_dockerfile_passes_hadolint():
    hadolint = Path(sys.executable).parent / "hadolint"
    result = subprocess.run([str(hadolint), "docker/Dockerfile"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_no_secret_or_generated_file_is_tracked():
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    assert not [f for f in tracked if f.endswith((".key", ".pem", ".secret", ".safetensors", ".db"))]
