"""Tests for certs/certs.py: files, modes, idempotence, a real TLS handshake, check()."""

from __future__ import annotations

import datetime as dt
import importlib.util
import socket
import ssl
import stat
import sys
import threading
from pathlib import Path

import pytest
from cryptography import x509

ROOT = Path(__file__).resolve().parents[1]

# certs/ is a folder of files, not a package: load the script by path.
_spec = importlib.util.spec_from_file_location("certs_tool", ROOT / "certs" / "certs.py")
certs = importlib.util.module_from_spec(_spec)
sys.modules["certs_tool"] = certs
_spec.loader.exec_module(certs)


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def made(tmp_path: Path) -> Path:
    certs.generate(tmp_path, [])
    return tmp_path


# --------------------------------------------------------------------------- generate


def test_generate_creates_files_with_modes(made: Path) -> None:
    assert sorted(p.name for p in made.iterdir()) == [
        "ca.key", "ca.pem", "grafana.env", "server.key", "server.pem", "superexec.secret"]
    for secret in ("ca.key", "server.key", "superexec.secret", "grafana.env"):
        assert (made / secret).stat().st_mode & 0o777 == 0o600, secret
    assert mode(made / "ca.key") == 0o600
    assert mode(made / "server.key") == 0o600
    assert mode(made / "ca.pem") == 0o644
    assert mode(made / "server.pem") == 0o644


def test_generate_certificate_contents(tmp_path: Path) -> None:
    certs.generate(tmp_path, ["fl.example.org", "203.0.113.7"], days=100)
    ca, server = load(tmp_path / "ca.pem"), load(tmp_path / "server.pem")

    assert ca.subject.rfc4514_string() == "CN=Flower federation CA"
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign

    assert server.subject.rfc4514_string() == "CN=superlink"
    assert certs.cert_sans(server) == ["superlink", "gateway", "localhost", "127.0.0.1", "fl.example.org", "203.0.113.7"]
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "203.0.113.7"]
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]
    assert 99 * 86400 < certs.seconds_until_expiry(tmp_path / "server.pem") <= 100 * 86400


def test_rerun_keeps_ca_and_server_cert(made: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = {name: (made / name).read_bytes() for name in ("ca.pem", "ca.key", "server.pem", "server.key")}
    capsys.readouterr()
    certs.generate(made, [])
    after = {name: (made / name).read_bytes() for name in before}
    assert after == before
    out = capsys.readouterr().out
    assert "kept existing CA" in out and "server" in out and "kept" in out


def test_new_san_reissues_server_cert_with_same_ca(made: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ca_before = (made / "ca.pem").read_bytes()
    server_before = (made / "server.pem").read_bytes()
    capsys.readouterr()

    certs.generate(made, ["fl.example.org"])

    assert (made / "ca.pem").read_bytes() == ca_before
    assert (made / "server.pem").read_bytes() != server_before
    server = load(made / "server.pem")
    assert "fl.example.org" in certs.cert_sans(server)
    assert certs.signed_by(server, load(made / "ca.pem"))
    assert "did not cover fl.example.org" in capsys.readouterr().out
    assert certs.check(made, ["fl.example.org"]) == []


def test_expiring_server_cert_is_reissued(made: Path) -> None:
    _install_server_cert(made, days_left=10)
    certs.generate(made, [])
    assert certs.seconds_until_expiry(made / "server.pem") > 800 * 86400


def test_server_cert_from_other_ca_is_reissued(made: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    other = tmp_path_factory.mktemp("other")
    certs.generate(other, [])
    for name in ("server.pem", "server.key"):
        (made / name).write_bytes((other / name).read_bytes())
    assert any("not signed by" in p for p in certs.check(made, []))
    certs.generate(made, [])
    assert certs.check(made, []) == []


def test_generate_fails_when_the_certificate_lacks_a_requested_name(made: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    issue = certs.issue_server
    monkeypatch.setattr(certs, "issue_server", lambda key, ca, sans, *a: issue(key, ca, sans[:-1], *a))
    with pytest.raises(certs.CertError, match=r"server.pem does not cover 'fl.example.org'"):
        certs.generate(made, ["fl.example.org"])
    assert certs.main(["generate", "--dir", str(made), "--san", "fl.example.org"]) == 1


def test_the_printed_fix_is_what_make_certs_passes_on() -> None:
    # `check` tells the operator to run `make certs SANS=...`: the Makefile must hand that very
    # variable to certs.py under the name it reads, and the docs must name no other.
    makefile = (ROOT / "Makefile").read_text()
    tool_line = next(line for line in makefile.splitlines() if line.startswith("CERTS_TOOL ="))
    assert f'-e {certs.SANS_ENV}="$(SANS)"' in tool_line
    assert certs.SANS_ENV == "SANS"
    for path in ("Makefile", "README.md", "certs/README.md", "certs/certs.py"):
        text = (ROOT / path).read_text()
        assert "SUPERLINK_SANS" not in text, path
    assert "make certs SANS=" in (ROOT / "certs" / "README.md").read_text()


def test_missing_ca_key_is_an_error(made: Path) -> None:
    (made / "ca.key").unlink()
    ca_before = (made / "ca.pem").read_bytes()
    with pytest.raises(certs.CertError, match="ca.key is missing"):
        certs.generate(made, ["new.example.org"])
    assert (made / "ca.pem").read_bytes() == ca_before


def test_sans_from_env_and_cli(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SANS", "a.example.org, 10.0.0.1  b.example.org")
    assert certs._sans_from(["c.example.org,A.example.org"]) == [
        "c.example.org", "a.example.org", "10.0.0.1", "b.example.org"
    ]
    with pytest.raises(certs.CertError, match="invalid SAN"):
        certs.parse_sans(["https://fl.example.org:9092"])


# --------------------------------------------------------------------------- TLS


def _handshake(server_dir: Path, ca_file: Path, hostname: str) -> None:
    """Serve one TLS connection with server.pem/key and connect trusting only ca_file."""
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(server_dir / "server.pem", server_dir / "server.key")

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        conn, _ = listener.accept()
        try:
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                tls.sendall(b"ok")
        except (ssl.SSLError, OSError):
            pass  # the client rejected us; the client side asserts on that

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        client_ctx = ssl.create_default_context(cafile=str(ca_file))
        # What Python 3.13+ does by default; keeps the certificates future-proof.
        client_ctx.verify_flags |= ssl.VERIFY_X509_STRICT
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
            with client_ctx.wrap_socket(raw, server_hostname=hostname) as tls:
                assert tls.recv(2) == b"ok"
    finally:
        thread.join(timeout=5)
        listener.close()


@pytest.mark.parametrize("hostname", ["localhost", "superlink", "127.0.0.1"])
def test_tls_handshake_with_own_ca(made: Path, hostname: str) -> None:
    _handshake(made, made / "ca.pem", hostname)


def test_tls_handshake_fails_with_other_ca(made: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    other = tmp_path_factory.mktemp("other-ca")
    certs.generate(other, [])
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(made, other / "ca.pem", "localhost")


def test_tls_handshake_fails_for_uncovered_name(made: Path) -> None:
    with pytest.raises(ssl.SSLCertVerificationError, match="match|mismatch"):
        _handshake(made, made / "ca.pem", "fl.example.org")


def test_grpc_handshake(made: Path) -> None:
    """Flower speaks gRPC (BoringSSL, not OpenSSL): make sure it accepts the files too."""
    grpc = pytest.importorskip("grpc")
    from concurrent import futures

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    creds = grpc.ssl_server_credentials(
        [((made / "server.key").read_bytes(), (made / "server.pem").read_bytes())]
    )
    port = server.add_secure_port("127.0.0.1:0", creds)
    server.start()
    try:
        channel = grpc.secure_channel(
            f"127.0.0.1:{port}",
            grpc.ssl_channel_credentials((made / "ca.pem").read_bytes()),
            options=[("grpc.ssl_target_name_override", "superlink")],
        )
        grpc.channel_ready_future(channel).result(timeout=10)
        channel.close()
    finally:
        server.stop(None)


# --------------------------------------------------------------------------- check


def _install_server_cert(dir: Path, days_left: float, sans: list[str] | None = None) -> None:
    """Replace server.pem/key with one from the same CA, ending `days_left` from now."""
    ca_key = certs._load_key(dir / "ca.key")
    ca = load(dir / "ca.pem")
    end = dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=days_left)
    key, cert = certs.issue_server(
        ca_key, ca, certs.required_sans(sans or []), end - dt.timedelta(days=90), end
    )
    certs._write_key(dir / "server.key", key)
    certs._write_cert(dir / "server.pem", cert)


def test_check_passes(made: Path) -> None:
    assert certs.check(made, []) == []
    assert certs.main(["check", "--dir", str(made)]) == 0


def test_check_cli_ok_line(made: Path, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert certs.main(["check", "--dir", str(made)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("OK:")


@pytest.mark.parametrize("name", ["ca.pem", "server.pem", "server.key"])
def test_check_missing_file(made: Path, name: str) -> None:
    if name == "ca.pem":
        (made / "ca.key").unlink()  # with ca.key still there the fix differs (below)
    (made / name).unlink()
    problems = certs.check(made, [])
    assert len(problems) == 1
    assert f"{name} missing: run `make certs`" in problems[0]


def test_check_ca_pem_missing_but_key_present(made: Path) -> None:
    (made / "ca.pem").unlink()
    problems = certs.check(made, [])
    assert len(problems) == 1
    assert "ca.pem missing but ca.key is there: restore ca.pem" in problems[0]
    with pytest.raises(certs.CertError, match="restore ca.pem"):
        certs.generate(made, [])


def test_check_everything_missing(tmp_path: Path) -> None:
    problems = certs.check(tmp_path / "nope", [])
    assert [p.split(":")[0].rsplit("/", 1)[-1] for p in problems] == [
        "ca.pem missing", "server.pem missing", "server.key missing",
        "superexec.secret missing", "grafana.env missing",
    ]


def test_check_san_not_covered(made: Path, capsys: pytest.CaptureFixture[str]) -> None:
    problems = certs.check(made, ["fl.example.org"])
    assert problems == [
        f"{certs._show(made / 'server.pem')} does not cover 'fl.example.org': "
        "run `make certs SANS=fl.example.org`"
    ]
    capsys.readouterr()
    assert certs.main(["check", "--dir", str(made), "--san", "fl.example.org"]) == 1
    assert "does not cover 'fl.example.org'" in capsys.readouterr().err


def test_check_san_from_env(made: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SANS", "10.1.2.3")
    assert certs.main(["check", "--dir", str(made)]) == 1


def test_check_expired(made: Path) -> None:
    _install_server_cert(made, days_left=-3)
    problems = certs.check(made, [])
    assert len(problems) == 1
    assert "server.pem expired on" in problems[0] and "make certs" in problems[0]
    assert certs.seconds_until_expiry(made / "server.pem") < 0


def test_check_min_days(made: Path) -> None:
    _install_server_cert(made, days_left=10)
    assert certs.check(made, [], min_days=1) == []
    problems = certs.check(made, [], min_days=20)
    assert len(problems) == 1 and "within 20 days" in problems[0]


def test_check_key_mismatch(made: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    other = tmp_path_factory.mktemp("other-key")
    certs.generate(other, [])
    (made / "server.key").write_bytes((other / "server.key").read_bytes())
    problems = certs.check(made, [])
    assert len(problems) == 1
    assert "server.key does not match" in problems[0] and "make certs" in problems[0]
    # generate repairs it instead of keeping a cert the server cannot use
    certs.generate(made, [])
    assert certs.check(made, []) == []


def test_check_not_signed_by_ca(made: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    other = tmp_path_factory.mktemp("other-ca")
    certs.generate(other, [])
    (made / "ca.pem").write_bytes((other / "ca.pem").read_bytes())
    problems = certs.check(made, [])
    assert any("is not signed by" in p for p in problems)


def test_modes_do_not_depend_on_umask(tmp_path: Path) -> None:
    import os

    old = os.umask(0o077)
    try:
        certs.generate(tmp_path, [])
    finally:
        os.umask(old)
    assert mode(tmp_path / "ca.pem") == 0o644 and mode(tmp_path / "server.key") == 0o600


def test_cli_generate_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert certs.main(["generate", "--dir", str(tmp_path), "--san", "fl.example.org"]) == 0
    out = capsys.readouterr().out
    assert "created" in out and "fl.example.org" in out and "days left" in out
    (tmp_path / "ca.key").unlink()
    assert certs.main(["generate", "--dir", str(tmp_path), "--san", "x.example.org"]) == 1
    assert "ca.key is missing" in capsys.readouterr().err


def test_expired_ca_is_reported_not_replaced(tmp_path: Path) -> None:
    now = dt.datetime.now(dt.timezone.utc)
    key, ca = certs.issue_ca(now - dt.timedelta(days=400), now - dt.timedelta(days=1))
    certs._write_key(tmp_path / "ca.key", key)
    certs._write_cert(tmp_path / "ca.pem", ca)
    with pytest.raises(certs.CertError, match="ca.pem expired on .*send the new ca.pem"):
        certs.generate(tmp_path, [])
    assert load(tmp_path / "ca.pem") == ca
