"""The coordinator's register of organisations: which node key may join, under which name.

    python docker/orgs.py CONNECTION list
    python docker/orgs.py CONNECTION register ORG PUBLIC_KEY   (`make register-org ORG=.. KEY=..`)
    python docker/orgs.py CONNECTION unregister ORG            (`make unregister-org ORG=..`)
    python docker/orgs.py CONNECTION ensure ORG PUBLIC_KEY     (idempotent: the demo's organisations)

Runs with the Python of the `flwr` CLI (it uses Flower's own Control API client) against a
connection in $FLWR_HOME/config.toml. The SuperLink's state is the one register: Flower stores
each node's public key with the name given here, and the ServerApp takes every node's
organisation from that name (app/admission.py). So one name never has two keys, and one key
never two names.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import click
import httpx
from flwr.cli.flower_config import read_superlink_connection
from flwr.cli.supernode.register import try_load_public_key
from flwr.cli.utils import init_http_client_from_connection
from flwr.proto.control_pb2 import ListNodesRequest, RegisterNodeRequest, UnregisterNodeRequest

# One rule for organisation names and one fingerprint, shared with `make org-key`.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "certs"))
import node_key  # noqa: E402

class OrgError(Exception):
    """Refused; the message says why and what to do."""


def check_name(org: str) -> str:
    try:
        return node_key.check_org(org)
    except node_key.NodeKeyError as err:
        raise OrgError(f"{err} (it becomes a metric label and the node's ORG)") from None


class Register:
    def __init__(self, connection: str) -> None:
        self.connection = connection
        self.client = init_http_client_from_connection(read_superlink_connection(connection))

    def nodes(self) -> list:
        """Every node key ever registered and not removed, with its organisation and status."""
        nodes = self.client.ListNodes(ListNodesRequest()).nodes_info
        return sorted((n for n in nodes if n.status != "unregistered"), key=lambda n: (n.name, n.registered_at))

    def register(self, org: str, key_file: Path) -> int:
        check_name(org)
        try:
            key = try_load_public_key(key_file)
        except click.ClickException as err:
            raise OrgError(f"{key_file}: {err.message}. Ask the organisation for the .pub file `make org-key` printed.")
        for node in self.nodes():
            if node.name == org:
                raise OrgError(f"'{org}' is already registered (node {node.node_id}, {node.status}). To replace its "
                               f"key: `make unregister-org ORG={org}`, then register the new one.")
            if node.public_key == key:
                raise OrgError(f"{key_file} is already registered as '{node.name or '(no name)'}' (node "
                               f"{node.node_id}): one key, one organisation. Each organisation makes its own key.")
        node_id = self.client.RegisterNode(RegisterNodeRequest(public_key=key, name=org)).node_id
        if not node_id:
            raise OrgError(f"the SuperLink did not register {key_file}; its log says why")
        return node_id

    def ensure(self, org: str, key_file: Path) -> int:
        key = try_load_public_key(key_file)
        for node in self.nodes():
            if node.name == org and node.public_key == key:
                return node.node_id
        return self.register(org, key_file)

    def unregister(self, org: str) -> list[int]:
        ids = [n.node_id for n in self.nodes() if n.name == org]
        if not ids:
            raise OrgError(f"no organisation '{org}' is registered on '{self.connection}' (`make orgs` lists them)")
        for node_id in ids:
            self.client.UnregisterNode(UnregisterNodeRequest(node_id=node_id))
        return ids


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("connection", help="flwr connection name, e.g. remote-federation")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list")
    for name in ("register", "ensure"):
        cmd = sub.add_parser(name)
        cmd.add_argument("org")
        cmd.add_argument("key", type=Path, help="the organisation's public node key (OpenSSH, ECDSA)")
    sub.add_parser("unregister").add_argument("org")
    args = parser.parse_args(argv)
    try:
        register = Register(args.connection)
        if args.command == "list":
            print(f"{'ORGANISATION':<24} {'NODE ID':<22} {'STATUS':<12} ONLINE SINCE")
            for n in register.nodes():
                since = n.last_activated_at if n.status == "online" else ""
                print(f"{n.name or '(no name: not usable)':<24} {n.node_id:<22} {n.status:<12} {since}")
        elif args.command == "register":
            node_id = register.register(args.org, args.key)
            print(f"registered '{args.org}' (node {node_id}), key {node_key.fingerprint(args.key.read_text())}: check this fingerprint with "
                  f"the organisation. Its SuperNode can now join with the matching private key and ORG={args.org}.")
        elif args.command == "ensure":
            print(f"'{args.org}' registered (node {register.ensure(args.org, args.key)})")
        else:
            ids = register.unregister(args.org)
            print(f"unregistered '{args.org}' (node {', '.join(map(str, ids))}): its key can no longer join; a "
                  "node connected with it is refused from its next request on.")
    except OrgError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except (httpx.TransportError, click.ClickException) as err:
        print(f"error: cannot reach the SuperLink's operator listener through connection '{args.connection}' ({err}). "
              "On the coordinator host: is the stack up (`make ps`)? From elsewhere: see the README's SSH tunnel.",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
