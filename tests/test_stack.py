"""The Compose stack end to end on a real Docker engine, as a user runs it.

`make certs build up`, then the literal `flwr run . remote-federation` over TLS with SecAgg+ on
the tiny model and three organisations; then what the user gets is checked, a fourth
organisation joins from its own Compose project through the join kit, and the stack is torn
down. Images build from $BASE_IMAGE (CI: the local Debian stand-ins, see .ci/run).
"""

from __future__ import annotations

import http.client
import json
import re
import ssl
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from app.offline import write_demo_data
from conftest import ORGS
from federation import BIN, REPO, kv
from stack import JOIN_HOST, compose, flwr

pytestmark = pytest.mark.docker
ROUNDS, STEPS = 2, 8
# Windows derived from what sets them: Prometheus' scrape interval (docker/prometheus/prometheus.yml),
# and Flower's heartbeat window (a silent node is offline after HEARTBEAT_PATIENCE missed intervals).
SCRAPE_SECONDS = float(re.search(r"scrape_interval: (\d+)s", (REPO / "docker/prometheus/prometheus.yml").read_text())[1])
SCRAPE_WINDOW = 6 * SCRAPE_SECONDS  # a change is in Prometheus after a scrape or two, on a loaded machine


def heartbeat_window() -> float:
    from flwr.common.constant import HEARTBEAT_DEFAULT_INTERVAL, HEARTBEAT_PATIENCE

    return HEARTBEAT_PATIENCE * HEARTBEAT_DEFAULT_INTERVAL


def wait_until(condition, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f} s waiting for {what}"
        time.sleep(1)
# Each organisation's node is a pair (docs/isolation.md): the SuperNode, then the run's code.
NODES = [f"{org}-{part}" for org in ORGS for part in ("supernode", "clientapp")]


@pytest.fixture(scope="module")
def run(stack):
    config = {"base-model": "/models/tiny-sd", "resolution": 32, "num-server-rounds": ROUNDS, "local-steps": STEPS,
              "learning-rate": 1e-3, "heldout-fraction": 0.25, "sample-steps": 2, "output-dir": "/outputs/e2e"}
    # The literal command a user types, from the repository root, with the connection `make up` wrote.
    result = subprocess.run([str(BIN / "flwr"), "run", ".", "remote-federation", "--stream", "--run-config", kv(config)],
                            cwd=REPO, env=stack["env"], capture_output=True, text=True, timeout=1200)
    print(result.stdout[-6000:], result.stderr[-3000:])
    assert result.returncode == 0
    # `flwr run --stream` exits 0 even when the ServerApp failed: ask how the run ended.
    status = subprocess.run(["python3", "docker/run_status.py", str(BIN / "flwr"), "remote-federation"], cwd=REPO,
                            env=stack["env"], capture_output=True, text=True)
    assert status.returncode == 0, status.stdout + status.stderr
    # State, not a fixed sleep: Prometheus holds the run's last round, and has scraped every target
    # since the run ended (so each node's last counters are in too).
    ended = time.time()

    def scraped() -> bool:
        done = promql(stack, "max(fedlora_rounds_completed_total)")
        since = promql(stack, "min(timestamp(up))")
        return bool(done and since) and float(done[0]["value"][1]) >= ROUNDS and float(since[0]["value"][1]) > ended

    wait_until(scraped, f"Prometheus to show round {ROUNDS} and a scrape of every target after the run", 4 * SCRAPE_WINDOW)
    return stack["root"] / "outputs" / "e2e"


def test_every_service_is_healthy(stack):
    ps = subprocess.run(["docker", "compose", "ps", "--format", "json"], cwd=REPO, env=stack["env"],
                        capture_output=True, text=True, check=True).stdout
    services = [json.loads(line) for line in ps.splitlines() if line.strip()]
    assert {s["Service"]: s["Health"] for s in services} == {
        n: "healthy" for n in ("superlink", "gateway", "serverapp", *NODES, "prometheus", "alertmanager")}


def test_run_completed_every_round_with_all_organisations(run):
    rounds = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    for r in rounds[1:]:
        assert r["aggregation"] == "secagg+" and r["aggregated"] == list(ORGS)
    assert all(r["heldout_loss"] is not None for r in rounds)


def test_outputs_hold_a_final_adapter_that_loads_in_diffusers(run, tiny_model):
    import torch
    from diffusers import StableDiffusionPipeline

    assert (run / "final" / "pytorch_lora_weights.safetensors").is_file()
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model, local_files_only=True)
    prompt = dict(prompt="a red circle", height=32, width=32, num_inference_steps=3, output_type="np")
    base = pipe(**prompt, generator=torch.Generator().manual_seed(0)).images[0]
    pipe.load_lora_weights(run / "final")
    assert np.abs(pipe(**prompt, generator=torch.Generator().manual_seed(0)).images[0] - base).max() > 1e-3


def https(stack, port: int, method: str, path: str) -> tuple[int, str]:
    ca = ssl.create_default_context(cafile=str(stack["root"] / "certs" / "ca.pem"))
    conn = http.client.HTTPSConnection("localhost", port, context=ca, timeout=10)
    conn.request(method, path, body=b"" if method == "POST" else None,
                 headers={"content-type": "application/protobuf"} if method == "POST" else {})
    response = conn.getresponse()
    return response.status, response.read().decode(errors="replace")


# What only the operator may do, and Flower's API docs that map it out.
CLOSED = [("POST", "/v1/control/list-runs"), ("POST", "/v1/control/start-run"), ("POST", "/v1/control/register-node"),
          ("POST", "/v1/runtime/get-nodes"), ("GET", "/docs"), ("GET", "/openapi.json")]


def test_public_listener_serves_the_fleet_api_and_refuses_control_and_runtime(stack):
    assert https(stack, stack["port"], "GET", "/health")[0] == 200
    # A Fleet call without a registered node's signature reaches Flower, which refuses it itself.
    assert https(stack, stack["port"], "POST", "/v1/fleet/get-run")[0] not in (403, 404)
    for method, path in CLOSED:
        status, body = https(stack, stack["port"], method, path)
        assert status == 403 and "coordinator's operator" in body, (path, status, body)
    # The operator's listener, on this host's loopback, is the SuperLink itself.
    assert https(stack, stack["control"], "POST", "/v1/control/list-runs")[0] == 200


def test_an_organisations_container_reaches_the_fleet_api_only(stack):
    probe = """
import http.client, socket, ssl, sys
ca = ssl.create_default_context(cafile="/run/fedlora/ca.pem")
def status(method, path):
    conn = http.client.HTTPSConnection("gateway", 8443, context=ca, timeout=10)
    conn.request(method, path, body=b"" if method == "POST" else None)
    return conn.getresponse().status
print("health", status("GET", "/health"))
for method, path in %r:
    print(path, status(method, path))
try:
    socket.create_connection(("superlink", 8000), timeout=5)
    print("superlink reachable")
except OSError as err:
    print("superlink unreachable:", err)
""" % (CLOSED,)
    result = compose(stack, "exec", "-T", "org-1-supernode", "python", "-c", probe)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "health 200"
    assert lines[1:-1] == [f"{path} 403" for _, path in CLOSED]
    assert lines[-1].startswith("superlink unreachable"), lines[-1]


def test_superlink_speaks_only_tls(stack):
    for port in (stack["port"], stack["control"]):
        plain = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        with pytest.raises((http.client.HTTPException, ConnectionError, OSError)):
            plain.request("GET", "/health")
            response = plain.getresponse()
            pytest.fail(f"plaintext request on port {port} answered with HTTP {response.status}")
    insecure = Path(stack["env"]["FLWR_HOME"]) / "insecure"
    insecure.mkdir(exist_ok=True)
    (insecure / "config.toml").write_text(f'[superlink.plain]\naddress = "127.0.0.1:{stack["control"]}"\ninsecure = true\n')
    result = subprocess.run([str(BIN / "flwr"), "ls", "plain"], cwd=REPO, env=stack["env"] | {"FLWR_HOME": str(insecure)},
                            capture_output=True, text=True, timeout=120)
    # Refused as unreachable (what Flower 1.41's CLI says to a plaintext client at a TLS port), while
    # the same address over the documented TLS connection answers: not merely any non-zero exit.
    assert result.returncode == 1 and "Connection to the SuperLink is unavailable" in result.stderr, \
        result.stdout + result.stderr
    tls = flwr(stack, "ls", "remote-federation")
    assert tls.returncode == 0 and f"127.0.0.1:{stack['control']}" in tls.stdout, tls.stdout + tls.stderr


def test_operator_lists_reads_and_stops_runs_through_the_documented_connection(stack, run):
    runs = json.loads(flwr(stack, "ls", "remote-federation", "--format", "json").stdout)["runs"]
    done = next(r for r in runs if r["status"] == "finished:completed")
    log = flwr(stack, "log", str(done["run-id"]), "remote-federation", "--show")
    assert "final adapter" in log.stdout + log.stderr, log.stdout[-2000:] + log.stderr[-2000:]

    started = flwr(stack, "run", ".", "remote-federation", "--format", "json", "--run-config",
                   kv({"base-model": "/models/tiny-sd", "resolution": 32, "output-dir": "/outputs/stopped"}))
    run_id = str(json.loads(started.stdout)["run-id"])
    stopped = flwr(stack, "stop", run_id, "remote-federation")
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    status = {str(r["run-id"]): r["status"] for r in
              json.loads(flwr(stack, "ls", "remote-federation", "--format", "json").stdout)["runs"]}
    assert status[run_id] == "finished:stopped"


# --- Monitoring: a real Prometheus scraped every node during the run ---------------------------

def promql(stack, query: str, at: float | None = None) -> list[dict]:
    params = {"query": query} | ({"time": str(at)} if at else {})
    url = f"{stack['prometheus']}/api/v1/query?{urllib.parse.urlencode(params)}"
    with urllib.request.urlopen(url, timeout=30) as response:
        body = json.load(response)
    assert body["status"] == "success", body
    return body["data"]["result"]


# Panels that show data only on GPU hosts or while something is wrong.
NO_DATA_EXPECTED = ("DCGM_", "ALERTS{alertname=~\"Fedlora.*\"}", "accelerator_memory")


FALLBACK = re.compile(r"\s+or\s+vector\(0\)\s*$")


def test_every_dashboard_query_has_data_for_every_organisation(stack, run):
    from test_dashboards import dashboard_queries

    # The control: a query ending in `or vector(0)` has data even for a metric nobody exports, so
    # such queries are checked without the fallback as well.
    assert promql(stack, "fedlora_no_such_metric or vector(0)") and not promql(stack, "fedlora_no_such_metric")
    checked = fallbacks = 0
    for uid, title, expr in dashboard_queries():
        if any(marker in expr for marker in NO_DATA_EXPECTED):
            continue
        # Grafana's interval variables: wide enough to cover the whole (short) run.
        expr = expr.replace("$__rate_interval", "10m").replace("$__interval", "1m").replace("[5m]", "[10m]")
        for org in ORGS if "$org" in expr else [None]:
            # Firing alerts: none fire in a healthy stack, so the fallback's 0 is the answer here;
            # tests/test_alerts.py shows an alert firing and reaching a receiver.
            bare = [] if "ALERTS{" in expr else [FALLBACK.sub("", expr)]
            for query in {expr, *bare}:
                result = promql(stack, query.replace("$org", org or ""))
                assert result, f"{uid} / {title}: no data for {org or 'the federation'}: {query}"
                if re.match(r"\w+ by \(org\)", query):  # one series per organisation
                    assert {r["metric"].get("org") for r in result} >= set(ORGS), f"{uid} / {title}: {result}"
                checked += 1
            fallbacks += bool(FALLBACK.search(expr))
    assert checked >= 40 and fallbacks >= 2 + len(ORGS), (checked, fallbacks)  # 2 federation-wide, 1 per org
    # The fallbacks' queries that count or show organisations up: every demo organisation is.
    assert float(promql(stack, "count(fedlora_node_up == 1)")[0]["value"][1]) == len(ORGS)
    for org in ORGS:
        assert float(promql(stack, f'max(fedlora_node_up{{org="{org}"}})')[0]["value"][1]) == 1, org


def test_every_alert_rule_evaluates_and_its_metrics_exist(stack, run):
    from test_dashboards import alert_expressions

    with urllib.request.urlopen(f"{stack['prometheus']}/api/v1/rules", timeout=30) as response:
        rules = {r["name"]: r for g in json.load(response)["data"]["groups"] for r in g["rules"]}
    for name, expr in alert_expressions():
        assert rules[name]["health"] == "ok", rules[name]
        for metric in set(re.findall(r"\bfedlora_\w+", expr)) - {"fedlora_"}:
            if metric.endswith("_loss") or "(" in metric:
                continue
            assert promql(stack, metric), f"{name} uses {metric}, which has no series"
    assert promql(stack, 'fedlora_certificate_expiry_seconds{cert="server"} > 800 * 86400')


def test_counters_only_grow_across_the_runs_short_lived_processes(stack, run):
    end = time.time()
    for org in ORGS:
        params = {"query": f'fedlora_train_steps_total{{org="{org}"}}', "start": str(end - 900), "end": str(end),
                  "step": "2"}
        with urllib.request.urlopen(f"{stack['prometheus']}/api/v1/query_range?{urllib.parse.urlencode(params)}",
                                    timeout=30) as response:
            series = json.load(response)["data"]["result"]
        values = [float(v) for _, v in series[0]["values"]]
        assert values == sorted(values), f"{org}: steps counter went down: {values}"
        assert values[-1] == ROUNDS * STEPS, f"{org}: {values[-1]} steps counted, {ROUNDS * STEPS} trained"
        assert len(set(values)) >= 2  # seen before and after at least one round's process


PROCESSES = r"""
import json, os
out = []
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        cmd = open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace").split("\0")
        uid = int(next(l for l in open(f"/proc/{pid}/status") if l.startswith("Uid:")).split()[1])
    except (OSError, StopIteration):
        continue
    out.append({"pid": int(pid), "uid": uid, "cmd": [c for c in cmd if c]})
print(json.dumps(out))
"""


def test_the_runs_code_ran_only_in_the_clientapp_container(stack, run):
    """The SuperNode container (node key, network) ran none of the run's code; the warm trainer that
    did lives in the ClientApp container, as the unprivileged user, and watches the SuperExec, so it
    ends with it (and with the container, whose processes all end with it)."""
    def processes(service: str) -> list[dict]:
        result = compose(stack, "exec", "-T", service, "python", "-c", PROCESSES)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    for org in ORGS:
        node = processes(f"{org}-supernode")
        assert not [p for p in node if any("flwr-clientapp" in c or "app.trainer" in c for c in p["cmd"])], node
        assert any(any(c.endswith("supernode.py") for c in p["cmd"]) for p in node), node
        app = processes(f"{org}-clientapp")
        superexec = next(p for p in app if any(c.endswith("flower-superexec") for c in p["cmd"][:2]))
        trainers = [p for p in app if "app.trainer" in p["cmd"]]
        assert trainers, f"{org}: no warm trainer in its ClientApp container after the run: {app}"
        for trainer in trainers:
            assert trainer["uid"] == superexec["uid"] == 10001, (trainer, superexec)
            watched = int(trainer["cmd"][trainer["cmd"].index("--watch-pid") + 1])
            assert watched == superexec["pid"], (trainer, superexec)


def test_killed_node_shows_offline_then_back_with_its_counters(stack, run):
    def node_up(org: str) -> bool:  # the SuperLink's view: 0 once heartbeats stop (Flower's heartbeat window)
        return bool(promql(stack, f'fedlora_node_up{{org="{org}"}} == 1'))

    def wait_for(condition, what: str, timeout: float = 2 * SCRAPE_WINDOW) -> None:
        wait_until(condition, what, timeout)

    steps = float(promql(stack, 'fedlora_train_steps_total{org="org-2"}')[0]["value"][1])
    assert compose(stack, "kill", "org-2-supernode", "org-2-clientapp").returncode == 0
    wait_for(lambda: promql(stack, 'fedlora_node_up{org="org-2"} == 0'), "org-2 to show as down", 
             timeout=heartbeat_window() + 2 * SCRAPE_WINDOW)
    offline = promql(stack, "max by (org) (max_over_time(fedlora_node_up[1h])) unless max by (org) (fedlora_node_up == 1)")
    assert [r["metric"]["org"] for r in offline] == ["org-2"]
    wait_for(lambda: promql(stack, 'ALERTS{alertname="FedloraNodeOffline", org="org-2"}'), "the offline alert")
    assert node_up("org-1") and node_up("org-3")

    assert compose(stack, "start", "org-2-supernode", "org-2-clientapp").returncode == 0
    wait_for(lambda: node_up("org-2"), "org-2 to be back")
    # Connected (the SuperLink's view) comes first; its own endpoint is scraped again shortly after.
    wait_for(lambda: promql(stack, 'fedlora_train_steps_total{org="org-2"}'), "org-2's own metrics to be scraped")
    # The node's metrics live on its ClientApp container's volume: a restart does not reset its counters.
    assert float(promql(stack, 'fedlora_train_steps_total{org="org-2"}')[0]["value"][1]) == steps


def test_promtool_accepts_config_rules_and_every_endpoint(stack, run):
    for check in (["check", "config", "/etc/prometheus/prometheus.yml"], ["check", "rules", "/etc/prometheus/alerts.yml"]):
        result = compose(stack, "exec", "-T", "prometheus", "promtool", *check)
        assert result.returncode == 0, result.stdout + result.stderr
    scrape = "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:9200/metrics').read().decode())"
    # An organisation's endpoint is its SuperNode container's, relayed to its ClientApp container's exporter.
    for service in ("superlink", "serverapp", *(f"{org}-supernode" for org in ORGS)):
        text = compose(stack, "exec", "-T", service, "python", "-c", scrape)
        assert text.returncode == 0 and "fedlora_" in text.stdout, (service, text.stderr)
        lint = compose(stack, "exec", "-T", "prometheus", "promtool", "check", "metrics", input=text.stdout)
        assert lint.returncode == 0, (service, lint.stdout + lint.stderr)


# --- A fourth organisation joins from its own Compose project, by the documented steps ---------

def test_an_organisation_joins_from_its_own_host_through_the_join_kit(stack, run):
    root, org = stack["root"], "org-4"
    write_demo_data(root / "data", orgs=4, images_per_org=16)  # org-4's images, on "its" host
    # Its own Compose project and network; it reaches the coordinator through this host's
    # published gateway port, as it would over the Internet.
    env = stack["env"] | {"ORG": org, "SUPERLINK_ADDRESS": f"{JOIN_HOST}:{stack['port']}",
                          "ORG_DATA_DIR": str(root / "data" / org), "FEDERATION_CA": str(root / "certs" / "ca.pem"),
                          "NODE_KEYS_DIR": str(root / "certs" / "nodes"),
                          "JOIN_PROJECT": f"{stack['env']['COMPOSE_PROJECT_NAME']}-{org}"}
    env.pop("COMPOSE_PROJECT_NAME")

    def make(*args: str) -> subprocess.CompletedProcess:
        result = subprocess.run(["make", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
        print(result.stdout[-3000:], result.stderr[-3000:])
        return result

    # 1. The organisation makes its key; 2. the coordinator registers it; 3. preflight; 4. join.
    assert make("org-key", f"ORG={org}").returncode == 0
    unregistered = make("join-check")
    assert unregistered.returncode != 0 and "make register-org ORG=org-4" in unregistered.stdout + unregistered.stderr
    assert make("register-org", f"ORG={org}", f"KEY={root / 'certs' / 'nodes' / f'{org}.pub'}").returncode == 0
    try:
        assert make("join").returncode == 0
        # Connected, in the SuperLink's view, within a scrape or two.
        wait_until(lambda: promql(stack, f'fedlora_node_up{{org="{org}"}} == 1'), f"{org} to show as up", SCRAPE_WINDOW)

        config = {"base-model": "/models/tiny-sd", "resolution": 32, "num-server-rounds": 1, "local-steps": 2,
                  "min-nodes": 4, "sample-every": 0, "output-dir": "/outputs/four"}
        # 5. The join kit runs no bundle the organisation has not approved (docs/approval.md): the
        # coordinator sees it refuse, with the hash and the command; the organisation reviews the
        # bundle its node kept, approves it, and the next run has it.
        refused = flwr(stack, "run", ".", "remote-federation", "--stream", "--run-config",
                       kv(config | {"node-wait-timeout": 20}), timeout=900)
        found = re.search(rf"{org} refused app bundle sha256:([0-9a-f]{{64}})", refused.stdout)
        assert found, refused.stdout[-4000:]
        bundle = found[1]
        assert f"make approve-bundle FAB={bundle}" in refused.stdout
        project = env.get("JOIN_PROJECT", f"fedlora-{org}")
        node = subprocess.run(["docker", "ps", "-q", "--filter", f"label=com.docker.compose.project={project}",
                               "--filter", "label=com.docker.compose.service=clientapp"], capture_output=True, text=True).stdout.split()
        node_log = subprocess.run(["docker", "logs", node[0]], capture_output=True, text=True)
        assert f"[bundle approval] {org} refused app bundle sha256:{bundle}" in node_log.stdout + node_log.stderr
        review = make("review-bundle", f"FAB={bundle}")
        assert review.returncode == 0 and f"sha256   {bundle}" in review.stdout and "app/client_app.py" in review.stdout
        assert make("approve-bundle", f"FAB={bundle}").returncode == 0
        result = flwr(stack, "run", ".", "remote-federation", "--stream", "--run-config", kv(config), timeout=900)
        assert "finished:completed" in subprocess.run(
            ["python3", "docker/run_status.py", str(BIN / "flwr"), "remote-federation"], cwd=REPO, env=stack["env"],
            capture_output=True, text=True).stdout, result.stdout[-4000:]
        rounds = [json.loads(line) for line in (root / "outputs" / "four" / "metrics.jsonl").read_text().splitlines()]
        assert rounds[1]["aggregation"] == "secagg+" and rounds[1]["aggregated"] == [*ORGS, org]
        # Nobody scrapes the organisation's host: the coordinator's ServerApp reports it.
        wait_until(lambda: promql(stack, f'fedlora_org_rounds_aggregated_total{{org="{org}", role="serverapp"}} >= 1'),
                   f"the ServerApp's series for {org}", SCRAPE_WINDOW)
    finally:
        assert make("join-down").returncode == 0
    # Leaving deactivates the node at once (not after a heartbeat window): the view follows within scrapes.
    wait_until(lambda: promql(stack, f'fedlora_node_up{{org="{org}"}} == 0'), f"{org} to show as down", 2 * SCRAPE_WINDOW)
