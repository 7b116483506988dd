"""Certificates and credentials for a coordinator: `fedadapt certs init` and `fedadapt clients add`.

Layout of a TLS dir (what `--tls-dir` points at):

    ca.crt  ca.key (0600)            the private CA; ca.crt is what clients trust
    server.crt  server.key (0600)    the coordinator's certificate, signed by the CA
    admin/{name,token,ca.crt}        credentials for the Control service (`fedadapt run ...`)
    clients/NAME/{name,token,ca.crt} one credentials dir per client, to copy to that machine

TLS only authenticates the server; a client proves who it is with its bearer token (gRPC metadata), whose
sha256 the coordinator's store keeps. Tokens are never regenerated behind a user's back: issuing
credentials again keeps the token already on disk, so a re-run cannot lock out deployed clients.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
import secrets
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedadapt.core.errors import ConfigError
from fedadapt.core.files import write_atomic

ADMIN_NAME = "admin"
CLIENT_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
ALWAYS_HOSTS = ("localhost", "127.0.0.1")
CA_DAYS = 10 * 365
SERVER_DAYS = 2 * 365
# Certificates start slightly in the past so a peer whose clock lags a little still accepts them.
_BACKDATE = dt.timedelta(minutes=5)


def check_client_name(name: str) -> str:
    """`name` if it is a valid client name, else a ConfigError. Names become directory names and
    metadata values, so they are kept to a portable, printable alphabet."""
    if not isinstance(name, str) or not CLIENT_NAME_RE.fullmatch(name):
        raise ConfigError(
            f"invalid client name {name!r}: use 1-64 characters from A-Z a-z 0-9 . _ -, starting with a letter or digit"
        )
    if name == ADMIN_NAME:
        # The admin identity has its own credentials dir; a client of that name would be ambiguous.
        raise ConfigError(f"client name {ADMIN_NAME!r} is reserved for the Control service's credentials")
    return name


def init_certs(root: Path, hosts: list[str], clients: list[str] = (), force: bool = False) -> dict:
    """Create a CA, a server certificate for `hosts` (plus localhost and 127.0.0.1), admin credentials
    and one credentials dir per client under `root`.

    Refuses to replace an existing CA unless `force`; with `force` the CA and server key are new, every
    existing credentials dir under `root` gets the new ca.crt, and existing tokens are kept.

    Returns {"root", "ca_cert", "ca_key", "server_cert", "server_key", "hosts", "admin", "clients"}, where
    "hosts" lists the certificate's SANs and "clients" the credentials dirs made, in the order given.
    """
    root = Path(root)
    names = [check_client_name(c) for c in _unique(clients)]
    sans = _san_entries(hosts)  # validate everything before writing anything
    ca_cert_path, ca_key_path = root / "ca.crt", root / "ca.key"
    if (ca_cert_path.exists() or ca_key_path.exists()) and not force:
        raise ConfigError(
            f"a CA already exists in {root}: pass --force to replace it "
            "(every client then needs its new ca.crt)"
        )
    if root.exists() and not root.is_dir():
        raise ConfigError(f"{root} exists and is not a directory")
    root.mkdir(parents=True, exist_ok=True)

    now = dt.datetime.now(dt.timezone.utc) - _BACKDATE
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedadapt"),
                         x509.NameAttribute(NameOID.COMMON_NAME, "fedadapt CA")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(key_cert_sign=True, crl_sign=True, digital_signature=True), critical=True)
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedadapt"),
                                 x509.NameAttribute(NameOID.COMMON_NAME, _first_host(hosts))]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=SERVER_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(digital_signature=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(server_key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    # Keys first and the CA certificate last, so an interrupted run leaves no ca.crt without its key.
    _write(root / "server.key", _key_pem(server_key), secret=True)
    _write(root / "server.crt", server_cert.public_bytes(serialization.Encoding.PEM))
    _write(ca_key_path, _key_pem(ca_key), secret=True)
    _write(ca_cert_path, ca_cert.public_bytes(serialization.Encoding.PEM))

    admin_dir = _write_credentials(root / ADMIN_NAME, ADMIN_NAME, _ca_pem(root))
    if force:  # existing clients keep their tokens but must trust the new CA
        for existing in sorted((root / "clients").glob("*/token")):
            _write(existing.parent / "ca.crt", ca_cert_path.read_bytes())
    issued = [issue_credentials(root, name) for name in names]
    return {
        "root": root,
        "ca_cert": ca_cert_path,
        "ca_key": ca_key_path,
        "server_cert": root / "server.crt",
        "server_key": root / "server.key",
        "hosts": [str(v.value) for v in sans],
        "admin": admin_dir,
        "clients": issued,
    }


def issue_credentials(root: Path, name: str) -> Path:
    """Write `root/clients/NAME/{name,token,ca.crt}` and return that dir. A token already there is kept
    (idempotent); ca.crt is refreshed from `root/ca.crt`."""
    root = Path(root)
    check_client_name(name)
    return _write_credentials(root / "clients" / name, name, _ca_pem(root))


def token_credentials(cred_dir: Path, name: str) -> Path:
    """Write `cred_dir/{name,token}` with no ca.crt, for a coordinator run with --insecure (no TLS dir).
    A token already there is kept, as with `issue_credentials`."""
    check_client_name(name)
    return _write_credentials(Path(cred_dir), name, None)


def server_credentials(tls_dir: Path) -> grpc.ServerCredentials:
    """TLS credentials for the coordinator from `tls_dir/server.{key,crt}`; clients are not asked for
    certificates (they authenticate with tokens)."""
    tls_dir = Path(tls_dir)
    key_pem = _read_tls_file(tls_dir / "server.key")
    cert_pem = _read_tls_file(tls_dir / "server.crt")
    # gRPC reports a bad key or certificate only as a failed handshake on the client; check here instead.
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"unreadable TLS key or certificate in {tls_dir}: {exc}") from None
    if key.public_key() != cert.public_key():
        raise ConfigError(f"{tls_dir / 'server.key'} does not belong to {tls_dir / 'server.crt'}")
    if cert.not_valid_after_utc <= dt.datetime.now(dt.timezone.utc):
        raise ConfigError(
            f"the server certificate {tls_dir / 'server.crt'} expired on {cert.not_valid_after_utc:%Y-%m-%d}"
        )
    return grpc.ssl_server_credentials([(key_pem, cert_pem)], require_client_auth=False)


def admin_token(tls_dir: Path) -> str:
    """The Control service's token, from `tls_dir/admin/token`."""
    path = Path(tls_dir) / ADMIN_NAME / "token"
    try:
        token = path.read_text().strip()
    except FileNotFoundError:
        raise ConfigError(f"no admin token at {path}: create it with `fedadapt certs init {tls_dir}`") from None
    if not token:
        raise ConfigError(f"the admin token file {path} is empty")
    return token


# ---------------------------------------------------------------- helpers


def _ca_pem(root: Path) -> bytes:
    try:
        return (root / "ca.crt").read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"no CA in {root}: run `fedadapt certs init {root}` first") from None


def _write_credentials(cred_dir: Path, name: str, ca_pem: bytes | None) -> Path:
    if cred_dir.exists() and not cred_dir.is_dir():
        raise ConfigError(f"{cred_dir} exists and is not a directory")
    existing_name = (cred_dir / "name").read_text().strip() if (cred_dir / "name").is_file() else name
    if existing_name != name:  # keeping the token would hand one client's secret to another
        raise ConfigError(f"{cred_dir} holds credentials for {existing_name!r}, not {name!r}")
    cred_dir.mkdir(parents=True, exist_ok=True)
    token_path = cred_dir / "token"
    if not (token_path.is_file() and token_path.read_text().strip()):
        _write(token_path, (secrets.token_urlsafe(32) + "\n").encode(), secret=True)
    _write(cred_dir / "name", (name + "\n").encode())
    if ca_pem is not None:
        _write(cred_dir / "ca.crt", ca_pem)
    return cred_dir


def _write(path: Path, data: bytes, secret: bool = False) -> None:
    """Replace `path` atomically; a secret is 0600 from the start (no window where it is not)."""
    write_atomic(path, data, 0o600 if secret else 0o644)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _key_usage(**on: bool) -> x509.KeyUsage:
    flags = dict.fromkeys(("digital_signature", "content_commitment", "key_encipherment", "data_encipherment",
                           "key_agreement", "key_cert_sign", "crl_sign", "encipher_only", "decipher_only"), False)
    flags.update(on)
    return x509.KeyUsage(**flags)


def _unique(items) -> list[str]:
    if isinstance(items, str):  # "a, b" as a user types it
        items = [item.strip() for item in items.split(",") if item.strip()]
    out: list[str] = []
    for item in items or ():
        if item not in out:
            out.append(item)
    return out


def _first_host(hosts: list[str]) -> str:
    given = _unique(hosts)
    return given[0] if given else "localhost"


def _san_entries(hosts: list[str]) -> list[x509.GeneralName]:
    entries: list[x509.GeneralName] = []
    for host in _unique([*_unique(hosts), *ALWAYS_HOSTS]):
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(host)))
            continue
        except (ValueError, TypeError):
            pass
        # A DNS name (a leading "*." wildcard allowed); anything else would only fail later, at handshake.
        if not isinstance(host, str) or len(host) > 253 \
                or not re.fullmatch(r"(\*\.)?[A-Za-z0-9_][A-Za-z0-9_-]{0,62}(\.[A-Za-z0-9_-]{1,63})*\.?", host):
            raise ConfigError(f"invalid host {host!r}: give DNS names or IP addresses, "
                              "e.g. --hosts coordinator,10.0.0.5")
        entries.append(x509.DNSName(host))
    return entries


def _read_tls_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(
            f"no {path.name} in {path.parent}: create it with `fedadapt certs init {path.parent} --hosts HOST` "
            "or run with --insecure"
        ) from None
