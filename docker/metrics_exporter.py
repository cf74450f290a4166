"""A node's long-lived Prometheus endpoint, beside Flower in the same container.

    metrics_exporter.py --port 9200 [--org ORG] [--cert NAME=PATH ...]

Serves what the short-lived ClientApp/ServerApp processes wrote to $PROMETHEUS_MULTIPROC_DIR
(see app/metrics.py), so a scrape between messages still sees the last values, plus:
  fedlora_node_up{org}                      1 while this organisation's node runs (--org)
  fedlora_certificate_expiry_seconds{cert}  seconds until each --cert expires, read at scrape time
"""

import argparse
import datetime as dt
import os
import signal
from pathlib import Path

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector


class NodeCollector:
    def __init__(self, org: str | None, certs: dict[str, Path]) -> None:
        self.org, self.certs = org, certs

    def collect(self):
        if self.org:
            up = GaugeMetricFamily("fedlora_node_up", "1 while the organisation's node runs.", labels=["org"])
            up.add_metric([self.org], 1)
            yield up
        if self.certs:
            from cryptography import x509

            expiry = GaugeMetricFamily("fedlora_certificate_expiry_seconds",
                                       "Seconds until the certificate expires (negative: expired).", labels=["cert"])
            now = dt.datetime.now(dt.timezone.utc)
            for name, path in self.certs.items():
                cert = x509.load_pem_x509_certificate(path.read_bytes())
                expiry.add_metric([name], (cert.not_valid_after_utc - now).total_seconds())
            yield expiry


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=9200)
    parser.add_argument("--org", default=os.environ.get("ORG"), help="organisation name, for fedlora_node_up")
    parser.add_argument("--cert", action="append", default=[], metavar="NAME=PATH", help="certificate to watch")
    args = parser.parse_args()

    registry = CollectorRegistry()
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if directory:
        Path(directory).mkdir(parents=True, exist_ok=True)
        MultiProcessCollector(registry, path=directory)
    certs = {name: Path(path) for name, path in (c.split("=", 1) for c in args.cert)}
    registry.register(NodeCollector(args.org, certs))
    start_http_server(args.port, registry=registry)
    signal.sigwait({signal.SIGINT, signal.SIGTERM})


if __name__ == "__main__":
    main()
