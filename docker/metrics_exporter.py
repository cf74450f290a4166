"""A node's long-lived Prometheus endpoint, beside Flower in the same container.

    metrics_exporter.py --port 9200 [--superlink HOST:PORT --ca CA.pem] [--cert NAME=PATH ...]
                        [--served NAME=HOST:PORT ...]

Serves what the short-lived ClientApp/ServerApp processes wrote to $PROMETHEUS_MULTIPROC_DIR
(see app/metrics.py), so a scrape between messages still sees the last values, plus:
  fedlora_node_up{org}                      1 while the organisation's SuperNode is connected to
                                            the SuperLink, 0 while it is registered but not (--superlink)
  fedlora_certificate_expiry_seconds{cert}  seconds until each --cert expires, read at scrape time;
                                            for --served, the certificate that HOST:PORT serves now
                                            (after a renewal, what a restart has really loaded)

fedlora_node_up is the SuperLink's own view (heartbeats), asked at scrape time: it covers every
registered organisation, on this host or its own, without opening any port at the organisation.
"""

import argparse
import datetime as dt
import logging
import os
import signal
from pathlib import Path

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector


def served_certificate(address: str) -> bytes:
    """The certificate `address` presents in a TLS handshake, as PEM. Not verified on purpose: it is
    only read, and an expired one is exactly what must still be reported."""
    import ssl

    host, port = address.rsplit(":", 1)
    return ssl.get_server_certificate((host, int(port)), timeout=5).encode()


class NodeCollector:
    def __init__(self, superlink: str | None, ca: str | None, certs: dict[str, Path],
                 served: dict[str, str] | None = None) -> None:
        self.superlink, self.ca, self.certs, self.served = superlink, ca, certs, served or {}

    def _registered_nodes(self):
        from flwr.proto.control_pb2 import ListNodesRequest
        from flwr.supercore.control import ControlHttpClient

        client = ControlHttpClient.from_server_address(self.superlink, insecure=False, root_certificates=self.ca,
                                                       interceptors=[])
        try:
            return client.ListNodes(ListNodesRequest()).nodes_info
        finally:
            client.close()

    def collect(self):
        if self.superlink:
            up = GaugeMetricFamily("fedlora_node_up", "1 while the organisation's SuperNode is connected to the "
                                   "SuperLink, 0 while registered but not connected.", labels=["org"])
            try:
                nodes = self._registered_nodes()
            except Exception as err:  # no series rather than a failed scrape: the other metrics still count
                logging.warning("cannot list the SuperLink's nodes: %s", err)
                nodes = []
            by_org: dict[str, int] = {}
            for node in nodes:
                if node.name and node.status != "unregistered":
                    by_org[node.name] = max(by_org.get(node.name, 0), int(node.status == "online"))
            for org, value in sorted(by_org.items()):
                up.add_metric([org], value)
            yield up
        if self.certs or self.served:
            from cryptography import x509

            expiry = GaugeMetricFamily("fedlora_certificate_expiry_seconds",
                                       "Seconds until the certificate expires (negative: expired).", labels=["cert"])
            now = dt.datetime.now(dt.timezone.utc)
            pems = {name: path.read_bytes for name, path in self.certs.items()}
            pems |= {name: lambda address=address: served_certificate(address) for name, address in self.served.items()}
            for name, pem in pems.items():
                try:
                    cert = x509.load_pem_x509_certificate(pem())
                except (OSError, ValueError) as err:  # e.g. the gateway not up yet: no series, the rest still count
                    logging.warning("cannot read certificate %s: %s", name, err)
                    continue
                expiry.add_metric([name], (cert.not_valid_after_utc - now).total_seconds())
            yield expiry


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=9200)
    parser.add_argument("--superlink", help="HOST:PORT of the SuperLink whose registered nodes to report")
    parser.add_argument("--ca", help="CA certificate to verify --superlink with")
    parser.add_argument("--cert", action="append", default=[], metavar="NAME=PATH", help="certificate file to watch")
    parser.add_argument("--served", action="append", default=[], metavar="NAME=HOST:PORT",
                        help="TLS listener whose served certificate to watch")
    args = parser.parse_args()

    registry = CollectorRegistry()
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if directory:
        Path(directory).mkdir(parents=True, exist_ok=True)
        MultiProcessCollector(registry, path=directory)
    certs = {name: Path(path) for name, path in (c.split("=", 1) for c in args.cert)}
    served = dict(s.split("=", 1) for s in args.served)
    registry.register(NodeCollector(args.superlink, args.ca, certs, served))
    start_http_server(args.port, registry=registry)
    signal.sigwait({signal.SIGINT, signal.SIGTERM})


if __name__ == "__main__":
    main()
