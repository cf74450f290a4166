"""Renewing the server certificate on the running stack (`make certs`, then `make rotate-certs`): both
listeners that serve it, the gateway (organisations) and the SuperLink (the operator), serve the new
one, the nodes reconnect and train through it, and the expiry metric reports what is served.

Runs on the shared stack (conftest.stack) and leaves it working, with the renewed certificate.
"""

from __future__ import annotations

import json
import ssl
import subprocess
import time

import pytest
from cryptography import x509

from conftest import ORGS
from federation import BIN, REPO, kv
from stack import JOIN_HOST, compose
from test_stack import SCRAPE_WINDOW, promql, wait_until

pytestmark = pytest.mark.docker


def served(port: int) -> x509.Certificate:
    """The certificate the listener on this host's `port` presents (read, not trusted)."""
    return x509.load_pem_x509_certificate(ssl.get_server_certificate(("127.0.0.1", port), timeout=10).encode())


def make(stack, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run(["make", *args], cwd=REPO, env=stack["env"], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"make {' '.join(args)}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def metric_expiry(stack, cert: str) -> float | None:
    """The expiry date the exporter's newest sample stands for: seconds left + when it was taken."""
    series = f'fedlora_certificate_expiry_seconds{{cert="{cert}"}}'
    result = promql(stack, f"{series} + timestamp({series})")
    return float(result[0]["value"][1]) if result else None


def test_a_renewed_certificate_is_served_by_the_gateway_and_the_superlink_after_rotate_certs(stack):
    gateway, superlink = stack["port"], stack["control"]
    path = stack["root"] / "certs" / "server.pem"
    old = x509.load_pem_x509_certificate(path.read_bytes())
    assert served(gateway).serial_number == served(superlink).serial_number == old.serial_number

    # 1. Renew. `make certs` re-issues the certificate when it has 30 days or fewer left, or when a
    # requested name is missing: the latter here (the full list, so the joining kit's name stays).
    stack["env"]["SANS"] = f"{JOIN_HOST} rotated.example"
    make(stack, "certs")
    new = x509.load_pem_x509_certificate(path.read_bytes())
    assert new.serial_number != old.serial_number
    # The metric can tell the two apart only if their expiry dates differ by more than its precision.
    gap = (new.not_valid_after_utc - old.not_valid_after_utc).total_seconds()
    assert gap > 30, gap

    # 2. The broken variant: restarting only the SuperLink (what certs/README.md said) leaves the
    # gateway, which organisations reach, serving the old certificate, and the metric says so.
    assert compose(stack, "restart", "superlink").returncode == 0
    assert compose(stack, "up", "-d", "--wait", "--no-deps", "--no-recreate", "superlink").returncode == 0
    assert served(superlink).serial_number == new.serial_number
    assert served(gateway).serial_number == old.serial_number
    wait_until(lambda: abs((metric_expiry(stack, "server") or 0) - new.not_valid_after_utc.timestamp()) < 5,
               "the SuperLink's served certificate in Prometheus", 2 * SCRAPE_WINDOW)
    assert abs(metric_expiry(stack, "gateway") - old.not_valid_after_utc.timestamp()) < 5

    # 3. The documented step: both serve the new certificate, and the metric reports both.
    make(stack, "rotate-certs")
    assert served(gateway).serial_number == served(superlink).serial_number == new.serial_number
    wait_until(lambda: all(abs((metric_expiry(stack, c) or 0) - new.not_valid_after_utc.timestamp()) < 5
                           for c in ("server", "gateway")), "both served certificates in Prometheus", 2 * SCRAPE_WINDOW)

    # 4. The nodes reconnected through the gateway's new certificate: a one-round run with every
    # organisation completes.
    config = {"base-model": "/models/tiny-sd", "resolution": 32, "num-server-rounds": 1, "local-steps": 2,
              "sample-every": 0, "min-nodes": len(ORGS), "output-dir": "/outputs/rotated"}
    started = time.monotonic()
    result = subprocess.run([str(BIN / "flwr"), "run", ".", "remote-federation", "--stream", "--run-config", kv(config)],
                            cwd=REPO, env=stack["env"], capture_output=True, text=True, timeout=900)
    status = subprocess.run(["python3", "docker/run_status.py", str(BIN / "flwr"), "remote-federation"], cwd=REPO,
                            env=stack["env"], capture_output=True, text=True)
    assert status.returncode == 0, result.stdout[-4000:] + status.stdout + status.stderr
    rounds = [json.loads(line) for line in (stack["root"] / "outputs" / "rotated" / "metrics.jsonl").read_text().splitlines()]
    assert rounds[-1]["round"] == 1 and rounds[-1]["aggregated"] == list(ORGS)
    print(f"one round after the rotation in {time.monotonic() - started:.0f} s")
