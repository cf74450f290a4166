#!/usr/bin/env python3
"""Create and check the TLS certificates of the Flower federation.

    python certs/certs.py generate [--dir certs] [--san NAME_OR_IP ...] [--days 825] [--ca-days 3650]
    python certs/certs.py check    [--dir certs] [--san NAME_OR_IP ...] [--min-days 1]

`generate` makes a private CA (ca.pem, ca.key) and a SuperLink server
certificate (server.pem, server.key) signed by it.  It is safe to re-run: the
CA is never replaced, and the server certificate is only re-issued when it no
longer fits (missing SAN, expiring, wrong CA, lost key).  `check` verifies the
files without changing anything and exits 1 with a fix when something is off.

Extra SANs come from --san and from the SANS environment variable (comma or
space separated; `make certs SANS="..."` sets it); both are used.  Only stdlib +
`cryptography`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import re
import secrets
import sys
from pathlib import Path
from typing import Iterable, Union

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_CERT, CA_KEY = "ca.pem", "ca.key"
SERVER_CERT, SERVER_KEY = "server.pem", "server.key"

CA_CN = "Flower federation CA"
SERVER_CN = "superlink"
# The demo's SuperNodes dial the gateway by its compose service name, the gateway dials the
# SuperLink by its own, and the SuperLink dials itself over loopback, by name and by address.
DEFAULT_SANS = ("superlink", "gateway", "localhost", "127.0.0.1")
# The name `make certs SANS="..."` documents and passes on: one name, so that the fix this tool
# prints is a command that works.
SANS_ENV = "SANS"

RENEW_BEFORE_DAYS = 30
# Backdate notBefore so peers whose clocks run a little slow still accept a
# certificate issued a moment ago.
CLOCK_SKEW = dt.timedelta(minutes=5)

FIX = "run `make certs`"

_DNS_LABEL = r"[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?"
_DNS_NAME = re.compile(rf"^(\*\.)?{_DNS_LABEL}(\.{_DNS_LABEL})*$")


# New keys are EC P-384; an existing RSA CA (e.g. made with openssl) still works.
PrivateKey = Union[ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey]


class CertError(Exception):
    """A problem the operator must fix; the message says how."""


# --------------------------------------------------------------------------- SANs


def parse_sans(values: Iterable[str]) -> list[str]:
    """Split comma/space separated SANs, normalise them, drop duplicates (order kept)."""
    out: list[str] = []
    for value in values:
        for item in re.split(r"[,\s]+", value.strip()):
            if item:
                name = _normalise_san(item)
                if name not in out:
                    out.append(name)
    return out


def required_sans(extra: Iterable[str]) -> list[str]:
    return parse_sans([*DEFAULT_SANS, *extra])


def _normalise_san(item: str) -> str:
    ip = _as_ip(item)
    if ip is not None:
        return str(ip)
    name = item.lower().rstrip(".")
    if not _DNS_NAME.match(name):
        raise CertError(
            f"invalid SAN {item!r}: give a bare host name (fl.example.org) or an IP "
            "address, without scheme, port or path"
        )
    return name


def _as_ip(item: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(item.strip("[]"))
    except ValueError:
        return None


def _general_name(san: str) -> x509.GeneralName:
    ip = _as_ip(san)
    return x509.IPAddress(ip) if ip is not None else x509.DNSName(san)


def cert_sans(cert: x509.Certificate) -> list[str]:
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    names = []
    for name in ext:
        if isinstance(name, x509.DNSName):
            names.append(name.value.lower())
        elif isinstance(name, x509.IPAddress):
            names.append(str(name.value))
    return names


def missing_sans(cert: x509.Certificate, wanted: Iterable[str]) -> list[str]:
    have = set(cert_sans(cert))
    return [san for san in wanted if san not in have]


# --------------------------------------------------------------------------- files


def _show(path: Path) -> str:
    """Path as the operator typed it: relative to the cwd when inside it."""
    rel = os.path.relpath(path)
    return rel if not rel.startswith("..") else str(path.absolute())


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    # Created with its final mode, so a key is never readable by others, not
    # even between create and chmod; replaced atomically so a crash never
    # leaves a half-written file behind under the real name.
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)  # the umask may have narrowed a cert's 0644
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_key(path: Path, key: PrivateKey) -> None:
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),  # the SuperLink must read it unattended
    )
    _write_atomic(path, pem, 0o600)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    _write_atomic(path, cert.public_bytes(serialization.Encoding.PEM), 0o644)


def _load_cert(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except ValueError as exc:
        raise CertError(
            f"{_show(path)} is not a PEM certificate ({exc}): move it away and {FIX}"
        ) from exc


def _load_key(path: Path) -> PrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise CertError(
            f"{_show(path)} is not an unencrypted PEM private key ({exc}): "
            f"move it away and {FIX}"
        ) from exc
    if not isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey)):
        raise CertError(f"{_show(path)} is a {type(key).__name__}; expected an EC or RSA key")
    return key


# --------------------------------------------------------------------------- x509


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP384R1())


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _same_public_key(key: PrivateKey, cert: x509.Certificate) -> bool:
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    return key.public_key().public_bytes(der, spki) == cert.public_key().public_bytes(der, spki)


def signed_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    """True if `ca` issued `cert`: issuer name matches and the signature verifies."""
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _validity(days: int) -> tuple[dt.datetime, dt.datetime]:
    now = _now()
    return now - CLOCK_SKEW, now + dt.timedelta(days=days)


def issue_ca(
    not_before: dt.datetime, not_after: dt.datetime
) -> tuple[PrivateKey, x509.Certificate]:
    """Issue a self-signed CA with an explicit validity window."""
    key = _new_key()
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(CA_CN))
        .issuer_name(_name(CA_CN))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False, content_commitment=False,
                key_encipherment=False, data_encipherment=False,
                key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA384())
    )
    return key, cert


def issue_server(
    ca_key: PrivateKey,
    ca_cert: x509.Certificate,
    sans: list[str],
    not_before: dt.datetime,
    not_after: dt.datetime,
) -> tuple[PrivateKey, x509.Certificate]:
    """Issue a server certificate with an explicit validity window (tests use a past one)."""
    key = _new_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(SERVER_CN))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False,
                key_encipherment=False, data_encipherment=False,
                key_agreement=False, key_cert_sign=False, crl_sign=False,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.SubjectAlternativeName([_general_name(s) for s in sans]), critical=False
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
        )
        # Strict verifiers (Python 3.13's default context, OpenSSL X509_STRICT)
        # reject a leaf without an authority key identifier.
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA384())
    )
    return key, cert


# --------------------------------------------------------------------------- expiry


def seconds_until_expiry(cert_path: Path) -> float:
    """Seconds until the certificate's notAfter; negative once it has expired."""
    cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
    return (cert.not_valid_after_utc - _now()).total_seconds()


def _sans_of_file(path: Path) -> list[str]:
    try:
        return cert_sans(x509.load_pem_x509_certificate(path.read_bytes()))
    except (OSError, ValueError):
        return []


def _expiry(cert: x509.Certificate) -> str:
    end = cert.not_valid_after_utc
    days = (end - _now()).total_seconds() / 86400
    return f"expires {end.date().isoformat()} ({round(days)} days left)"


# --------------------------------------------------------------------------- generate


def generate(dir: Path, sans: list[str], days: int = 825, ca_days: int = 3650) -> None:
    """Create what is missing, keep what is still good, print what happened.

    Raises CertError when the existing files cannot be used (e.g. ca.key lost).
    """
    dir = Path(dir)
    wanted = required_sans(sans)
    dir.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = _ensure_ca(dir, ca_days)
    _ensure_server(dir, ca_key, ca_cert, wanted, days)
    _ensure_superexec_secret(dir)
    _ensure_grafana_env(dir)
    print(f"Give organisations {_show(dir / CA_CERT)} only; "
          f"{CA_KEY} and {SERVER_KEY} stay on this host.")


SUPEREXEC_SECRET = "superexec.secret"


def _ensure_superexec_secret(dir: Path) -> None:
    """The shared secret the SuperLink asks of the SuperExec that runs the ServerApp: without it,
    anyone who reaches the SuperLink's port could pose as the ServerApp runtime."""
    path = dir / SUPEREXEC_SECRET
    if path.exists():
        print(f"secret  {_show(path)}: kept")
        return
    _write_atomic(path, secrets.token_hex(32).encode(), 0o600)
    print(f"secret  {_show(path)}: created")


GRAFANA_ENV = "grafana.env"


def _ensure_grafana_env(dir: Path) -> None:
    """Grafana's admin password, as an env file that Compose reads on the host (user: admin)."""
    path = dir / GRAFANA_ENV
    if path.exists():
        print(f"secret  {_show(path)}: kept")
        return
    _write_atomic(path, f"GF_SECURITY_ADMIN_PASSWORD={secrets.token_urlsafe(18)}\n".encode(), 0o600)
    print(f"secret  {_show(path)}: created (Grafana's admin password)")


def _ensure_ca(dir: Path, ca_days: int) -> tuple[PrivateKey, x509.Certificate]:
    cert_path, key_path = dir / CA_CERT, dir / CA_KEY
    if not cert_path.exists() and not key_path.exists():
        key, cert = issue_ca(*_validity(ca_days))
        _write_key(key_path, key)
        _write_cert(cert_path, cert)
        print(f"CA      {_show(cert_path)}: created, {_expiry(cert)}")
        return key, cert

    # Never replace an existing CA: every organisation trusts it, and a new one
    # would silently cut them all off until they received the new ca.pem.
    if not key_path.exists():
        raise CertError(
            f"{_show(cert_path)} exists but {_show(key_path)} is missing, so no "
            f"certificate can be issued: restore {CA_KEY} from backup, or (if it is "
            f"lost) move {CA_CERT} away, {FIX} and send the new {CA_CERT} to every "
            "organisation"
        )
    if not cert_path.exists():
        raise CertError(
            f"{_show(key_path)} exists but {_show(cert_path)} is missing: restore "
            f"{CA_CERT} from backup, or move {CA_KEY} away and {FIX} to create a new CA"
        )
    cert, key = _load_cert(cert_path), _load_key(key_path)
    if not _same_public_key(key, cert):
        raise CertError(
            f"{_show(key_path)} does not belong to {_show(cert_path)}: restore the "
            "matching pair from backup"
        )
    if cert.not_valid_after_utc <= _now():
        raise CertError(_ca_expired_msg(dir, cert))
    print(f"CA      {_show(cert_path)}: kept existing CA, {_expiry(cert)}")
    return key, cert


def _ca_expired_msg(dir: Path, cert: x509.Certificate) -> str:
    return (
        f"{_show(dir / CA_CERT)} expired on {cert.not_valid_after_utc.date()}: move "
        f"{CA_CERT} and {CA_KEY} away, {FIX} to create a new CA, and send the new "
        f"{CA_CERT} to every organisation"
    )


def _server_reissue_reason(
    dir: Path, ca_cert: x509.Certificate, wanted: list[str]
) -> str | None:
    """Why server.pem must be (re)issued, or None if it can be kept."""
    cert_path, key_path = dir / SERVER_CERT, dir / SERVER_KEY
    if not cert_path.exists():
        return "created"
    if not key_path.exists():
        return f"re-issued: {SERVER_KEY} was missing"
    try:
        cert, key = _load_cert(cert_path), _load_key(key_path)
    except CertError as exc:
        return f"re-issued: {exc}"
    if not signed_by(cert, ca_cert):
        return f"re-issued: it was not signed by the current {CA_CERT}"
    if not _same_public_key(key, cert):
        return f"re-issued: {SERVER_KEY} did not match it"
    end = cert.not_valid_after_utc
    if end <= _now():
        return f"re-issued: it expired on {end.date()}"
    if end - _now() <= dt.timedelta(days=RENEW_BEFORE_DAYS):
        return f"re-issued: it expires on {end.date()}, within {RENEW_BEFORE_DAYS} days"
    missing = missing_sans(cert, wanted)
    if missing:
        return f"re-issued: it did not cover {', '.join(missing)}"
    return None


def _ensure_server(
    dir: Path,
    ca_key: PrivateKey,
    ca_cert: x509.Certificate,
    wanted: list[str],
    days: int,
) -> None:
    cert_path, key_path = dir / SERVER_CERT, dir / SERVER_KEY
    reason = _server_reissue_reason(dir, ca_cert, wanted)
    if reason is None:
        cert = _load_cert(cert_path)
        print(f"server  {_show(cert_path)}: kept, {_expiry(cert)}")
        print(f"        SANs: {', '.join(cert_sans(cert))}")
        return

    old_sans = _sans_of_file(cert_path)
    start, end = _validity(days)
    # A certificate outliving its CA would fail verification anyway; say so.
    clamped = end > ca_cert.not_valid_after_utc
    end = min(end, ca_cert.not_valid_after_utc)
    key, cert = issue_server(ca_key, ca_cert, wanted, start, end)
    missing = missing_sans(cert, wanted)
    if missing:  # never hand out a certificate that organisations would be refused by
        raise CertError(
            f"{_show(cert_path)} does not cover {', '.join(repr(s) for s in missing)} although they were "
            f"requested, so it was not written ({_show(cert_path)} is unchanged): give each name as a plain "
            "host name or IP address, and report this as a bug in certs/certs.py if it persists"
        )
    _write_key(key_path, key)
    _write_cert(cert_path, cert)
    print(f"server  {_show(cert_path)}: {reason}; now {_expiry(cert)}")
    print(f"        SANs: {', '.join(cert_sans(cert))}")
    dropped = [s for s in old_sans if s not in wanted]
    if dropped:
        print(f"warning: the previous certificate also covered {', '.join(dropped)}; "
              f"the new one does not. Pass them with --san/{SANS_ENV} if still needed.")
    if clamped:
        print(f"warning: the CA {_expiry(ca_cert)}, so the server certificate ends then "
              "too; plan a CA renewal (see certs/README.md).")


# --------------------------------------------------------------------------- check


def check(dir: Path, sans: list[str], min_days: int = 1) -> list[str]:
    """Return the problems with the certificates in `dir` (empty list: all good)."""
    dir = Path(dir)
    wanted = required_sans(sans)
    problems = [
        _missing_msg(dir, name) for name in (CA_CERT, SERVER_CERT, SERVER_KEY)
        if not (dir / name).exists()
    ] + [
        f"{_show(dir / name)} missing: {FIX} to create it"
        for name in (SUPEREXEC_SECRET, GRAFANA_ENV) if not (dir / name).exists()
    ]
    if problems:
        return problems

    try:
        ca = _load_cert(dir / CA_CERT)
        cert = _load_cert(dir / SERVER_CERT)
        key = _load_key(dir / SERVER_KEY)
    except CertError as exc:
        return [str(exc)]

    server, now = _show(dir / SERVER_CERT), _now()
    if ca.not_valid_after_utc <= now:
        problems.append(_ca_expired_msg(dir, ca))
    if not signed_by(cert, ca):
        problems.append(f"{server} is not signed by {_show(dir / CA_CERT)}: {FIX} to re-issue it")
    if not _same_public_key(key, cert):
        problems.append(
            f"{_show(dir / SERVER_KEY)} does not match {server}: {FIX} to re-issue them"
        )
    end = cert.not_valid_after_utc
    if end <= now:
        problems.append(f"{server} expired on {end.date()}: {FIX} to re-issue it")
    elif end - now <= dt.timedelta(days=min_days):
        problems.append(
            f"{server} expires on {end.date()}, within {min_days} days: {FIX} to re-issue it"
        )
    if cert.not_valid_before_utc > now:
        problems.append(
            f"{server} is not valid before {cert.not_valid_before_utc.isoformat()}: "
            "check this host's clock"
        )
    missing = missing_sans(cert, wanted)
    if missing:
        extras = [s for s in wanted if s not in DEFAULT_SANS]
        quoted = ", ".join(repr(s) for s in missing)
        problems.append(
            f"{server} does not cover {quoted}: run "
            f"`make certs {SANS_ENV}={_shell_value(extras)}`"
        )
    return problems


def _missing_msg(dir: Path, name: str) -> str:
    path = _show(dir / name)
    if name != CA_CERT:
        return f"{path} missing: {FIX}"
    if (dir / CA_KEY).exists():
        return (f"{path} missing but {CA_KEY} is there: restore {CA_CERT} from backup "
                "(or see certs/README.md, 'Renewing', to start a new CA)")
    if (dir / SERVER_CERT).exists():
        return (f"{path} missing: {FIX} to create a new CA, then send the new "
                f"{CA_CERT} to every organisation")
    return f"{path} missing: {FIX}"


def _shell_value(sans: list[str]) -> str:
    joined = ",".join(sans)
    return joined if re.fullmatch(r"[A-Za-z0-9.:_*,-]+", joined) else f'"{joined}"'


# --------------------------------------------------------------------------- CLI


def _sans_from(cli: list[str] | None) -> list[str]:
    return parse_sans([*(cli or []), os.environ.get(SANS_ENV, "")])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    default_dir = Path(__file__).resolve().parent  # works whatever the cwd
    san_help = f"extra DNS name or IP for server.pem (repeatable; also ${SANS_ENV})"

    gen = sub.add_parser("generate", help="create or renew the certificates")
    gen.add_argument("--dir", type=Path, default=default_dir)
    gen.add_argument("--san", action="append", metavar="NAME_OR_IP", help=san_help)
    gen.add_argument("--days", type=int, default=825, help="server certificate lifetime")
    gen.add_argument("--ca-days", type=int, default=3650, help="CA lifetime (new CA only)")

    chk = sub.add_parser("check", help="verify the certificates, change nothing")
    chk.add_argument("--dir", type=Path, default=default_dir)
    chk.add_argument("--san", action="append", metavar="NAME_OR_IP", help=san_help)
    chk.add_argument("--min-days", type=int, default=1,
                     help="fail if the server certificate has this many days or fewer left")

    args = parser.parse_args(argv)
    try:
        sans = _sans_from(args.san)
        if args.command == "generate":
            generate(args.dir, sans, days=args.days, ca_days=args.ca_days)
            return 0
        problems = check(args.dir, sans, min_days=args.min_days)
    except CertError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1

    if problems:
        for problem in problems:
            print(f"error: {problem}", file=sys.stderr)
        return 1
    cert = _load_cert(args.dir / SERVER_CERT)
    print(f"OK: {_show(args.dir / SERVER_CERT)} signed by {CA_CERT}, key matches, "
          f"{_expiry(cert)}, SANs: {', '.join(cert_sans(cert))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
