#!/usr/bin/env python3
"""Check everything an organisation's SuperNode needs before it joins; one line per check.

    preflight.py                   every check, with the node's settings (`make join-check`)
    preflight.py --skip data,gpu   only what concerns the SuperLink (docker/supernode.sh, after exit 305)

Settings come from the environment, the same as docker/supernode.sh's: SUPERLINK_ADDRESS
(host:port), ORG, NODE_CONFIG_EXTRA (its default-caption is used), NODE_KEY (default
/run/fedlora/node.key), CA_CERT (default /run/fedlora/ca.pem), DATA_DIR (default /data), and
FEDLORA_EXPECT_GPU=1 with NODE_GPU, the GPU ids the container was given (both set by
docker/join/compose.gpu.yaml), SUPEREXEC_SECRET (default /run/fedlora/superexec.secret) and
RELAY_DIR (the volume the node's two containers share; the relay check runs where it is set).
Exits 1 if any check FAILED.

The registration check uses Flower's own Fleet client: it sends ActivateNode signed with the node
key but with a heartbeat interval of 0, which the SuperLink refuses (flwr 1.41, fleet_handlers.py)
*after* looking the key up and *before* activating anything: "invalid heartbeat interval" means
registered, "failed to activate" means unknown key, HTTP 401 a bad signature or clock.
"""

from __future__ import annotations

import argparse
import base64
import email.utils
import hashlib
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ORG_PATTERN = re.compile(r"^[a-z0-9][a-z0-9-]{0,39}$")
CONNECT_TIMEOUT = 5.0
# Flower's node authentication (flwr.common.constant, superlink/routers/fleet/node_auth.py)
# accepts a signature whose age on the SuperLink's clock is within
# (-SYSTEM_TIME_TOLERANCE, TIMESTAMP_TOLERANCE + SYSTEM_TIME_TOLERANCE) = (-5 s, 305 s).
AHEAD_LIMIT, BEHIND_LIMIT = 5.0, 305.0
# Warn this close to either limit: HTTP dates have 1 s resolution and clocks drift between checks.
AHEAD_WARN, BEHIND_WARN = 2.0, 245.0
REGISTER_FIX = "send certs/nodes/{org}.pub to the coordinator and ask them to run `make register-org ORG={org} KEY={org}.pub`"


@dataclass
class Result:
    status: str  # ok, warn, FAILED, skip
    name: str
    detail: str

    def line(self) -> str:
        return f"{self.status:<7}{self.name:<14}{self.detail}"


@dataclass
class Settings:
    address: str
    org: str
    key: Path
    ca: Path
    data_dir: Path
    default_caption: str | None
    expect_gpu: bool
    gpu_ids: tuple[str, ...] = ()  # NODE_GPU: what the container should see
    train_processes: object = "auto"  # the node setting, from NODE_CONFIG_EXTRA
    secret: Path = Path("/run/fedlora/superexec.secret")
    relay_dir: Path | None = None

    @classmethod
    def from_env(cls, env: dict[str, str]) -> Settings:
        extra = env.get("NODE_CONFIG_EXTRA", "").strip()
        node_config = {}
        if extra:
            from flwr.common.config import parse_config_args

            node_config = parse_config_args([extra])
        caption = str(node_config.get("default-caption", "")).strip() or None
        return cls(
            address=env.get("SUPERLINK_ADDRESS", "").strip(),
            org=env.get("ORG", "").strip(),
            key=Path(env.get("NODE_KEY", "/run/fedlora/node.key")),
            ca=Path(env.get("CA_CERT", "/run/fedlora/ca.pem")),
            data_dir=Path(env.get("DATA_DIR", "/data")),
            default_caption=caption,
            expect_gpu=env.get("FEDLORA_EXPECT_GPU", "") not in ("", "0", "false"),
            gpu_ids=tuple(i.strip() for i in env.get("NODE_GPU", "").split(",") if i.strip()),
            train_processes=node_config.get("train-processes", "auto"),
            secret=Path(env.get("SUPEREXEC_SECRET", "/run/fedlora/superexec.secret")),
            relay_dir=Path(env["RELAY_DIR"]) if env.get("RELAY_DIR") else None,
        )

    @property
    def host_port(self) -> tuple[str, int]:
        host, _, port = self.address.rpartition(":")
        return host.strip("[]"), int(port)


def whoami() -> str:
    return f"uid {os.getuid()} (gid {os.getgid()})"


# ------------------------------------------------------------------------------ settings


def check_settings(s: Settings) -> list[Result]:
    out = []
    if not ORG_PATTERN.match(s.org):
        out.append(Result("FAILED", "org", f"ORG={s.org!r} is not a valid organisation name: set ORG to the name the "
                                           "coordinator registered, 1-40 lowercase letters, digits or '-'"))
    else:
        out.append(Result("ok", "org", s.org))
    if not re.match(r"^(\[[0-9a-fA-F:]+\]|[^\s:/\[\]]+):[0-9]{1,5}$", s.address):
        out.append(Result("FAILED", "address", f"SUPERLINK_ADDRESS={s.address!r} is not HOST:PORT: set it to the "
                                               "address the coordinator gave you, e.g. fl.example.org:8000"))
    else:
        out.append(Result("ok", "address", s.address))
    return out


# ------------------------------------------------------------------------------ network, TLS, health, clock


def check_reachable(s: Settings) -> Result:
    host, port = s.host_port
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        return Result("FAILED", "reachable", f"cannot resolve {host!r} ({err.strerror}): check SUPERLINK_ADDRESS "
                                             "and this host's DNS")
    errors = []
    for family, kind, proto, _, sockaddr in infos:
        start = time.monotonic()
        try:
            with socket.socket(family, kind, proto) as sock:
                sock.settimeout(CONNECT_TIMEOUT)
                sock.connect(sockaddr)
            return Result("ok", "reachable", f"{s.address} accepts connections ({(time.monotonic() - start) * 1000:.0f} ms)")
        except socket.timeout:
            errors.append(f"{sockaddr[0]}: no answer within {CONNECT_TIMEOUT:.0f} s")
        except OSError as err:
            errors.append(f"{sockaddr[0]}: {err.strerror or err}")
    return Result("FAILED", "reachable", f"cannot connect to {s.address} ({'; '.join(errors)}): check that "
                                         "SUPERLINK_ADDRESS is the one the coordinator gave you, that the coordinator's "
                                         "gateway is up, and that no firewall (yours or theirs) blocks this port")


def peer_names(s: Settings) -> list[str]:
    """The names the server's certificate covers, read WITHOUT verification (only for the message)."""
    from cryptography import x509

    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    with socket.create_connection(s.host_port, timeout=CONNECT_TIMEOUT) as raw:
        with context.wrap_socket(raw, server_hostname=s.host_port[0]) as tls:
            der = tls.getpeercert(binary_form=True)
    cert = x509.load_der_x509_certificate(der)
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [*sans.get_values_for_type(x509.DNSName), *(str(ip) for ip in sans.get_values_for_type(x509.IPAddress))]


def tls_context(s: Settings) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(s.ca))


def check_tls(s: Settings) -> Result:
    if not s.ca.is_file():
        return Result("FAILED", "tls", f"no federation CA at {s.ca}: get ca.pem from the coordinator and put it at "
                                       "certs/ca.pem (the node mounts it from there)")
    try:
        context = tls_context(s)
    except (ssl.SSLError, OSError) as err:
        return Result("FAILED", "tls", f"cannot load {s.ca} as a CA certificate ({err}): get ca.pem again from "
                                       "the coordinator (PEM, '-----BEGIN CERTIFICATE-----')")
    host = s.host_port[0]
    try:
        with socket.create_connection(s.host_port, timeout=CONNECT_TIMEOUT) as raw:
            with context.wrap_socket(raw, server_hostname=host) as tls:
                version = tls.version()
    except ssl.SSLCertVerificationError as err:
        # 62 X509_V_ERR_HOSTNAME_MISMATCH, 64 X509_V_ERR_IP_ADDRESS_MISMATCH: the chain is fine.
        if err.verify_code in (62, 64):
            names = ", ".join(peer_names(s)) or "no names"
            return Result("FAILED", "tls", f"the SuperLink's certificate chains to {s.ca} but does not cover "
                                           f"{host!r}; it covers: {names}. Set SUPERLINK_ADDRESS to one of those, or "
                                           f"ask the coordinator to add {host} (`make certs SANS=\"... {host}\"`)")
        return Result("FAILED", "tls", f"the certificate at {s.address} does not chain to {s.ca} "
                                       f"({err.verify_message}): this ca.pem belongs to another federation, or an "
                                       "older one, or something else answers on that address; get the current "
                                       "ca.pem from the coordinator")
    except ssl.SSLError as err:
        return Result("FAILED", "tls", f"TLS handshake with {s.address} failed ({err.reason or err}): the port does "
                                       "not speak TLS; check SUPERLINK_ADDRESS (the coordinator's gateway port)")
    except OSError as err:
        return Result("FAILED", "tls", f"connection to {s.address} dropped during the TLS handshake ({err})")
    return Result("ok", "tls", f"{version}, certificate for {host} issued by the federation's CA {s.ca}")


def check_health(s: Settings) -> tuple[Result, str | None]:
    """GET /health; also returns the response's Date header for the clock check."""
    url = f"https://{s.address}/health"
    try:
        with urllib.request.urlopen(url, context=tls_context(s), timeout=10) as response:
            return Result("ok", "health", f"GET {url}: {response.status}"), response.headers.get("Date")
    except urllib.error.HTTPError as err:
        return (Result("FAILED", "health", f"GET {url} answered {err.code} {err.reason}: the address answers but "
                                           "is not the federation's gateway, or the SuperLink behind it is down; ask "
                                           "the coordinator"), err.headers.get("Date"))
    except (urllib.error.URLError, OSError) as err:
        return Result("FAILED", "health", f"GET {url} failed ({getattr(err, 'reason', err)})"), None


def clock_skew(date_header: str, local_now: float) -> float:
    """This host's clock minus the server's, in seconds, from an HTTP Date header.

    The header is truncated to the second: compare with its middle."""
    server = email.utils.parsedate_to_datetime(date_header).timestamp() + 0.5
    return local_now - server


def clock_verdict(skew: float) -> Result:
    """Whether Flower's node authentication accepts requests signed by a clock `skew` s ahead."""
    where = f"{abs(skew):.1f} s {'ahead of' if skew >= 0 else 'behind'} the SuperLink's"
    fix = "sync this host's clock with NTP (e.g. `timedatectl set-ntp true`, chrony)"
    if skew >= AHEAD_LIMIT:
        return Result("FAILED", "clock", f"this host's clock is {where}: Flower's node authentication refuses "
                                         f"signatures more than {AHEAD_LIMIT:.0f} s in the SuperLink's future; {fix}")
    if skew <= -BEHIND_LIMIT:
        return Result("FAILED", "clock", f"this host's clock is {where}: Flower's node authentication refuses "
                                         f"signatures older than {BEHIND_LIMIT:.0f} s; {fix}")
    if skew >= AHEAD_WARN or skew <= -BEHIND_WARN:
        return Result("warn", "clock", f"this host's clock is {where}, close to what node authentication tolerates "
                                       f"({BEHIND_LIMIT:.0f} s behind to {AHEAD_LIMIT:.0f} s ahead); {fix}")
    return Result("ok", "clock", f"{where} (node authentication tolerates {BEHIND_LIMIT:.0f} s behind to "
                                 f"{AHEAD_LIMIT:.0f} s ahead)")


def check_clock(date_header: str | None) -> Result:
    if not date_header:
        return Result("warn", "clock", "the SuperLink's answer carried no Date header: cannot compare clocks; "
                                       "keep this host's clock synced with NTP")
    return clock_verdict(clock_skew(date_header, time.time()))


# ------------------------------------------------------------------------------ node key and registration


def key_fingerprint(public_key) -> str:
    """SHA256 fingerprint as `ssh-keygen -l` prints it for the .pub file."""
    from cryptography.hazmat.primitives import serialization

    line = public_key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    digest = hashlib.sha256(base64.b64decode(line.split()[1])).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def check_key(s: Settings) -> tuple[Result, object | None]:
    """Load the key as flower-supernode does (OpenSSH, no passphrase, EC on a NIST curve)."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key
    from flwr.supercore.primitives.asymmetric import uses_nist_ec_curve

    make_key = f"create it with `make org-key ORG={s.org}` and have the coordinator register its .pub"
    try:
        data = s.key.read_bytes()
    except FileNotFoundError:
        return Result("FAILED", "key", f"no node key at {s.key}: {make_key}"), None
    except PermissionError:
        return Result("FAILED", "key", f"{s.key} is not readable as {whoami()}: the node could not read it either; "
                                       "restore the container's entrypoint (it copies the key for this user)"), None
    try:
        key = load_ssh_private_key(data, None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as err:
        return Result("FAILED", "key", f"{s.key} is not an unencrypted OpenSSH private key ({err}): {make_key}"), None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not uses_nist_ec_curve(key.public_key()):
        return Result("FAILED", "key", f"{s.key} is not an ECDSA key on a NIST curve, which Flower's node "
                                       f"authentication needs: {make_key}"), None
    return Result("ok", "key", f"{s.key}: ECDSA {key.curve.name}, {key_fingerprint(key.public_key())}"), key


def check_registration(s: Settings, key, after_exit_305: bool = False) -> Result:
    import httpx
    from flwr.proto.fleet_pb2 import ActivateNodeRequest  # pylint: disable=E0611
    from flwr.supercore.error.base import FlowerError
    from flwr.supercore.interceptors.http.runtime_version import RuntimeVersionHttpInterceptor
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes
    from flwr.supernode.fleet_http_client import FleetHttpClient
    from flwr.supernode.node_auth_http_interceptor import NodeAuthHttpInterceptor

    fingerprint = key_fingerprint(key.public_key())
    request = ActivateNodeRequest(public_key=public_key_to_bytes(key.public_key()), heartbeat_interval=0)
    interceptors = [RuntimeVersionHttpInterceptor(component_name="SuperNode"),
                    NodeAuthHttpInterceptor(key, key.public_key())]
    try:
        # No retry invoker: Flower's would SIGINT this process on HTTP 401.
        with FleetHttpClient.from_server_address(s.address, False, s.ca.read_bytes(), interceptors=interceptors) as client:
            client.ActivateNode(request)
    except SystemExit as err:  # flwr_exit() on a runtime version the SuperLink refuses
        return Result("FAILED", "registration", f"the SuperLink refuses this Flower version ({err}): build the "
                                                "node's image from the coordinator's release of this repository")
    except httpx.HTTPStatusError as err:
        status = err.response.status_code
        error = FlowerError.from_json(err.response.text)
        code = error.code if error else None
        if code == 2003:  # FLEET_INVALID_HEARTBEAT_INTERVAL: the key is known; nothing was activated
            if after_exit_305:
                return Result("FAILED", "registration", f"key {fingerprint} is registered, yet the SuperLink refused "
                                                        "to activate this node: another SuperNode with this key is "
                                                        "already connected. Run one node per organisation: stop the "
                                                        "other one; after a crash the SuperLink frees the key within "
                                                        "about 60 s")
            return Result("ok", "registration", f"key {fingerprint} is registered with the federation (a node "
                                                "already online with this key would still be refused when joining)")
        if code == 2004:  # FLEET_NODE_ACTIVATION_FAILED before any change: the key is unknown
            return Result("FAILED", "registration", f"this organisation's node key ({fingerprint}) is not registered "
                                                    f"with the federation: {REGISTER_FIX.format(org=s.org)}")
        if status == 401:
            return Result("FAILED", "registration", "the SuperLink rejected the node's signed request (HTTP 401): "
                                                    "this host's clock is off (see the clock check), or a proxy "
                                                    "between you strips the flwr-public-key/flwr-signature/"
                                                    "flwr-timestamp headers")
        if status == 403:
            return Result("FAILED", "registration", f"{s.address} forbids Flower's Fleet API (HTTP 403): it is not "
                                                    "the federation's gateway, or the gateway is misconfigured; ask "
                                                    "the coordinator")
        return Result("FAILED", "registration", f"unexpected answer to ActivateNode: HTTP {status} "
                                                f"{error.message if error else err.response.text[:200]!r}")
    except httpx.HTTPError as err:
        return Result("FAILED", "registration", f"ActivateNode to {s.address} failed ({err}): see the checks above")
    # A SuperLink that accepts interval 0 is not the flwr 1.41 this probe was written against.
    return Result("warn", "registration", f"the SuperLink activated key {fingerprint} despite heartbeat interval 0: "
                                          "the key is registered; this SuperLink's Flower differs from 1.41")


# ------------------------------------------------------------------------------ the node's two containers

# What `make org-key` writes (certs/node_key.py): 32 random bytes as hex.
MIN_SECRET_BYTES = 32


def check_secret(s: Settings) -> Result:
    """The secret the SuperNode asks of the ClientApp container's SuperExec (docs/isolation.md)."""
    make = f"`make org-key ORG={s.org}` creates it (certs/nodes/{s.org}.superexec.secret) and keeps your node key"
    try:
        size = len(s.secret.read_bytes().strip())
    except FileNotFoundError:
        return Result("FAILED", "secret", f"no SuperExec secret at {s.secret}: {make}")
    except PermissionError:
        return Result("FAILED", "secret", f"{s.secret} is not readable as {whoami()}: restore the container's "
                                          "entrypoint (it copies the secret for this user)")
    if size < MIN_SECRET_BYTES:
        return Result("FAILED", "secret", f"the SuperExec secret at {s.secret} has {size} bytes, fewer than "
                                          f"{MIN_SECRET_BYTES}: delete certs/nodes/{s.org}.superexec.secret, then {make}")
    return Result("ok", "secret", f"{s.secret}: {size} bytes; the SuperNode's ClientAppIo API answers only the "
                                  "ClientApp container, which holds the same")


def check_relay(s: Settings) -> Result:
    """What the relay between the two containers needs: socat in the image, a writable shared volume."""
    probe = s.relay_dir / f".preflight-{os.getpid()}"
    try:
        probe.touch()
        probe.unlink()
    except OSError as err:
        return Result("FAILED", "relay", f"cannot write to {s.relay_dir} as {whoami()} ({err.strerror or err}): the "
                                         "relay's sockets go there; remove the `relay` volume (`make join-down`, "
                                         "then `docker volume rm fedlora-{s.org}_relay`) so that it is made again")
    socat = shutil.which("socat")
    if socat is None:
        return Result("FAILED", "relay", "socat is not in this image, and the node's two containers talk through it: "
                                         "build the node's images from this repository (`make join-check` does)")
    found = re.search(r"socat version (\S+)", subprocess.run([socat, "-V"], capture_output=True, text=True).stdout)
    version = found.group(1) if found else "(version unknown)"
    return Result("ok", "relay", f"socat {version}; {s.relay_dir} (shared with the ClientApp container) is writable")


# ------------------------------------------------------------------------------ data and GPU


def check_data(s: Settings) -> Result:
    try:
        from app.data import DataError, discover
    except ImportError as err:
        return Result("FAILED", "data", f"cannot import app.data ({err}): run the preflight from the repository "
                                        "(`make join-check` mounts app/ for it)")
    unreadable_fix = (f"make the folder and its files readable to {whoami()}, the node's user (e.g. on the host: "
                      "`chmod -R o+rX FOLDER`, or a group the node shares)")
    try:
        examples = discover(s.data_dir, s.default_caption)
    except DataError as err:
        hint = ("; with `make join`: NODE_CONFIG_EXTRA=default-caption=\"...\" in docker/join/org.env"
                if "default-caption" in str(err) else "")
        return Result("FAILED", "data", f"{err.detail}{hint}")  # this organisation's own screen: names included
    except PermissionError as err:
        return Result("FAILED", "data", f"cannot read {err.filename or s.data_dir} as {whoami()}: {unreadable_fix}")
    unreadable = [e.path.name for e in examples if not os.access(e.path, os.R_OK)]
    source = "metadata.jsonl" if (s.data_dir / "metadata.jsonl").is_file() else "default-caption"
    if len(unreadable) == len(examples):
        return Result("FAILED", "data", f"none of the {len(examples)} images in {s.data_dir} is readable as "
                                        f"{whoami()}: {unreadable_fix}")
    if unreadable:
        return Result("warn", "data", f"{len(unreadable)} of {len(examples)} images are not readable as {whoami()} "
                                      f"and will be skipped (e.g. {unreadable[0]}): {unreadable_fix}")
    return Result("ok", "data", f"{len(examples)} captioned images in {s.data_dir} (captions from {source})")


def check_gpu(s: Settings) -> Result:
    fix = ("install the NVIDIA Container Toolkit and restart Docker; `docker run --rm --gpus all "
           "nvidia/cuda:12.8.1-base-ubuntu24.04 nvidia-smi` must list the GPU; check NODE_GPU's device ids")
    try:
        import torch
    except ImportError:
        return Result("FAILED", "gpu", "torch is not installed in this image: run the node's image (make join-gpu)")
    if torch.version.cuda is None:
        return Result("FAILED", "gpu", "this image's torch is a CPU build: use the GPU overlay's app-cuda image "
                                       "(`make join-gpu` builds it)")
    if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
        visible = os.environ.get("NVIDIA_VISIBLE_DEVICES", "unset")
        return Result("FAILED", "gpu", f"a GPU was requested but this container sees none (torch.cuda.is_available() "
                                       f"is False, NVIDIA_VISIBLE_DEVICES={visible}): {fix}")
    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    if s.gpu_ids and len(names) != len(s.gpu_ids):
        return Result("FAILED", "gpu", f"NODE_GPU={','.join(s.gpu_ids)} names {len(s.gpu_ids)} GPU(s), this container "
                                       f"sees {len(names)} ({', '.join(names)}): {fix}")
    try:  # the node's own rule (app/parallel.py), as the data check uses app/data.py
        from app.config import ConfigError, NodeConfig
        from app.parallel import processes_for

        node = NodeConfig.from_flower({"data-dir": str(s.data_dir), "org": s.org, "train-processes": s.train_processes})
        processes = processes_for(node.train_processes)
    except ImportError as err:
        return Result("FAILED", "gpu", f"cannot import app.parallel ({err}): run the preflight from the repository "
                                       "(`make join-check` mounts app/ for it)")
    except ConfigError as err:
        return Result("FAILED", "gpu", f"{err} (NODE_CONFIG_EXTRA)")
    return Result("ok", "gpu", f"{len(names)} visible: {', '.join(names)} (CUDA {torch.version.cuda}); trains on "
                               f"{processes} process(es), train-processes={s.train_processes}")


# ------------------------------------------------------------------------------ main


def run_checks(s: Settings, skip: set[str] = frozenset(), after_exit_305: bool = False) -> list[Result]:
    results = check_settings(s)
    settings_ok = all(r.status != "FAILED" for r in results)
    reach = check_reachable(s) if settings_ok else Result("skip", "reachable", "needs a valid SUPERLINK_ADDRESS")
    results.append(reach)
    tls = check_tls(s) if reach.status == "ok" else Result("skip", "tls", "needs a reachable SuperLink")
    results.append(tls)
    if tls.status == "ok":
        health, date = check_health(s)
        results += [health, check_clock(date)]
    else:
        results += [Result("skip", "health", "needs a TLS connection"), Result("skip", "clock", "needs /health")]
    key_result, key = check_key(s)
    results.append(key_result)
    if key is not None and tls.status == "ok":
        results.append(check_registration(s, key, after_exit_305))
    else:
        results.append(Result("skip", "registration", "needs a valid key and a TLS connection"))
    results.append(check_secret(s))
    if s.relay_dir is not None:
        results.append(check_relay(s))
    if "data" not in skip:
        results.append(check_data(s))
    if "gpu" not in skip and s.expect_gpu:
        results.append(check_gpu(s))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip", default="", help="comma-separated checks to leave out: data, gpu")
    parser.add_argument("--after-exit-305", action="store_true",
                        help="flower-supernode just failed to activate: a registered key means the key is in use")
    args = parser.parse_args(argv)
    settings = Settings.from_env(dict(os.environ))
    results = run_checks(settings, set(filter(None, args.skip.split(","))), args.after_exit_305)
    for result in results:
        print(result.line(), flush=True)
    failed = [r.name for r in results if r.status == "FAILED"]
    print(f"preflight: {len(failed)} check(s) failed: {', '.join(failed)}" if failed
          else f"preflight: ready to join as {settings.org}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
