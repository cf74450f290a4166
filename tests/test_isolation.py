"""The run's code in its own box, on the real Docker engine (docs/isolation.md).

A demo organisation's node is two containers: `org-1-supernode` (node key, network) and
`org-1-clientapp` (the run's code, the images; no key, `network_mode: none`, the SuperNode's
ClientAppIo API through a Unix-socket relay). Every probe here runs inside a container of the
shared stack as the user the run's code runs as, and each has a control that shows it can fail:
the same key search finds the node key in the SuperNode container, and the same connections that
fail from the ClientApp container succeed from the SuperNode container.

The engine on these machines runs with --iptables=false: nothing here relies on Docker's network
isolation rules, which is why it holds (and is tested) without them.
"""

from __future__ import annotations

import json
import subprocess

import pytest

from federation import REPO
from stack import compose

pytestmark = pytest.mark.docker
ORG = "org-1"
NODE, APP = f"{ORG}-supernode", f"{ORG}-clientapp"

# Every regular file a process can read under these folders, every other process's environment
# and open files: none may hold a private key or the organisation's SuperExec secret.
SCAN = r"""
import json, os, stat, sys
secret = sys.stdin.buffer.read()
found, scanned = [], 0

def look(path):
    global scanned
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # sockets, pipes: nothing stored, and reading may block
            return False
        with open(path, "rb") as f:
            data = f.read(16 * 2**20)
    except OSError:
        return False
    scanned += 1
    if b"PRIVATE KEY" in data or secret in data:
        found.append(path)
    return True

secrets = {p: look(p) for p in sorted("/run/secrets/" + n for n in os.listdir("/run/secrets"))}
for root in ("/run", "/relay", "/tmp", "/cache", "/etc", "/root", "/home", "/usr/local/bin"):
    for folder, _, files in os.walk(root):
        for name in files:
            look(os.path.join(folder, name))
superexec = None
for pid in filter(str.isdigit, os.listdir("/proc")):
    if int(pid) == os.getpid():
        continue
    try:
        cmdline = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
        uid = int(next(l for l in open(f"/proc/{pid}/status") if l.startswith("Uid:")).split()[1])
    except (OSError, StopIteration):
        continue
    if any(part.endswith(b"flower-superexec") for part in cmdline[:2]):
        superexec = {"pid": int(pid), "uid": uid}
    look(f"/proc/{pid}/environ")
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        if superexec and superexec["pid"] == int(pid):
            superexec["fds_refused"] = True
        continue
    for fd in fds:
        look(f"/proc/{pid}/fd/{fd}")
print(json.dumps({"uid": os.getuid(), "found": found, "scanned": scanned, "secrets": secrets, "superexec": superexec}))
"""

# TCP connections, by name and by address; each one's outcome.
CONNECT = r"""
import json, socket, sys
out = {}
for host, port in json.loads(sys.stdin.read()):
    try:
        socket.create_connection((host, port), timeout=3).close()
        out[f"{host}:{port}"] = "connected"
    except socket.gaierror as err:
        out[f"{host}:{port}"] = f"no such name ({err.strerror})"
    except OSError as err:
        out[f"{host}:{port}"] = f"{type(err).__name__} ({err.strerror or err})"
print(json.dumps(out))
"""

# The SuperNode's ClientAppIo API through the relay, with Flower's own client, as the SuperExec
# calls it: AcquireTask (which hands out a task's token, and with it the run's Context) must be
# signed with the organisation's secret.
APPIO = r"""
import json, sys, urllib.request
import httpx
from flwr.proto.runtime_pb2 import AcquireTaskRequest
from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor, SuperExecAuthHttpInterceptor
from flwr.supercore.runtime import RuntimeHttpClient

secret = sys.stdin.buffer.read()
out = {}
with urllib.request.urlopen("http://127.0.0.1:9094/health", timeout=5) as response:
    out["health"] = response.status
for name, key in (("signed", secret), ("wrong secret", b"x" * 64), ("unsigned", None)):
    interceptors = [RuntimeVersionHttpInterceptor(component_name="SuperExec")]
    if key:
        interceptors.append(SuperExecAuthHttpInterceptor(master_secret=key,
                                                          protected_methods={"/flwr.proto.Runtime/AcquireTask"}))
    client = RuntimeHttpClient.from_server_address("127.0.0.1:9094", insecure=True, root_certificates=None,
                                                   interceptors=interceptors)
    try:
        # No task type: even while a run is going, this takes none of its tasks.
        client.AcquireTask(AcquireTaskRequest())
        out[name] = 200
    except httpx.HTTPStatusError as err:
        out[name] = err.response.status_code
    finally:
        client.close()
print(json.dumps(out))
"""


def probe(stack, service: str, code: str, stdin: bytes = b"") -> dict:
    """Run `code` in `service` as uid 10001, the user the run's code runs as (checked below)."""
    result = subprocess.run(["docker", "compose", "exec", "-T", "--user", "10001:10001", service, "python", "-c", code],
                            cwd=REPO, env=stack["env"], input=stdin, capture_output=True, timeout=120)
    assert result.returncode == 0, result.stderr.decode(errors="replace")[-3000:]
    return json.loads(result.stdout.decode().splitlines()[-1])


def org_secret(stack) -> bytes:
    return (stack["root"] / "certs" / "nodes" / f"{ORG}.superexec.secret").read_bytes()


def container(stack, service: str) -> dict:
    cid = compose(stack, "ps", "-q", service).stdout.strip()
    assert cid, f"{service} is not running"
    return json.loads(subprocess.run(["docker", "inspect", cid], capture_output=True, text=True, check=True).stdout)[0]


def test_no_private_key_or_secret_is_readable_by_the_runs_code(stack):
    secret = org_secret(stack)
    app = probe(stack, APP, SCAN, secret)
    # The probe's user is the one the SuperExec, and so every ClientApp and trainer, runs as.
    assert app["superexec"] and app["superexec"]["uid"] == app["uid"] == 10001, app
    assert app["found"] == [] and app["scanned"] > 100, app
    # The org's SuperExec secret is in /run/secrets, and unreadable; so is the SuperExec's memory.
    assert app["secrets"] == {"/run/secrets/superexec.secret": False}, app["secrets"]
    assert app["superexec"].get("fds_refused"), "the SuperExec's open files (its secret) are readable"

    # Control: the same search in the SuperNode container finds the node key it needs.
    node = probe(stack, NODE, SCAN, secret)
    assert "/run/fedlora/node.key" in node["found"] and "/run/fedlora/superexec.secret" in node["found"], node


def test_the_clientapp_container_reaches_nothing_but_its_supernode(stack):
    gateway, superlink = container(stack, "gateway"), container(stack, "superlink")
    ips = lambda c: sorted(n["IPAddress"] for n in c["NetworkSettings"]["Networks"].values() if n["IPAddress"])
    # The host, as containers see it: the gateway address of every network of the stack.
    networks = {*gateway["NetworkSettings"]["Networks"], *superlink["NetworkSettings"]["Networks"]}
    host_ips = sorted({cfg["Gateway"] for name in networks for cfg in json.loads(subprocess.run(
        ["docker", "network", "inspect", name], capture_output=True, text=True, check=True).stdout)[0]["IPAM"]["Config"]
        if cfg.get("Gateway")})
    assert ips(gateway) and ips(superlink) and host_ips
    by_name = [("gateway", 8443), ("superlink", 8000), ("host.docker.internal", stack["port"]), ("silos", 9200)]
    by_ip = ([(ip, 8443) for ip in ips(gateway)] + [(ip, 8000) for ip in ips(superlink)]
             + [(ip, port) for ip in host_ips for port in (stack["port"], stack["control"])])
    # This host's published ports on the container's own loopback would mean it shares the host's network.
    loopback = [("127.0.0.1", stack["port"]), ("127.0.0.1", stack["control"])]

    seen = probe(stack, APP, CONNECT, json.dumps(by_name + by_ip + loopback).encode())
    for host, port in by_name:
        assert seen[f"{host}:{port}"].startswith("no such name"), (host, seen)
    for host, port in by_ip:
        assert "Network is unreachable" in seen[f"{host}:{port}"], (host, seen)
    for host, port in loopback:
        assert "Connection refused" in seen[f"{host}:{port}"], (host, seen)

    # Control: the same gateway, by name and address, from the organisation's SuperNode container.
    fleet_ip = gateway["NetworkSettings"]["Networks"][f"{stack['env']['COMPOSE_PROJECT_NAME']}_fleet"]["IPAddress"]
    other = "org-2-supernode"
    seen = probe(stack, NODE, CONNECT, json.dumps([("gateway", 8443), (fleet_ip, 8443), (other, 9094)]).encode())
    assert seen["gateway:8443"] == seen[f"{fleet_ip}:8443"] == "connected", seen
    # Another SuperNode's ClientAppIo API listens on its own loopback only: nobody else reaches it.
    assert "Connection refused" in seen[f"{other}:9094"], seen

    # Positive control, the one way out: the SuperNode's ClientAppIo API through the relay, which
    # answers only requests signed with the organisation's secret.
    api = probe(stack, APP, APPIO, org_secret(stack))
    assert api == {"health": 200, "signed": 200, "wrong secret": 401, "unsigned": 401}, api
