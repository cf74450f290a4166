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

ORGS = ("org-1", "org-2", "org-3")
# Each organisation's node is a pair (docs/isolation.md): the SuperNode with the key and the network,
# the ClientApp container with the run's code, the images and the GPUs, and no network.
SUPERNODES = tuple(f"{org}-supernode" for org in ORGS)
SILOS = tuple(f"{org}-clientapp" for org in ORGS)


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


FEDERATION = ("superlink", "gateway", "serverapp", *SUPERNODES, *SILOS)
# The demo organisations run only where asked for (`make demo`, the tests' stack, CI).
DEMO = {"COMPOSE_PROFILES": "grafana,demo"}


@pytest.mark.parametrize("files", [("compose.yaml",), ("compose.yaml", "compose.gpu.yaml")], ids=["cpu", "gpu"])
def test_the_shipped_settings_start_no_demo_organisation(files):
    """A fresh clone's `make up` / `make up-gpu`: no demo SuperNode, no GPU given to one, no demo key read."""
    config = compose_config(*files)
    assert not set(config["services"]) & {*SUPERNODES, *SILOS}, sorted(config["services"])
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
    secret_files = {name: secret["file"] for name, secret in compose_config("compose.yaml", env=DEMO)["secrets"].items()}
    for org in ORGS:
        node, app = services[f"{org}-supernode"], services[f"{org}-clientapp"]
        # The SuperNode: the key, the network to the gateway; no data, no models, no caches, no app code.
        assert set(node["networks"]) == {"fleet"} and "silos" in node["networks"]["fleet"]["aliases"]
        assert node["environment"]["ORG"] == org and node["environment"]["SUPERLINK_ADDRESS"] == "gateway:8443"
        assert node["command"] == ["supernode.sh"] and node["image"].split("/")[-1].startswith("superlink:")
        assert [v["target"] for v in node["volumes"]] == ["/relay"]
        assert {Path(x["target"]).name: Path(secret_files[x["source"]]).name for x in node["secrets"]} == {
            "ca.pem": "ca.pem", "node.key": f"{org}.key", "superexec.secret": f"{org}.superexec.secret"}
        assert node["depends_on"]["gateway"]["condition"] == "service_healthy"
        # The ClientApp side: no network at all, no key; its images read-only; the same secret and relay.
        assert app["network_mode"] == "none" and not app.get("networks") and not app.get("extra_hosts")
        assert [(x["source"], x["target"]) for x in app["secrets"]] == [(f"{org}.superexec.secret", "superexec.secret")]
        assert app["command"] == ["clientapp.sh"] and app["init"] is True
        assert app["environment"]["OMP_NUM_THREADS"] == "1" and app["environment"]["HF_HUB_OFFLINE"] == "1"
        data = next(v for v in app["volumes"] if v["target"] == "/data")
        assert data["read_only"] is True and data["source"].endswith(f"data/{org}")
        assert next(v for v in app["volumes"] if v["target"] == "/models")["read_only"] is True
        relay = next(v for v in node["volumes"] if v["target"] == "/relay")
        assert relay["type"] == "volume" and relay in app["volumes"]
        assert {n for n, svc in services.items() if relay in svc.get("volumes", [])} == {f"{org}-supernode", f"{org}-clientapp"}
        assert set(app["depends_on"]) == {f"{org}-supernode"}
        assert app["depends_on"][f"{org}-supernode"]["condition"] == "service_healthy"
        for svc in (node, app):
            assert svc["profiles"] == ["demo"] and not svc.get("ports")
    outputs = next(v for v in services["serverapp"]["volumes"] if v["target"] == "/outputs")
    assert outputs["type"] == "bind" and outputs["source"].endswith("outputs")


def compose_secret_file(name: str) -> str:
    return compose_config("compose.yaml", env=DEMO)["secrets"][name]["file"]


def test_grafana_refuses_to_start_without_its_password(tmp_path):
    # Without certs/grafana.env Grafana would start with admin/admin on the first request.
    result = run_compose_config("compose.yaml", certs=tmp_path)
    assert result.returncode != 0 and "grafana.env" in result.stderr


def test_gpu_overlay_gives_every_clientapp_container_a_gpu_and_a_cuda_image():
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
    assert services["org-2-clientapp"]["network_mode"] == "none"  # the overlay merges, it does not replace
    for name in ("superlink", *SUPERNODES):  # Flower only: the SuperNodes run no app code
        assert "deploy" not in services[name] and "cuda" not in services[name]["image"], name
    dcgm = services["dcgm-exporter"]  # GPU metrics; Prometheus finds it by this name
    assert dcgm["deploy"]["resources"]["reservations"]["devices"][0]["count"] == -1 and not dcgm.get("ports")


def gpu_plan(config: dict, **env: str) -> subprocess.CompletedProcess:
    """docker/gpu_plan.py, as `make up-gpu` runs it on the merged configuration."""
    return subprocess.run([sys.executable, str(REPO / "docker" / "gpu_plan.py")], input=json.dumps(config),
                          capture_output=True, text=True, env=os.environ | {"ALLOW_SHARED_GPUS": "0"} | env)


def gpu_ids(services: dict) -> dict[str, list[str]]:
    """Organisation (its ClientApp container: the SuperNode gets no GPU) or "serverapp" -> device ids."""
    return {s.removesuffix("-clientapp"): services[s]["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"]
            for s in (*SILOS, "serverapp")}


def test_gpu_placement_by_default_is_what_env_states():
    """Each organisation on its own GPU; the ServerApp on GPU 0, shared with org-1, as .env says."""
    config = compose_config("compose.yaml", "compose.gpu.yaml", env=DEMO)
    assert gpu_ids(config["services"]) == {"org-1": ["0"], "org-2": ["1"], "org-3": ["2"], "serverapp": ["0"]}
    env = (REPO / ".env").read_text()
    assert "SERVERAPP_GPU=0\n" in env and "shares\n# with org-1" in env and "ALLOW_SHARED_GPUS=0\n" in env
    plan = gpu_plan(config)
    assert plan.returncode == 0, plan.stderr
    assert plan.stdout.splitlines() == ["GPU 0: org-1-clientapp, serverapp", "GPU 1: org-2-clientapp", "GPU 2: org-3-clientapp"]


def test_two_organisations_on_one_gpu_are_refused_unless_the_operator_allows_it():
    """ORG1_GPU=0,1 alone would leave org-2 on GPU 1 too: refused, saying how to move the others."""
    shared = compose_config("compose.yaml", "compose.gpu.yaml", env=DEMO | {"ORG1_GPU": "0,1"})
    refused = gpu_plan(shared)
    assert refused.returncode == 1
    assert "GPU 1 is given to org-1 and org-2" in refused.stderr and "ORG2_GPU=2 ORG3_GPU=3" in refused.stderr
    assert gpu_plan(shared, ALLOW_SHARED_GPUS="1").returncode == 0


def test_gpu_overlay_gives_an_organisation_several_gpus():
    """ORG1_GPU=0,1 with the others moved: Docker's nvidia driver joins device_ids with commas into
    NVIDIA_VISIBLE_DEVICES, so ["0,1"] is GPUs 0 and 1; NCCL between them needs more /dev/shm than
    Docker's default 64 MB."""
    config = compose_config("compose.yaml", "compose.gpu.yaml", env=DEMO | {"ORG1_GPU": "0,1", "ORG2_GPU": "2", "ORG3_GPU": "3"})
    services = config["services"]
    assert gpu_ids(services) == {"org-1": ["0,1"], "org-2": ["2"], "org-3": ["3"], "serverapp": ["0"]}
    assert all(int(services[s]["shm_size"]) >= 2**30 for s in SILOS)
    plan = gpu_plan(config)
    assert plan.returncode == 0 and "GPU 1: org-1-clientapp" in plan.stdout, plan.stdout + plan.stderr


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
        assert set(config()) == {"supernode", "clientapp"}
        services = config("--profile", "monitoring")
    finally:
        if made:
            password.unlink()
    assert set(services) == {"supernode", "clientapp", "prometheus", "grafana", "dcgm-exporter"}
    for name in ("prometheus", "grafana", "dcgm-exporter"):
        assert set(services[name]["networks"]) == {"node"}, name
        assert all(port["host_ip"] == "127.0.0.1" for port in services[name].get("ports", [])), name
    assert not services["dcgm-exporter"].get("ports")
    mounts = {v["target"]: v["source"] for v in services["grafana"]["volumes"]}
    assert mounts["/var/lib/grafana/dashboards/organisation.json"].endswith("docker/grafana/dashboards/organisation.json")
    scrape = yaml.safe_load((REPO / "docker/join/prometheus.yml").read_text())["scrape_configs"]
    assert scrape[0]["static_configs"][0]["targets"] == ["supernode:9200"]  # relayed to the ClientApp's exporter
