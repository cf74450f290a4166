"""Alerts reach someone: on the real stack, a demo organisation's SuperNode stopped makes Prometheus'
FedloraNodeOffline alert arrive, through Alertmanager, at a webhook receiver; the node started again
makes its resolution arrive.

The receiver is a tiny HTTP server in a container on the stack's `coordinator` network (the stack's
own superlink image, which has Python), where the Alertmanager container reaches it. Alertmanager is
recreated with the receiver's URL and short grouping intervals, given as the .env settings a user
sets (ALERT_WEBHOOK_URL, ALERT_GROUP_WAIT, ...), and restored afterwards. The rule keeps its own
`for: 1m`: the test waits for what arrives, never a fixed time.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time

import pytest

from federation import REPO
from stack import compose, superlink_image

pytestmark = pytest.mark.docker

RECEIVER = "alert-receiver"
# One line of JSON per notification on stdout: what Alertmanager posted.
RECEIVER_SCRIPT = """
import http.server, json, sys
class Receiver(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        print(json.dumps(json.loads(body)), flush=True)
        self.send_response(200)
        self.end_headers()
    def log_message(self, *args):
        pass
http.server.HTTPServer(("0.0.0.0", 8080), Receiver).serve_forever()
"""
# Alertmanager's grouping, shortened through the settings a user would change.
FAST_ALERTS = {"ALERT_WEBHOOK_URL": f"http://{RECEIVER}:8080/", "ALERT_GROUP_WAIT": "1s",
               "ALERT_GROUP_INTERVAL": "2s", "ALERT_REPEAT_INTERVAL": "1h"}
ORG = "org-3"
# Its SuperNode container: the one that holds the connection, whose loss the SuperLink reports.
NODE = f"{ORG}-supernode"


def alertmanager_with(stack, env: dict) -> None:
    """Recreate the stack's Alertmanager with these .env settings on top of the stack's own."""
    result = subprocess.run(["docker", "compose", "up", "-d", "--wait", "alertmanager"], cwd=REPO,
                            env=stack["env"] | env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr


@pytest.fixture
def receiver(stack):
    project = stack["env"]["COMPOSE_PROJECT_NAME"]
    name = f"{project}-{RECEIVER}"
    subprocess.run(["docker", "rm", "-f", name], capture_output=True)
    started = subprocess.run(
        ["docker", "run", "-d", "--name", name, "--network", f"{project}_coordinator", "--network-alias", RECEIVER,
         "--read-only", "--cap-drop", "ALL", "--security-opt", "no-new-privileges:true", "--user", "10001:10001",
         "--entrypoint", "python", superlink_image(), "-u", "-c", RECEIVER_SCRIPT],
        capture_output=True, text=True, timeout=120)
    assert started.returncode == 0, started.stderr
    try:
        yield name
    finally:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True)


def notifications(name: str) -> list[dict]:
    logs = subprocess.run(["docker", "logs", name], capture_output=True, text=True, timeout=60)
    return [json.loads(line) for line in logs.stdout.splitlines() if line.startswith("{")]


def wait_for(name: str, status: str, timeout: float) -> dict:
    """The first notification of FedloraNodeOffline for ORG with this status ("firing", "resolved")."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for note in notifications(name):
            for alert in note["alerts"]:
                labels = alert["labels"]
                if labels.get("alertname") == "FedloraNodeOffline" and labels.get("org") == ORG \
                        and alert["status"] == status:
                    return alert
        time.sleep(2)
    pytest.fail(f"no {status} FedloraNodeOffline for {ORG} reached the webhook within {timeout:.0f} s; "
                f"it received: {notifications(name)}")


def start_node(stack) -> None:
    """`docker start` the stopped SuperNode: unlike `docker compose start`, it does not first re-check the
    SuperLink's health, which a loaded machine can miss for a moment without the node caring."""
    container = compose(stack, "ps", "-aq", NODE).stdout.strip()
    assert container, f"no container for {ORG}"
    started = subprocess.run(["docker", "start", container], capture_output=True, text=True, timeout=120)
    assert started.returncode == 0, started.stderr


def test_a_stopped_node_alerts_the_webhook_and_its_return_resolves_it(stack, receiver):
    started = time.monotonic()
    alertmanager_with(stack, FAST_ALERTS)
    try:
        assert compose(stack, "stop", NODE).returncode == 0
        stopped = time.monotonic()
        firing = wait_for(receiver, "firing", timeout=300)
        fired = time.monotonic()
        assert firing["annotations"]["summary"] == f"Organisation {ORG}: node offline"
        assert "make join-logs" in firing["annotations"]["description"]

        start_node(stack)
        wait_for(receiver, "resolved", timeout=300)  # fedlora_node_up{org} is 1 again: the node is back
        print(f"firing {fired - stopped:.0f} s after the node stopped; resolved {time.monotonic() - fired:.0f} s "
              f"after it was started again; {time.monotonic() - started:.0f} s in all")
    finally:
        start_node(stack)
        alertmanager_with(stack, {})


def alertmanager_image() -> str:
    shipped = re.search(r"^ALERTMANAGER_IMAGE=(.+)$", (REPO / ".env").read_text(), re.M).group(1)
    return os.environ.get("ALERTMANAGER_IMAGE") or shipped


@pytest.mark.parametrize(("settings", "receivers"), [
    ({}, []),
    ({"ALERT_WEBHOOK_URL": "https://hooks.example.org/fedlora"}, ["webhook_configs"]),
    ({"ALERT_EMAIL_TO": "ops@example.org", "ALERT_EMAIL_FROM": "fedlora@example.org",
      "ALERT_SMTP_SMARTHOST": "mail.example.org:587"}, ["email_configs"]),
], ids=["none", "webhook", "e-mail"])
def test_alertmanager_accepts_the_configuration_it_writes_from_env(settings, receivers):
    """docker/alertmanager/start.sh in the stack's Alertmanager image: amtool accepts what it writes, with
    the receivers .env asks for, and it says so when there is none."""
    image = alertmanager_image()
    if subprocess.run(["docker", "image", "inspect", image], capture_output=True).returncode:
        pytest.skip(f"no {image} here (make local-images builds a stand-in)")
    env = {"ALERT_GROUP_WAIT": "30s", "ALERT_GROUP_INTERVAL": "5m", "ALERT_REPEAT_INTERVAL": "4h", **settings}
    check = 'sh -c "$(sed \'s/^exec alertmanager .*/cat "$conf"; exec amtool check-config "$conf"/\' /start.sh)"'
    result = subprocess.run(
        ["docker", "run", "--rm", "--network", "none", "--read-only", "--tmpfs", "/tmp",
         "-v", f"{REPO / 'docker/alertmanager/start.sh'}:/start.sh:ro", *[a for k, v in env.items() for a in ("-e", f"{k}={v}")],
         "--entrypoint", "sh", image, "-c", check], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "SUCCESS" in result.stdout, result.stdout + result.stderr
    assert [r for r in ("webhook_configs", "email_configs") if r in result.stdout] == receivers
    assert ("no receiver configured" in result.stderr) == (not receivers)


def test_alertmanager_refuses_a_setting_that_would_break_its_configuration():
    image = alertmanager_image()
    if subprocess.run(["docker", "image", "inspect", image], capture_output=True).returncode:
        pytest.skip(f"no {image} here (make local-images builds a stand-in)")
    result = subprocess.run(
        ["docker", "run", "--rm", "--network", "none", "--read-only", "--tmpfs", "/tmp",
         "-v", f"{REPO / 'docker/alertmanager/start.sh'}:/start.sh:ro", "-e", 'ALERT_WEBHOOK_URL=http://x/"', "-e",
         "ALERT_GROUP_WAIT=30s", "-e", "ALERT_GROUP_INTERVAL=5m", "-e", "ALERT_REPEAT_INTERVAL=4h",
         "--entrypoint", "sh", image, "/start.sh"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "ALERT_WEBHOOK_URL holds a quote" in result.stderr, result.stderr
