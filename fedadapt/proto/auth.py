"""Who is calling: the metadata every gRPC call carries, and the credentials dir it is read from. Shared by
the client daemon, the Control CLI (admin credentials) and the coordinator (the header names).

A credentials dir (made by `fedadapt certs init` / `fedadapt clients add` on the coordinator):

    name     the identity registered on the coordinator
    token    the bearer secret (keep it 0600); the coordinator stores only its sha256
    ca.crt   the CA that signed the coordinator's certificate (absent only for --insecure setups)

Imports nothing of fedadapt but core: an edge client installs without the coordinator's extras.
"""

from __future__ import annotations

import os
import stat
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from fedadapt.core.errors import ConfigError

# gRPC metadata keys every call carries; keys must be lowercase.
NAME_KEY = "x-fedadapt-name"
TOKEN_KEY = "x-fedadapt-token"


@dataclass(frozen=True)
class Credentials:
    name: str
    token: str = field(repr=False)  # never in logs or tracebacks
    ca_cert: bytes | None = field(default=None, repr=False)


def load_credentials(path: Path, name: str | None = None) -> Credentials:
    """Read a credentials dir. `name`, when given, must agree with the dir's `name` file (or stands in
    for it when the file is absent)."""
    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"credentials directory {path} does not exist (copy it from the coordinator's "
                          "`fedadapt clients add` output)")
    token_path = path / "token"
    try:
        token = token_path.read_text().strip()
        mode = token_path.stat().st_mode
    except FileNotFoundError:
        raise ConfigError(f"no token file in {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {token_path}: {exc}") from None
    if not token:
        raise ConfigError(f"the token file {token_path} is empty")
    # A metadata value must be printable ASCII; say so here rather than fail inside gRPC on the first call.
    if not (token.isascii() and token.isprintable()) or any(c.isspace() for c in token):
        raise ConfigError(f"the token in {token_path} has characters a token cannot have (whitespace or non-ASCII)")
    if os.name == "posix" and mode & (stat.S_IRWXG | stat.S_IRWXO):
        warnings.warn(f"{token_path} is accessible to other users; run `chmod 600 {token_path}`", stacklevel=2)

    name_path = path / "name"
    dir_name = name_path.read_text().strip() if name_path.is_file() else ""
    if name and dir_name and name != dir_name:
        raise ConfigError(f"--name {name!r} does not match the name {dir_name!r} in {name_path}")
    name = name or dir_name
    if not name:
        raise ConfigError(f"no client name: {name_path} is missing or empty and no --name was given")
    if not (name.isascii() and name.isprintable()):
        raise ConfigError(f"invalid client name {name!r} in {name_path}")

    ca_path = path / "ca.crt"
    ca_cert = ca_path.read_bytes() if ca_path.is_file() else None
    if ca_cert is not None and b"-----BEGIN CERTIFICATE-----" not in ca_cert:
        raise ConfigError(f"{ca_path} is not a PEM certificate")
    return Credentials(name=name, token=token, ca_cert=ca_cert)


def channel_credentials(creds: Credentials) -> grpc.ChannelCredentials:
    """TLS that trusts the dir's ca.crt; without one, the system's trusted roots (a coordinator behind a
    publicly trusted certificate)."""
    return grpc.ssl_channel_credentials(root_certificates=creds.ca_cert)


def metadata(creds: Credentials) -> tuple[tuple[str, str], ...]:
    """The metadata to send with every call."""
    return ((NAME_KEY, creds.name), (TOKEN_KEY, creds.token))
