"""The organisation's join kit: node keys, the preflight, docker/supernode.sh, docker/join/compose*.yaml.

The `federation` tests run a real TLS `flower-superlink --enable-supernode-auth` on loopback, register
one organisation's key with the real `flwr supernode register`, and ask the preflight and
docker/supernode.sh what an organisation's admin would see.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from app.offline import write_demo_data
from conftest import load_certs_tool
from federation import BIN, REPO, free_port, offline_env


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


preflight = _load("preflight", REPO / "docker" / "preflight.py")
node_key = _load("node_key", REPO / "certs" / "node_key.py")


def verdicts(results) -> dict[str, tuple[str, str]]:
    return {r.name: (r.status, r.detail) for r in results}


# ---------------------------------------------------------------------------------------- unit


def test_node_key_is_what_flower_loads_private_and_never_replaced(tmp_path):
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key
    from flwr.cli.supernode.register import try_load_public_key

    key, pub, created = node_key.create(tmp_path / "nodes", "clinic-a")
    assert created and key.stat().st_mode & 0o777 == 0o600
    assert try_load_public_key(pub).startswith(b"-----BEGIN PUBLIC KEY-----")  # what `flwr supernode register` reads
    load_ssh_private_key(key.read_bytes(), None)  # what `flower-supernode --auth-supernode-private-key` reads
    before = key.read_bytes()
    assert node_key.create(tmp_path / "nodes", "clinic-a")[2] is False and key.read_bytes() == before
    with pytest.raises(node_key.NodeKeyError, match="lowercase"):
        node_key.create(tmp_path / "nodes", "Clinic_A")


def test_node_secret_is_private_long_and_never_replaced(tmp_path):
    secret, created = node_key.create_secret(tmp_path / "nodes", "clinic-a")
    assert created and secret.name == "clinic-a.superexec.secret" and secret.stat().st_mode & 0o777 == 0o600
    before = secret.read_bytes()
    assert len(before) >= preflight.MIN_SECRET_BYTES
    assert node_key.create_secret(tmp_path / "nodes", "clinic-a") == (secret, False) and secret.read_bytes() == before
    assert node_key.create_secret(tmp_path / "nodes", "clinic-b")[0].read_bytes() != before


def test_secret_and_relay_verdicts(tmp_path, monkeypatch):
    check = lambda **kw: (preflight.check_secret(settings(tmp_path, **kw)), preflight.check_relay(settings(tmp_path, **kw)))
    (tmp_path / "short").write_text("abc")
    secret, relay = check(secret=tmp_path / "missing", relay_dir=tmp_path / "no-such-volume")
    assert secret.status == "FAILED" and "make org-key ORG=org-x" in secret.detail
    assert relay.status == "FAILED" and "cannot write to" in relay.detail
    secret, _ = check(secret=tmp_path / "short", relay_dir=tmp_path)
    assert secret.status == "FAILED" and "3 bytes" in secret.detail
    secret, _ = check(secret=node_key.create_secret(tmp_path, "org-x")[0], relay_dir=tmp_path)
    assert secret.status == "ok", secret
    monkeypatch.setenv("PATH", str(tmp_path))  # an image without socat
    relay = preflight.check_relay(settings(tmp_path, relay_dir=tmp_path))
    assert relay.status == "FAILED" and "socat is not in this image" in relay.detail


@pytest.mark.parametrize("skew, status, words", [
    (0.3, "ok", "ahead of"),
    (-120, "ok", "behind"),
    (3.0, "warn", "close to"),
    (-260, "warn", "close to"),
    (6.0, "FAILED", "more than 5 s in the SuperLink's future"),
    (-400, "FAILED", "older than 305 s"),
])
def test_clock_verdict_follows_flowers_signature_window(skew, status, words):
    result = preflight.clock_verdict(skew)
    assert result.status == status and words in result.detail
    assert status == "ok" or "NTP" in result.detail


def test_clock_skew_from_an_http_date():
    # The Date header has 1 s resolution: its middle is the estimate.
    assert preflight.clock_skew("Tue, 01 Dec 2026 17:00:00 GMT", 1796144400.5 + 7) == pytest.approx(7)


def settings(tmp_path: Path, **overrides) -> preflight.Settings:
    base = dict(address="127.0.0.1:1", org="org-x", key=tmp_path / "none.key", ca=tmp_path / "none.pem",
                data_dir=tmp_path / "data", default_caption=None, expect_gpu=False)
    return preflight.Settings(**(base | overrides))


def test_data_folder_verdicts(tmp_path):
    (tmp_path / "empty").mkdir()
    plain = tmp_path / "plain"
    good = write_demo_data(tmp_path / "demo", orgs=1, images_per_org=4)[0]
    plain.mkdir()
    for f in sorted(good.glob("*.png"))[:3]:
        (plain / f.name).write_bytes(f.read_bytes())
    check = lambda folder, caption=None: preflight.check_data(settings(tmp_path, data_dir=folder, default_caption=caption))
    assert check(tmp_path / "missing").status == "FAILED" and "does not exist" in check(tmp_path / "missing").detail
    assert check(tmp_path / "empty").status == "FAILED" and "0 usable image(s)" in check(tmp_path / "empty").detail
    uncaptioned = check(plain)
    assert uncaptioned.status == "FAILED" and "default-caption" in uncaptioned.detail
    assert check(plain, "a photo").status == "ok"
    ok = check(good)
    assert ok.status == "ok" and "4 captioned images" in ok.detail and "metadata.jsonl" in ok.detail


@pytest.mark.parametrize("visible, node_gpu, extra, status, words", [
    (2, "0,1", "", "ok", "2 visible: GPU 0, GPU 1 (CUDA 13.0); trains on 2 process(es), train-processes=auto"),
    (2, "0,1", "train-processes=1", "ok", "trains on 1 process(es), train-processes=1"),
    (1, "0,1", "", "FAILED", "NODE_GPU=0,1 names 2 GPU(s), this container sees 1 (GPU 0)"),
    (2, "0,1", "train-processes=3", "FAILED", "train-processes=3, but this node sees 2 GPU(s)"),
])
def test_gpu_check_counts_the_gpus_the_node_was_given(tmp_path, monkeypatch, visible, node_gpu, extra, status, words):
    """What a container of the CUDA image would see (torch's view of its GPUs, faked: CI has none)."""
    import torch

    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: f"GPU {i}")
    env = {"ORG": "org-x", "NODE_GPU": node_gpu, "NODE_CONFIG_EXTRA": extra, "FEDLORA_EXPECT_GPU": "1"}
    result = preflight.check_gpu(preflight.Settings.from_env(env))
    assert result.status == status and words in result.detail, result


def test_settings_are_checked_before_dialling(tmp_path):
    results = verdicts(preflight.run_checks(settings(tmp_path, address="fl.example.org", org="Clinic A"), {"data"}))
    assert results["org"][0] == "FAILED" and results["address"][0] == "FAILED"
    assert results["reachable"][0] == "skip" and results["key"][0] == "FAILED" and "make org-key" in results["key"][1]


# ---------------------------------------------------------------------------------------- compose (static)


JOIN_ENV = {"ORG": "clinic-a", "SUPERLINK_ADDRESS": "fl.example.org:8000", "ORG_DATA_DIR": "/srv/clinic-a/images"}


def require_compose() -> None:
    if shutil.which("docker") is None or subprocess.run(["docker", "compose", "version"], capture_output=True).returncode:
        if os.environ.get("CI"):
            pytest.fail("docker compose is missing in CI: .ci/run provisions it with ../shared/ci/docker-engine.sh")
        pytest.skip("docker compose is not installed")


def join_config(*files: str, profile: str | None = None, env: dict | None = None) -> dict:
    """`docker compose config` of the join kit with only the required settings given, as shipped."""
    require_compose()
    shipped = {line.split("=", 1)[0] for line in (REPO / ".env").read_text().splitlines() if "=" in line}
    env = {k: v for k, v in os.environ.items() if k not in shipped} | JOIN_ENV | (env or {})
    args = [a for f in files for a in ("-f", f)] + (["--profile", profile] if profile else [])
    result = subprocess.run(["docker", "compose", *args, "config", "--format", "json"], cwd=REPO,
                            capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_join_settings_that_are_required_say_what_to_set():
    require_compose()
    env = {k: v for k, v in os.environ.items() if k not in JOIN_ENV} | {"ORG": "clinic-a"}
    result = subprocess.run(["docker", "compose", "-f", "docker/join/compose.yaml", "config"], cwd=REPO,
                            capture_output=True, text=True, env=env)
    assert result.returncode != 0 and "SUPERLINK_ADDRESS" in result.stderr and "gateway" in result.stderr


def test_join_node_is_hardened_and_only_its_supernode_dials_out():
    config = join_config("docker/join/compose.yaml")
    assert config["name"] == "fedlora-clinic-a"
    # The preflight is under a profile: not started by `up`.
    assert set(config["services"]) == {"supernode", "clientapp"}
    node, app = config["services"]["supernode"], config["services"]["clientapp"]
    for svc in (node, app):
        assert svc["read_only"] is True and "no-new-privileges:true" in svc["security_opt"] and svc["cap_drop"] == ["ALL"]
        assert int(svc["mem_limit"]) > 0 and svc["pids_limit"] > 0 and not svc.get("ports")
        assert "deploy" not in svc and "cuda" not in svc["image"]
    # The SuperNode: Flower only, the key, the network; no images.
    assert node["networks"] == {"node": None} and node["image"].endswith("/superlink:0.1.0")
    assert {s["source"] for s in node["secrets"]} == {"ca.pem", "node.key", "superexec.secret"}
    assert [v["target"] for v in node["volumes"]] == ["/relay"]
    assert config["secrets"]["node.key"]["file"].endswith("certs/nodes/clinic-a.key")
    assert config["secrets"]["superexec.secret"]["file"].endswith("certs/nodes/clinic-a.superexec.secret")
    assert node["command"] == ["supernode.sh"] and node["environment"]["SUPERLINK_ADDRESS"] == "fl.example.org:8000"
    # The run's code: no network, no key; the images read-only, the relay volume shared with the SuperNode.
    assert app["network_mode"] == "none" and not app.get("networks") and not app.get("extra_hosts")
    assert [s["source"] for s in app["secrets"]] == ["superexec.secret"] and app["init"] is True
    data = next(v for v in app["volumes"] if v["target"] == "/data")
    assert data["read_only"] is True and data["source"] == JOIN_ENV["ORG_DATA_DIR"]
    assert next(v for v in app["volumes"] if v["target"] == "/relay") == node["volumes"][0]
    assert app["command"] == ["clientapp.sh"] and app["environment"]["HF_HUB_OFFLINE"] == "1"
    assert app["healthcheck"]["test"][-1] == "127.0.0.1:9200" and app["environment"]["METRICS_PORT"] == "9200"
    assert app["depends_on"]["supernode"]["condition"] == "service_healthy"
    assert node["environment"]["REQUIRE_SECAGG"] == "true"  # docs/node-guard.md: on by default in the join kit


def test_join_preflight_sees_what_the_node_sees():
    services = join_config("docker/join/compose.yaml", profile="preflight")["services"]
    node, app, check = services["supernode"], services["clientapp"], services["preflight"]
    for key in ("image", "read_only", "cap_drop", "security_opt", "mem_limit", "pids_limit"):
        assert check[key] == app[key], key
    for key in ("secrets", "networks", "extra_hosts"):  # the SuperNode's view of the federation
        assert check[key] == node[key], key
    assert [v for v in check["volumes"] if v["target"] != "/src/app"] == app["volumes"]
    assert next(v for v in check["volumes"] if v["target"] == "/src/app")["read_only"] is True
    assert check["command"] == ["python", "/usr/local/bin/preflight.py"] and check["restart"] == "no"
    assert {k: v for k, v in check["environment"].items() if k not in ("METRICS_PORT", "PYTHONPATH")} == node["environment"]


def test_join_gpu_overlay_gives_the_clientapp_container_a_gpu_and_the_cuda_image():
    services = join_config("docker/join/compose.yaml", "docker/join/compose.gpu.yaml")["services"]
    assert "deploy" not in services["supernode"] and "cuda" not in services["supernode"]["image"]
    node = services["clientapp"]
    device = node["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"] and device["device_ids"] == ["0"]
    assert node["environment"]["NODE_GPU"] == "0" and int(node["shm_size"]) >= 2**30
    cpu_base = join_config("docker/join/compose.yaml")["services"]["clientapp"]["build"]["args"]["BASE_IMAGE"]
    assert node["image"].endswith("/app-cuda:0.1.0") and node["build"]["args"]["BASE_IMAGE"] == cpu_base
    assert node["build"]["args"]["TORCH_BUILD"] == "cuda" and node["build"]["args"]["TORCH_INDEX_URL"] == ""
    assert node["environment"]["NVIDIA_DRIVER_CAPABILITIES"] == "compute,utility"
    assert node["environment"]["FEDLORA_EXPECT_GPU"] == "1" and node["environment"]["HF_HUB_OFFLINE"] == "1"
    assert node["read_only"] is True and node["network_mode"] == "none"  # the overlay merges, it does not replace


def test_join_gpu_overlay_gives_the_node_and_its_preflight_several_gpus():
    """Docker's nvidia driver joins device_ids with commas into NVIDIA_VISIBLE_DEVICES: ["0,1"] is two GPUs."""
    services = join_config("docker/join/compose.yaml", "docker/join/compose.gpu.yaml", profile="preflight",
                           env={"NODE_GPU": "0,1"})["services"]
    for name in ("clientapp", "preflight"):
        assert services[name]["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] == ["0,1"], name
        assert services[name]["environment"]["NODE_GPU"] == "0,1", name  # what the preflight counts


# ---------------------------------------------------------------------------------------- a real SuperLink


class Relay:
    """Plain TCP relay from 127.0.0.2 to the SuperLink: dials it by an address its certificate lacks."""

    def __init__(self, target_port: int) -> None:
        self.server = socket.create_server(("127.0.0.2", 0))
        self.port, self.target = self.server.getsockname()[1], target_port
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.server.close()


@pytest.fixture(scope="module")
def link(tmp_path_factory):
    """A TLS SuperLink with node authentication; org-x's key registered, org-y's not."""
    root = tmp_path_factory.mktemp("link")
    certs = root / "certs"
    load_certs_tool().generate(certs, [])
    keys = root / "nodes"
    for org in ("org-x", "org-y"):
        node_key.create(keys, org)
        node_key.create_secret(keys, org)
    port, env = free_port(), offline_env()
    log = open(root / "superlink.log", "wb")
    proc = subprocess.Popen([
        str(BIN / "flower-superlink"), "--port", str(port), "--ssl-ca-certfile", str(certs / "ca.pem"),
        "--ssl-certfile", str(certs / "server.pem"), "--ssl-keyfile", str(certs / "server.key"),
        "--enable-supernode-auth", "--disable-runtime-dependency-installation",
    ], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, (root / "superlink.log").read_text()
                time.sleep(0.3)
        flwr_home = root / "flwr-home"
        flwr_home.mkdir()
        (flwr_home / "config.toml").write_text(
            f'[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = "127.0.0.1:{port}"\n'
            f'root-certificates = "{certs / "ca.pem"}"\ninsecure = false\n')
        registered = subprocess.run([str(BIN / "flwr"), "supernode", "register", str(keys / "org-x.pub"), "local",
                                     "--name", "org-x"], env=env | {"FLWR_HOME": str(flwr_home)},
                                    capture_output=True, text=True, timeout=60)
        assert registered.returncode == 0, registered.stdout + registered.stderr
        yield type("Link", (), dict(root=root, certs=certs, keys=keys, port=port, env=env, proc=proc,
                                    log=lambda self: (root / "superlink.log").read_text(errors="replace")))()
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def node_settings(link, org: str, **overrides) -> preflight.Settings:
    base = dict(address=f"127.0.0.1:{link.port}", org=org, key=link.keys / f"{org}.key", ca=link.certs / "ca.pem",
                data_dir=link.root / "no-data", default_caption=None, expect_gpu=False)
    return preflight.Settings(**(base | overrides))


@pytest.mark.federation
def test_registered_key_is_ready_to_join(link, tmp_path):
    data = write_demo_data(tmp_path, orgs=1, images_per_org=4)[0]
    env = link.env | {"SUPERLINK_ADDRESS": f"127.0.0.1:{link.port}", "ORG": "org-x", "NODE_KEY": str(link.keys / "org-x.key"),
                      "CA_CERT": str(link.certs / "ca.pem"), "DATA_DIR": str(data), "PYTHONPATH": str(REPO),
                      "SUPEREXEC_SECRET": str(link.keys / "org-x.superexec.secret")}
    result = subprocess.run([str(BIN / "python"), str(REPO / "docker" / "preflight.py")], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert [line.split()[1] for line in lines[:-1]] == [
        "org", "address", "reachable", "tls", "health", "clock", "key", "registration", "secret", "data"]
    assert all(line.startswith(("ok", "warn")) for line in lines[:-1]), result.stdout
    assert lines[-1] == "preflight: ready to join as org-x"
    # The probe activated nothing: the node is still only registered.
    assert "Activated node_id" not in link.log()


@pytest.mark.federation
def test_unregistered_key_fails_with_the_fix(link):
    results = verdicts(preflight.run_checks(node_settings(link, "org-y"), {"data"}))
    status, detail = results["registration"]
    assert status == "FAILED" and "not registered" in detail
    assert "certs/nodes/org-y.pub" in detail and "make register-org ORG=org-y KEY=org-y.pub" in detail
    assert results["tls"][0] == results["health"][0] == results["key"][0] == "ok"


@pytest.mark.federation
def test_another_federations_ca_does_not_chain(link, tmp_path):
    load_certs_tool().generate(tmp_path, [])
    status, detail = verdicts(preflight.run_checks(node_settings(link, "org-x", ca=tmp_path / "ca.pem"), {"data"}))["tls"]
    assert status == "FAILED" and "does not chain" in detail and "get the current ca.pem" in detail


@pytest.mark.federation
def test_name_not_in_the_certificate_says_which_names_are(link):
    relay = Relay(link.port)
    try:
        results = verdicts(preflight.run_checks(node_settings(link, "org-x", address=f"127.0.0.2:{relay.port}"), {"data"}))
    finally:
        relay.close()
    assert results["reachable"][0] == "ok"
    status, detail = results["tls"]
    assert status == "FAILED" and "does not cover '127.0.0.2'" in detail and "does not chain" not in detail
    assert "it covers: superlink, gateway, localhost, 127.0.0.1" in detail and "make certs" in detail


@pytest.mark.federation
def test_nothing_listening_is_unreachable(link):
    status, detail = verdicts(preflight.run_checks(node_settings(link, "org-x", address=f"127.0.0.1:{free_port()}"),
                                                   {"data"}))["reachable"]
    assert status == "FAILED" and "Connection refused" in detail and "firewall" in detail


def supernode_sh(link, org: str, tmp_path: Path) -> subprocess.Popen:
    # docker/ first on PATH, as the image has its scripts (supernode.sh starts supernode.py by name).
    env = link.env | {"PATH": f"{REPO / 'docker'}{os.pathsep}{link.env['PATH']}",
                      "SUPERLINK_ADDRESS": f"127.0.0.1:{link.port}", "ORG": org, "NODE_KEY": str(link.keys / f"{org}.key"),
                      "CA_CERT": str(link.certs / "ca.pem"), "DATA_DIR": str(tmp_path), "PYTHONPATH": str(REPO),
                      "SUPEREXEC_SECRET": str(link.keys / f"{org}.superexec.secret")}
    return subprocess.Popen([str(REPO / "docker" / "supernode.sh"), "--port", str(free_port())], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.federation
def test_unregistered_supernode_exits_305_and_names_the_fix(link, tmp_path):
    proc = supernode_sh(link, "org-y", tmp_path)
    out, _ = proc.communicate(timeout=90)
    # Flower logs its code 305; the process itself exits 1 (flwr_exit: every error code exits 1).
    assert proc.returncode == 1 and "Exit Code: 305" in out and "Failed to activate SuperNode" in out, out
    assert "is not registered" in out and "make register-org ORG=org-y KEY=org-y.pub" in out
    assert "FAILED registration  this organisation's node key" in out  # the preflight's precise verdict


@pytest.mark.federation
def test_sigterm_reaches_flower_supernode_which_deactivates_at_once(link, tmp_path):
    proc = supernode_sh(link, "org-x", tmp_path)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        # The node's own "SuperNode ID" line, not the SuperLink's "Activated": between the two the
        # node is still inside Flower's activation, and a signal there leaves it registered as
        # connected until the heartbeat window ends (Flower's; the next test's node would be refused).
        deadline = time.monotonic() + 60
        while not any("SuperNode ID" in line for line in lines):
            assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    reader.join(timeout=10)
    assert proc.returncode == 0, "".join(lines)
    assert "Deactivated node_id" in link.log()


@pytest.mark.federation
def test_node_log_reaches_the_container_log_as_it_is_written(link, tmp_path):
    """The filter that notes Flower's exit code must not hold lines back: operators (and the fault
    tests) read a running node's log live, e.g. to see which message it is working on."""
    proc = supernode_sh(link, "org-x", tmp_path)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    try:
        deadline = time.monotonic() + 60
        while "Activated node_id" not in link.log():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.5)
        deadline = time.monotonic() + 10
        while not any("SuperNode ID" in line for line in lines):
            assert time.monotonic() < deadline, f"the node is connected, but its log shows only {lines}"
            time.sleep(0.2)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
