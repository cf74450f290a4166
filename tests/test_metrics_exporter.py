"""docker/metrics_exporter.py, what a scrape of a node or of the coordinator returns: the certificate a
listener really serves, and what the short-lived runs' processes left in the multiprocess files."""

from __future__ import annotations

import datetime as dt
import importlib.util
import json
import socket
import ssl
import subprocess
import sys
import threading

import pytest
from cryptography import x509
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector

from conftest import load_certs_tool
from federation import REPO, offline_env


def exporter():
    spec = importlib.util.spec_from_file_location("metrics_exporter", REPO / "docker" / "metrics_exporter.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def samples(registry_or_collector) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in registry_or_collector.collect() for s in family.samples}


def not_after(pem: bytes) -> dt.datetime:
    return x509.load_pem_x509_certificate(pem).not_valid_after_utc


@pytest.fixture
def tls_listener(tmp_path):
    """A TLS listener serving certs made by certs/certs.py, in a thread; yields (address, served dir)."""
    served = tmp_path / "served"
    load_certs_tool().generate(served, [], days=100)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(served / "server.pem", served / "server.key")
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            try:
                with context.wrap_socket(conn, server_side=True):
                    pass
            except (ssl.SSLError, OSError):
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.getsockname()[1]}", served
    stop.set()
    thread.join(timeout=5)
    server.close()


def test_the_expiry_metric_reports_the_served_certificate_not_the_renewed_file(tls_listener, tmp_path):
    """After `make certs` renews server.pem and before a restart, the listener still serves the old
    certificate: --served reports that one (the file would already show the new one)."""
    address, served = tls_listener
    renewed = tmp_path / "renewed"
    load_certs_tool().generate(renewed, [], days=700)  # the file on disk, not (yet) loaded by the listener
    collector = exporter().NodeCollector(None, None, {"file": renewed / "server.pem"}, {"server": address})
    got = samples(collector)
    now = dt.datetime.now(dt.timezone.utc)
    for name, pem in (("server", served / "server.pem"), ("file", renewed / "server.pem")):
        want = (not_after(pem.read_bytes()) - now).total_seconds()
        assert abs(got[("fedlora_certificate_expiry_seconds", (("cert", name),))] - want) < 60, (name, got)
    assert got[("fedlora_certificate_expiry_seconds", (("cert", "server"),))] < 101 * 86400  # the served one


def test_a_listener_that_is_down_costs_its_series_only(tmp_path):
    with socket.create_server(("127.0.0.1", 0)) as s:
        closed = f"127.0.0.1:{s.getsockname()[1]}"
    load_certs_tool().generate(tmp_path, [])
    got = samples(exporter().NodeCollector(None, None, {"ca": tmp_path / "ca.pem"}, {"gateway": closed}))
    assert [k for k in got if k[0] == "fedlora_certificate_expiry_seconds"] == \
        [("fedlora_certificate_expiry_seconds", (("cert", "ca"),))]


# One round's export, in its own process, as each run's ServerApp process does.
EXPORT = """
import json, sys
from app import reporting
record, heldout = json.loads(sys.argv[1]), json.loads(sys.argv[2])
reporting.export_round(record, online=3, received_bytes=0)
reporting.export_heldout(heldout)
"""


def _round(mode: str, train_loss: float, by_org: dict[str, float] | None) -> tuple[dict, dict]:
    record = {"participants": ["org-1", "org-2"], "aggregated": ["org-1", "org-2"], "train_loss": train_loss,
              "update_norm": 0.5, "seconds": {"round": 10.0}}
    if by_org:
        record |= {"client_seconds": {o: {"fit": 2.0} for o in by_org}, "train_loss_by_org": by_org,
                   "num_examples_by_org": {o: 10 for o in by_org}}
        heldout = {"heldout_loss": train_loss, "heldout_loss_by_org": by_org}
    else:
        record |= {"client_seconds_mean": {"fit": 2.0}}
        heldout = {"heldout_loss": train_loss}
    return record, heldout


def test_a_private_run_after_a_shared_one_adds_no_organisation_figure(tmp_path):
    """The exporter serves what every run's process left in $PROMETHEUS_MULTIPROC_DIR: after a shared
    run, then a private one, the federated figures are the private run's, the counters went on, and the
    per-organisation figures are still the shared run's last (as app/metrics.py documents: they keep
    the last value revealed); the private run wrote none."""
    directory = tmp_path / "metrics"
    env = offline_env(PROMETHEUS_MULTIPROC_DIR=str(directory), PYTHONPATH=str(REPO))
    for mode, loss, by_org in (("shared", 1.25, {"org-1": 1.5, "org-2": 1.0}), ("private", 0.75, None)):
        record, heldout = _round(mode, loss, by_org)
        result = subprocess.run([sys.executable, "-c", EXPORT, json.dumps(record), json.dumps(heldout)], env=env,
                                cwd=REPO, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr[-3000:]
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(directory))
    got = samples(registry)
    assert got[("fedlora_federated_train_loss", ())] == 0.75 and got[("fedlora_federated_heldout_loss", ())] == 0.75
    assert got[("fedlora_rounds_completed_total", ())] == 2
    assert got[("fedlora_org_rounds_aggregated_total", (("org", "org-1"),))] == 2
    org_losses = {k[1][0][1]: v for k, v in got.items() if k[0] == "fedlora_org_train_loss"}
    assert org_losses == {"org-1": 1.5, "org-2": 1.0}  # the shared run's, unchanged by the private run
    assert {k[1][0][1]: v for k, v in got.items() if k[0] == "fedlora_org_heldout_loss"} == {"org-1": 1.5, "org-2": 1.0}
