#!/usr/bin/env python3
"""Create an organisation's SuperNode key pair for Flower's node authentication.

    python certs/node_key.py create --dir certs/nodes --org clinic-a

Writes DIR/ORG.key (private, 0600) and DIR/ORG.pub (public) unless the private key exists: a key
the coordinator registered must never be silently replaced. Prints the public key, its
fingerprint and what to send to the coordinator. Only stdlib + `cryptography`.

Also writes DIR/ORG.superexec.secret (0600) if missing: the secret the organisation's SuperNode
asks of its ClientApp container's SuperExec (`--superexec-auth-secret-file`, docs/isolation.md).
Only the organisation's two containers get it; it never leaves the organisation's host.

Formats are the ones Flower reads: `flower-supernode --auth-supernode-private-key` loads an
OpenSSH private key (load_ssh_private_key, no passphrase) and `flwr supernode register` an
OpenSSH public key on a NIST curve, i.e. what `ssh-keygen -t ecdsa -b 384 -N ""` writes.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import os
import re
import secrets
import sys
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

ORG_PATTERN = re.compile(r"^[a-z0-9][a-z0-9-]{0,39}$")


class NodeKeyError(Exception):
    """A problem the organisation's admin must fix; the message says how."""


def check_org(org: str) -> str:
    if not ORG_PATTERN.match(org):
        raise NodeKeyError(f"invalid organisation name {org!r}: use 1-40 lowercase letters, digits or '-', starting with a letter or digit, e.g. clinic-a")
    return org


def fingerprint(public_line: str) -> str:
    """SHA256 fingerprint as `ssh-keygen -l` prints it, to compare keys over the phone."""
    blob = base64.b64decode(public_line.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def paths(directory: Path, org: str) -> tuple[Path, Path]:
    return directory / f"{org}.key", directory / f"{org}.pub"


def secret_path(directory: Path, org: str) -> Path:
    return directory / f"{org}.superexec.secret"


def create_secret(directory: Path, org: str) -> tuple[Path, bool]:
    """The organisation's SuperExec secret, if missing. Returns (path, created)."""
    path = secret_path(directory, check_org(org))
    directory.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path, False
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    return path, True


def create(directory: Path, org: str) -> tuple[Path, Path, bool]:
    """Create the pair if the private key is missing. Returns (key, pub, created)."""
    check_org(org)
    key_path, pub_path = paths(directory, org)
    directory.mkdir(parents=True, exist_ok=True)
    if key_path.exists():
        key = load_private_key(key_path)
        created = False
    else:
        key = ec.generate_private_key(ec.SECP384R1())
        data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                 serialization.NoEncryption())
        # O_EXCL: never replace a key, even one another process wrote a moment ago.
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        created = True
    # The public key is always re-derived from the private one, so a stale or edited .pub cannot
    # end up registered for a key the node does not hold.
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    pub_path.write_text(f"{public.decode()} {org}\n")
    pub_path.chmod(0o644)
    return key_path, pub_path, created


def load_private_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """Load a node key the way flower-supernode does, with a message that names the fix."""
    try:
        key = serialization.load_ssh_private_key(path.read_bytes(), None)
    except (ValueError, TypeError) as err:
        raise NodeKeyError(f"{path} is not an unencrypted OpenSSH private key ({err}): create one with "
                        "`make org-key ORG=...` (or `ssh-keygen -t ecdsa -b 384 -N '' -f FILE`)") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise NodeKeyError(f"{path} holds a {type(key).__name__}, not an ECDSA key: Flower's node authentication "
                        "needs an ECDSA key on a NIST curve; create one with `make org-key ORG=...`")
    return key


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("create", help="create DIR/ORG.key and DIR/ORG.pub if the key is missing")
    c.add_argument("--dir", type=Path, default=Path("certs/nodes"))
    c.add_argument("--org", required=True)
    c.add_argument("--shown-dir", default=None, help="how to name DIR in the messages (the host path)")
    args = parser.parse_args(argv)
    try:
        key_path, pub_path, created = create(args.dir, args.org)
        secret, secret_created = create_secret(args.dir, args.org)
    except (NodeKeyError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    shown = args.shown_dir or str(args.dir)
    line = pub_path.read_text().strip()
    print(f"{'created' if created else 'kept the existing'} {shown}/{key_path.name} (private, 0600: never send it)")
    print(f"{'created' if secret_created else 'kept the existing'} {shown}/{secret.name} (0600: stays on this host; "
          "the node's SuperNode and ClientApp containers share it)")
    print(f"public key {shown}/{pub_path.name}, fingerprint {fingerprint(line)}:")
    print(f"  {line}")
    print(f"Send {shown}/{pub_path.name} to the federation's coordinator and ask them to run:")
    print(f"  make register-org ORG={args.org} KEY={pub_path.name}")
    print("and to confirm the fingerprint above. Then `make join-check` tells you when it is registered.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
