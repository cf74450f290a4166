"""Static checks of the stack: the merged Compose files and the Dockerfile.

The CUDA path cannot run in CI (no GPU); these checks keep it honest there.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from federation import REPO

SILOS = ("org-1", "org-2", "org-3")


def run_compose_config(*files: str, certs: Path | None, env: dict | None = None) -> subprocess.CompletedProcess:
    if shutil.which("docker") is None or subprocess.run(["docker", "compose", "version"], capture_output=True).returncode:
        if os.environ.get("CI"):
            pytest.fail("docker compose is missing in CI: .ci/run provisions it with ../shared/ci/docker-engine.sh")
        pytest.skip("docker compose is not installed")
    args = [a for f in files for a in ("-f", f)]
    # The shipped defaults: what .env says, not what this shell (e.g. CI's local images) overrides.
    shipped = {line.split("=", 1)[0] for line in (REPO / ".env").read_text().splitlines() if "=" in line}
    env = {k: v for k, v in os.environ.items() if k not in shipped} | {"HOST_UID": "1000", "HOST_GID": "1000"} | (env or {})
    return subprocess.run(["docker", "compose", *args, "config", "--format", "json"], cwd=REPO,
                          capture_output=True, text=True, env=env | ({"CERTS_DIR": str(certs)} if certs else {}))


def compose_config(*files: str, env: dict | None = None) -> dict:
    """The merged configuration, as after `make certs` (Compose reads Grafana's password file)."""
    with tempfile.TemporaryDirectory() as certs:
        (Path(certs) / "grafana.env").write_text("GF_SECURITY_ADMIN_PASSWORD=test\n")
        result = run_compose_config(*files, certs=Path(certs), env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


FEDERATION = ("superlink", "gateway", "serverapp", *SILOS)
# The demo organisations run only where asked for (`make demo`, the tests' stack, CI).
DEMO = {"COMPOSE_PROFILES": "grafana,demo"}


@pytest.mark.parametrize("files", [("compose.yaml",), ("compose.yaml", "compose.gpu.yaml")], ids=["cpu", "gpu"])
def test_the_shipped_settings_start_no_demo_organisation(files):
    """A fresh clone's `make up` / `make up-gpu`: no demo SuperNode, no GPU given to one, no demo key read."""
    config = compose_config(*files)
    assert not set(config["services"]) & set(SILOS), sorted(config["services"])
    assert not {name for name in config.get("secrets", {}) if name.startswith("org-")}


def test_cpu_stack_shape():
    services = compose_config("compose.yaml", env=DEMO)["services"]
    assert set(services) == {*FEDERATION, "prometheus", "alertmanager", "grafana"}
    for name, svc in services.items():
        assert svc.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
        assert "ALL" in svc["cap_drop"] and "no-new-privileges:true" in svc["security_opt"], name
        assert svc.get("read_only") is True or name == "grafana", name
        assert not svc.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices")
        # Only the gateway faces the network; the Control API, metrics and UIs stay on this host.
        for port in svc.get("ports", []):
            assert name == "gateway" or port["host_ip"] == "127.0.0.1", (name, port)
    for name in FEDERATION:
        assert services[name]["mem_limit"] and services[name]["pids_limit"] > 0, name
    superlink = services["superlink"]
    assert any(a.startswith("--ssl-keyfile") for a in superlink["command"]) and "--insecure" not in superlink["command"]
    assert "--enable-supernode-auth" in superlink["command"]
    assert any(v["target"] == "/state" and v["type"] == "volume" for v in superlink["volumes"])
    assert [p["target"] for p in services["gateway"]["ports"]] == [8443]
    # The SuperLink (with its open Control API) shares no network with any organisation's node.
    assert set(superlink["networks"]) == {"coordinator"} and set(services["gateway"]["networks"]) == {"coordinator", "fleet"}
    for silo in SILOS:
        svc = services[silo]
        assert set(svc["networks"]) == {"fleet"}
        assert svc["environment"]["ORG"] == silo and svc["environment"]["OMP_NUM_THREADS"] == "1"
        assert svc["environment"]["SUPERLINK_ADDRESS"] == "gateway:8443" and svc["command"] == ["supernode.sh"]
        assert svc["profiles"] == ["demo"]
        data = next(v for v in svc["volumes"] if v["target"] == "/data")
        assert data["read_only"] is True and data["source"].endswith(f"data/{silo}")
        key = next(x for x in svc["secrets"] if x["target"] == "node.key")
        assert compose_secret_file(key["source"]).endswith(f"nodes/{silo}.key")
        assert svc["depends_on"]["gateway"]["condition"] == "service_healthy"
    outputs = next(v for v in services["serverapp"]["volumes"] if v["target"] == "/outputs")
    assert outputs["type"] == "bind" and outputs["source"].endswith("outputs")


def compose_secret_file(name: str) -> str:
    return compose_config("compose.yaml", env=DEMO)["secrets"][name]["file"]


def test_grafana_refuses_to_start_without_its_password(tmp_path):
    # Without certs/grafana.env Grafana would start with admin/admin on the first request.
    result = run_compose_config("compose.yaml", certs=tmp_path)
    assert result.returncode != 0 and "grafana.env" in result.stderr


def test_gpu_overlay_gives_every_supernode_a_gpu_and_a_cuda_image():
    services = compose_config("compose.yaml", "compose.gpu.yaml", env=DEMO)["services"]
    cpu_base = compose_config("compose.yaml")["services"]["serverapp"]["build"]["args"]["BASE_IMAGE"]
    for name in (*SILOS, "serverapp"):
        svc = services[name]
        devices = svc["deploy"]["resources"]["reservations"]["devices"]
        assert devices and devices[0]["driver"] == "nvidia" and devices[0]["capabilities"] == ["gpu"], name
        # The CPU image's base; PyPI's torch is the CUDA build, and the CPU wheel is refused.
        assert "cuda" in svc["image"] and svc["build"]["args"]["BASE_IMAGE"] == cpu_base, name
        assert svc["build"]["args"]["TORCH_INDEX_URL"] == "" and svc["build"]["args"]["TORCH_BUILD"] == "cuda", name
        assert svc["environment"]["NVIDIA_DRIVER_CAPABILITIES"] == "compute,utility", name
    assert len({services[s]["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"][0] for s in SILOS}) == 3
    assert services["org-2"]["environment"]["ORG"] == "org-2"  # the overlay merges, it does not replace
    assert "deploy" not in services["superlink"] and "cuda" not in services["superlink"]["image"]
    dcgm = services["dcgm-exporter"]  # GPU metrics; Prometheus finds it by this name
    assert dcgm["deploy"]["resources"]["reservations"]["devices"][0]["count"] == -1 and not dcgm.get("ports")


def test_gpu_overlay_gives_an_organisation_several_gpus():
    """ORG1_GPU=0,1: Docker's nvidia driver joins device_ids with commas into NVIDIA_VISIBLE_DEVICES, so
    ["0,1"] is GPUs 0 and 1; NCCL between them needs more /dev/shm than Docker's default 64 MB."""
    services = compose_config("compose.yaml", "compose.gpu.yaml", env=DEMO | {"ORG1_GPU": "0,1"})["services"]
    ids = {s: services[s]["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] for s in SILOS}
    assert ids == {"org-1": ["0,1"], "org-2": ["1"], "org-3": ["2"]}
    assert all(int(services[s]["shm_size"]) >= 2**30 for s in SILOS)


def test_dockerfile_passes_hadolint():
    hadolint = Path(sys.executable).parent / "hadolint"
    result = subprocess.run([str(hadolint), "docker/Dockerfile"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_no_secret_or_generated_file_is_tracked():
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    assert not [f for f in tracked if f.endswith((".key", ".pem", ".secret", ".safetensors", ".db"))]


def test_alerts_go_through_alertmanager_with_settings_from_env():
    """Prometheus sends to Alertmanager; its receivers and grouping intervals come from .env alone."""
    import yaml

    prometheus = yaml.safe_load((REPO / "docker/prometheus/prometheus.yml").read_text())
    assert prometheus["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] == ["alertmanager:9093"]
    shipped = dict(line.split("=", 1) for line in (REPO / ".env").read_text().splitlines() if "=" in line and line[0] != "#")
    env = compose_config("compose.yaml")["services"]["alertmanager"]["environment"]
    for key in ("ALERT_GROUP_WAIT", "ALERT_GROUP_INTERVAL", "ALERT_REPEAT_INTERVAL", "ALERT_WEBHOOK_URL", "ALERT_EMAIL_TO"):
        assert env[key] == shipped[key], key
    assert compose_config("compose.yaml", env={"ALERT_GROUP_WAIT": "2s"})["services"]["alertmanager"]["environment"][
        "ALERT_GROUP_WAIT"] == "2s"
    # No second default hides behind .env: without it, Compose says which setting is missing.
    with tempfile.TemporaryDirectory() as certs:
        (Path(certs) / "grafana.env").write_text("GF_SECURITY_ADMIN_PASSWORD=test\n")
        result = run_compose_config("compose.yaml", certs=Path(certs), env={"COMPOSE_DISABLE_ENV_FILE": "1"})
    assert result.returncode != 0 and "ALERT_GROUP_WAIT" in result.stderr


def test_an_organisations_own_monitoring_stays_on_its_loopback():
    """`make join-monitoring`: Prometheus scrapes the organisation's node (and its GPUs), Grafana shows
    the Organisation dashboard; both only on 127.0.0.1, on the node's own network, and off by default."""
    import yaml

    env = {k: v for k, v in os.environ.items() if not k.startswith(("COMPOSE_", "ORG"))} | {
        "ORG": "clinic-a", "SUPERLINK_ADDRESS": "fl.example.org:8000", "ORG_DATA_DIR": "/srv/images"}
    password = REPO / "docker/join/grafana.env"
    made = not password.exists()
    if made:
        password.write_text("GF_SECURITY_ADMIN_PASSWORD=test\n")
    try:
        def config(*args):
            result = subprocess.run(["docker", "compose", "--env-file", "docker/join/.env", "-f", "docker/join/compose.yaml",
                                     "-f", "docker/join/compose.gpu.yaml", *args, "config", "--format", "json"],
                                    cwd=REPO, env=env, capture_output=True, text=True)
            assert result.returncode == 0, result.stderr
            return json.loads(result.stdout)["services"]
        assert set(config()) == {"node"}
        services = config("--profile", "monitoring")
    finally:
        if made:
            password.unlink()
    assert set(services) == {"node", "prometheus", "grafana", "dcgm-exporter"}
    for name in ("prometheus", "grafana", "dcgm-exporter"):
        assert set(services[name]["networks"]) == {"node"}, name
        assert all(port["host_ip"] == "127.0.0.1" for port in services[name].get("ports", [])), name
    assert not services["dcgm-exporter"].get("ports")
    mounts = {v["target"]: v["source"] for v in services["grafana"]["volumes"]}
    assert mounts["/var/lib/grafana/dashboards/organisation.json"].endswith("docker/grafana/dashboards/organisation.json")
    scrape = yaml.safe_load((REPO / "docker/join/prometheus.yml").read_text())["scrape_configs"]
    assert scrape[0]["static_configs"][0]["targets"] == ["node:9200"]
