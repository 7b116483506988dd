"""Certificates, credentials dirs, and a real TLS handshake on loopback."""

from __future__ import annotations

import ipaddress
import os
import stat
import warnings
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from fedadapt.core.errors import ConfigError, FedadaptError
from fedadapt.proto.auth import Credentials, channel_credentials, load_credentials, metadata
from fedadapt.server.certs import admin_token, init_certs, issue_credentials, server_credentials, token_credentials


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(scope="module")
def tls(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tls")
    init_certs(root, ["coordinator", "10.1.2.3"], ["client-0", "client-1"])
    return root


def test_chain_and_extensions(tls: Path):
    ca = x509.load_pem_x509_certificate((tls / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((tls / "server.crt").read_bytes())
    server.verify_directly_issued_by(ca)  # raises unless the CA signed it
    ca.verify_directly_issued_by(ca)
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey) and ca.public_key().curve.name == "secp256r1"
    assert ca.signature_hash_algorithm.name == "sha256" and server.signature_hash_algorithm.name == "sha256"

    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    ca_ku = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ca_ku.key_cert_sign and ca_ku.crl_sign
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert server.extensions.get_extension_for_class(x509.KeyUsage).value.digital_signature
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku

    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"coordinator", "localhost"}
    assert set(san.get_values_for_type(x509.IPAddress)) == {ipaddress.ip_address("10.1.2.3"),
                                                            ipaddress.ip_address("127.0.0.1")}
    ca_years = (ca.not_valid_after_utc - ca.not_valid_before_utc).days / 365
    server_years = (server.not_valid_after_utc - server.not_valid_before_utc).days / 365
    assert round(ca_years) == 10 and round(server_years) == 2

    key = serialization.load_pem_private_key((tls / "server.key").read_bytes(), password=None)
    assert key.public_key() == server.public_key()


def test_files_and_modes(tls: Path):
    assert _mode(tls / "ca.key") == 0o600 and _mode(tls / "server.key") == 0o600
    for cred in (tls / "admin", tls / "clients" / "client-0", tls / "clients" / "client-1"):
        assert (cred / "name").read_text().strip() == cred.name
        assert _mode(cred / "token") == 0o600
        assert len((cred / "token").read_text().strip()) >= 40  # token_urlsafe(32)
        assert (cred / "ca.crt").read_bytes() == (tls / "ca.crt").read_bytes()
    assert admin_token(tls) == (tls / "admin" / "token").read_text().strip()
    tokens = {(tls / p / "token").read_text() for p in ("admin", "clients/client-0", "clients/client-1")}
    assert len(tokens) == 3
    assert not list(tls.rglob("*.tmp"))


def test_refuses_to_replace_ca_unless_forced(tmp_path: Path):
    init_certs(tmp_path, ["coordinator"], ["a"])
    ca_before = (tmp_path / "ca.crt").read_bytes()
    token_before = (tmp_path / "clients" / "a" / "token").read_text()
    with pytest.raises(ConfigError, match="already exists.*--force") as info:
        init_certs(tmp_path, ["coordinator"])
    assert "\n" not in str(info.value)
    assert (tmp_path / "ca.crt").read_bytes() == ca_before

    out = init_certs(tmp_path, ["coordinator"], force=True)
    ca_after = (tmp_path / "ca.crt").read_bytes()
    assert ca_after != ca_before
    # existing clients keep their token and get the new CA
    assert (tmp_path / "clients" / "a" / "token").read_text() == token_before
    assert (tmp_path / "clients" / "a" / "ca.crt").read_bytes() == ca_after
    assert (out["admin"] / "ca.crt").read_bytes() == ca_after


def test_issue_credentials_is_idempotent(tls: Path):
    first = issue_credentials(tls, "client-9")
    token = (first / "token").read_text()
    again = issue_credentials(tls, "client-9")
    assert again == first == tls / "clients" / "client-9"
    assert (again / "token").read_text() == token
    creds = load_credentials(again)
    assert creds.name == "client-9" and creds.token == token.strip()
    assert creds.ca_cert == (tls / "ca.crt").read_bytes()


def test_issue_credentials_needs_a_ca(tmp_path: Path):
    with pytest.raises(ConfigError, match="certs init"):
        issue_credentials(tmp_path, "c")


def test_token_credentials_without_tls(tmp_path: Path):
    cred = token_credentials(tmp_path / "creds", "edge-1")
    token = (cred / "token").read_text()
    assert _mode(cred / "token") == 0o600 and not (cred / "ca.crt").exists()
    assert token_credentials(cred, "edge-1") == cred and (cred / "token").read_text() == token
    creds = load_credentials(cred)
    assert (creds.name, creds.ca_cert) == ("edge-1", None)
    # a dir holding another client's token is not reused under a new name
    with pytest.raises(ConfigError, match="holds credentials for 'edge-1'"):
        token_credentials(cred, "edge-2")


@pytest.mark.parametrize("bad", ["", "-x", ".hidden", "a/b", "a b", "é", "x" * 65, "../up", "admin", "a\n"])
def test_bad_client_names(tmp_path: Path, bad: str):
    with pytest.raises(ConfigError, match="name"):
        init_certs(tmp_path, ["coordinator"], ["ok", bad])
    assert not (tmp_path / "ca.crt").exists()  # nothing written when an argument is bad


def test_good_client_names(tmp_path: Path):
    names = ["a", "A1", "node.7_x-y", "9" + "z" * 63]
    out = init_certs(tmp_path, ["localhost"], names)
    assert out["clients"] == [tmp_path / "clients" / n for n in names]
    # comma-separated strings, as typed on a command line, work too
    out = init_certs(tmp_path / "csv", "coordinator, 10.0.0.5", "a, b,", force=True)
    assert [p.name for p in out["clients"]] == ["a", "b"] and out["hosts"][:2] == ["coordinator", "10.0.0.5"]


def test_bad_host(tmp_path: Path):
    with pytest.raises(ConfigError, match="invalid host"):
        init_certs(tmp_path, ["bad host"])


def test_server_credentials_errors(tmp_path: Path, tls: Path):
    with pytest.raises(ConfigError, match="no server.key.*certs init"):
        server_credentials(tmp_path)
    with pytest.raises(ConfigError, match="admin token"):
        admin_token(tmp_path)
    # a key from another CA run does not belong to this certificate
    other = tmp_path / "other"
    init_certs(other, ["x"])
    (tmp_path / "server.crt").write_bytes((tls / "server.crt").read_bytes())
    (tmp_path / "server.key").write_bytes((other / "server.key").read_bytes())
    with pytest.raises(ConfigError, match="does not belong"):
        server_credentials(tmp_path)
    assert isinstance(server_credentials(tls), grpc.ServerCredentials)


def _cred_dir(path: Path, token: str | None = "t0k3n", name: str | None = "alice", mode: int = 0o600) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    if token is not None:
        (path / "token").write_text(token)
        os.chmod(path / "token", mode)
    if name is not None:
        (path / "name").write_text(name + "\n")
    return path


def test_load_credentials_errors(tmp_path: Path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_credentials(tmp_path / "nope")
    with pytest.raises(ConfigError, match="no token"):
        load_credentials(_cred_dir(tmp_path / "a", token=None))
    with pytest.raises(ConfigError, match="empty"):
        load_credentials(_cred_dir(tmp_path / "b", token="\n"))
    with pytest.raises(ConfigError, match="does not match"):
        load_credentials(_cred_dir(tmp_path / "c"), name="bob")
    with pytest.raises(ConfigError, match="no client name"):
        load_credentials(_cred_dir(tmp_path / "d", name=None))
    with pytest.raises(ConfigError, match="characters"):
        load_credentials(_cred_dir(tmp_path / "e", token="two words"))
    bad_ca = _cred_dir(tmp_path / "f")
    (bad_ca / "ca.crt").write_text("not a cert")
    with pytest.raises(ConfigError, match="PEM"):
        load_credentials(bad_ca)
    assert issubclass(ConfigError, FedadaptError)  # so the CLI prints it as one line


def test_load_credentials_ok_and_warns_on_open_token(tmp_path: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        creds = load_credentials(_cred_dir(tmp_path / "ok"), name="alice")
    assert creds == Credentials("alice", "t0k3n", None)
    assert "t0k3n" not in repr(creds)
    assert metadata(creds) == (("x-fedadapt-name", "alice"), ("x-fedadapt-token", "t0k3n"))
    # the name file may be absent when --name is given
    assert load_credentials(_cred_dir(tmp_path / "n", name=None), name="bob").name == "bob"
    with pytest.warns(UserWarning, match="chmod 600"):
        load_credentials(_cred_dir(tmp_path / "open", mode=0o644))


# ---------------------------------------------------------------- a real TLS handshake


def _echo_server(tls_dir: Path) -> tuple[grpc.Server, int, list]:
    seen: list = []

    def echo(request: bytes, context: grpc.ServicerContext) -> bytes:
        seen.append(dict(context.invocation_metadata()))
        return request

    handler = grpc.method_handlers_generic_handler(
        "test.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(echo)})  # bytes in, bytes out
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), handlers=[handler])
    port = server.add_secure_port("127.0.0.1:0", server_credentials(tls_dir))
    server.start()
    return server, port, seen


def _call(target: str, creds: Credentials, timeout: float = 10) -> bytes:
    with grpc.secure_channel(target, channel_credentials(creds)) as channel:
        echo = channel.unary_unary("/test.Echo/Echo")  # no serializers: raw bytes
        return echo(b"ping", timeout=timeout, metadata=metadata(creds))


def test_tls_roundtrip_and_wrong_ca(tls: Path, tmp_path: Path):
    server, port, seen = _echo_server(tls)
    try:
        creds = load_credentials(tls / "clients" / "client-0")
        assert _call(f"localhost:{port}", creds) == b"ping"
        assert _call(f"127.0.0.1:{port}", creds) == b"ping"  # IP SAN
        assert seen[0]["x-fedadapt-name"] == "client-0" and seen[0]["x-fedadapt-token"] == creds.token

        # a client that trusts another CA refuses the server, promptly
        init_certs(tmp_path / "other", ["localhost"])
        stranger = Credentials(creds.name, creds.token, (tmp_path / "other" / "ca.crt").read_bytes())
        with pytest.raises(grpc.RpcError) as info:
            _call(f"localhost:{port}", stranger, timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert len(seen) == 2  # the token never reached the server
    finally:
        server.stop(None)
