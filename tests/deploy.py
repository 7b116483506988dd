"""Real deployments on 127.0.0.1 for integration tests: a coordinator process, client daemon
processes, and the Control CLI, each a `python -m fedadapt.cli` subprocess with its own log file.

Every wait is bounded; `Deployment.close` kills whatever is still running.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc

from fedadapt.proto import fedadapt_pb2 as pb
from fedadapt.proto import fedadapt_pb2_grpc as pb_grpc
from fedadapt.proto.auth import channel_credentials, load_credentials, metadata

REPO = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "fedadapt.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_text_file(path: Path, n_groups: int = 3, per_group: int = 12) -> Path:
    """Two labels that differ in vocabulary, one group ('who') per future client."""
    words = {0: ["apple", "pear", "plum"], 1: ["storm", "sword", "blood"]}
    with path.open("w") as f:
        for g in range(n_groups):
            for i in range(per_group):
                label = (g + i) % 2
                text = " ".join(words[label][(i + k) % 3] for k in range(4))
                f.write(json.dumps({"text": text, "label": ["sweet", "grim"][label], "who": f"role{g}"}) + "\n")
    return path


def lora_run_toml(data: Path, *, rounds: int = 3, clients_per_round: int = 3, min_clients: int = 3,
                  min_results: int = 1, local_steps: int = 2, extra: str = "") -> str:
    """FedAvg-LoRA on a tiny Llama, one client per 'who' group of `data`."""
    return f"""
name = "deploy-test"
seed = 7
rounds = {rounds}
clients_per_round = {clients_per_round}
[model]
source = "tiny-llama"
max_length = 16
[adapter]
kind = "lora"
rank = 4
alpha = 8.0
target_modules = []
[data]
dataset = "{data}"
partition = "natural"
group_field = "who"
test_fraction = 0.2
[train]
lr = 0.1
local_steps = {local_steps}
batch_size = 4
[eval]
every = 1
max_examples = 16
[coordinator]
min_clients = {min_clients}
min_results = {min_results}
{extra}
"""


class Proc:
    def __init__(self, args: list[str], log: Path, env: dict[str, str]):
        self.log = log
        self._f = log.open("wb")
        self.p = subprocess.Popen(args, stdout=self._f, stderr=subprocess.STDOUT, env=env, cwd=REPO)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, needle: str, timeout: float = 90.0, count: int = 1) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.text().count(needle) >= count:
                return
            if self.p.poll() is not None:
                raise AssertionError(f"process exited ({self.p.returncode}) before {needle!r}:\n{self.text()[-3000:]}")
            time.sleep(0.05)
        raise AssertionError(f"timed out after {timeout}s waiting for {needle!r}:\n{self.text()[-3000:]}")

    def wait(self, timeout: float = 60.0) -> int:
        return self.p.wait(timeout=timeout)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.p.poll() is None:
            self.p.send_signal(sig)
            try:
                self.p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait(timeout=15)
        self._f.close()


class Deployment:
    """A coordinator on a free loopback port with TLS (or --insecure) and a registry of clients."""

    def __init__(self, root: Path, db_url: str, *, tls: bool = True):
        self.root = root
        self.db_url = db_url
        self.tls = tls
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.certs = root / "certs"
        self.data_dir = root / "blobs"
        self.procs: list[Proc] = []
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
        self.env.pop("FEDADAPT_COORDINATOR", None)
        self.env.pop("FEDADAPT_CREDENTIALS", None)
        if tls:
            self.cli("certs", "init", self.certs, "--hosts", "localhost,127.0.0.1")

    # -------------------------------------------------------------- one-shot commands
    def cli(self, *args, check: bool = True, timeout: float = 120.0) -> subprocess.CompletedProcess:
        r = subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, env=self.env, cwd=REPO,
                           timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(f"fedadapt {' '.join(map(str, args))} exited {r.returncode}:\n{r.stdout}\n{r.stderr}")
        return r

    def add_client(self, name: str) -> Path:
        where = ["--tls-dir", self.certs] if self.tls else ["--out", self.root / "creds" / name]
        self.cli("clients", "add", name, "--database", self.db_url, *where)
        return self.certs / "clients" / name if self.tls else self.root / "creds" / name

    def control_args(self) -> list:
        auth = ["--credentials", self.certs / "admin"] if self.tls else ["--insecure"]
        return ["--coordinator", self._target(), *auth]

    def run(self, action: str, *args, check: bool = True, timeout: float = 300.0) -> subprocess.CompletedProcess:
        return self.cli("run", action, *args, *self.control_args(), check=check, timeout=timeout)

    def submit(self, toml: str) -> str:
        path = self.root / f"run-{time.monotonic_ns()}.toml"
        path.write_text(toml)
        return json.loads(self.run("submit", path, "--format", "json").stdout)["run_id"]

    def get(self, run_id: str) -> dict:
        return json.loads(self.run("get", run_id, "--format", "json").stdout)

    # -------------------------------------------------------------- long-running processes
    def start_coordinator(self, *extra, wait: bool = True) -> Proc:
        auth = ["--tls-dir", self.certs] if self.tls else ["--insecure"]
        p = self._spawn("coordinator", ["server", "start", "--database", self.db_url, "--data-dir", self.data_dir,
                                        "--address", self.address, *auth, *extra])
        if wait:
            p.wait_for("coordinator listening", timeout=120)
        return p

    def start_client(self, name: str, *, partition: str | None = None, creds: Path | None = None) -> Proc:
        creds = creds or (self.certs / "clients" / name if self.tls else self.root / "creds" / name)
        auth = [] if self.tls else ["--insecure"]
        return self._spawn(f"client-{name}", ["client", "start", "--coordinator", self._target(), "--name", name,
                                              "--credentials", creds, "--partition", partition or name,
                                              "--threads", "1", *auth])

    def _spawn(self, label: str, args: list) -> Proc:
        n = sum(p.log.name.startswith(label) for p in self.procs)
        proc = Proc([*CLI, *map(str, args)], self.root / f"{label}.{n}.log", self.env)
        self.procs.append(proc)
        return proc

    def _target(self) -> str:
        return f"localhost:{self.port}" if self.tls else self.address

    # -------------------------------------------------------------- direct gRPC (hostile clients)
    def channel(self) -> grpc.Channel:
        if self.tls:
            creds = load_credentials(self.certs / "admin")
            return grpc.secure_channel(self._target(), channel_credentials(creds))
        return grpc.insecure_channel(self.address)

    def control_stub(self) -> tuple[pb_grpc.ControlStub, tuple]:
        md = metadata(load_credentials(self.certs / "admin")) if self.tls else ()
        return pb_grpc.ControlStub(self.channel()), md

    def wait_status(self, run_id: str, statuses: tuple[str, ...], timeout: float = 180.0) -> dict:
        stub, md = self.control_stub()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = stub.GetRun(pb.RunRef(run_id=run_id), metadata=md, timeout=10)
            if info.status in statuses:
                return {"status": info.status, "round": info.round, "error": info.error, "model_path": info.model_path}
            time.sleep(0.1)
        raise AssertionError(f"run {run_id} did not reach {statuses} in {timeout}s; logs:\n{self.logs()}")

    def logs(self) -> str:
        return "\n".join(f"--- {p.log.name}\n{p.text()[-2000:]}" for p in self.procs)

    def close(self) -> None:
        for p in self.procs:
            p.kill()


@contextmanager
def coordinator_equals_simulation(tmp_path: Path, toml: str, clients=("role0", "role1", "role2"),
                                  timeout: float = 180.0) -> Iterator[tuple[Deployment, str, list[dict]]]:
    """Run `toml` in-process, then on a coordinator with one daemon per client; assert the two final models
    are bit-identical and yield (deployment, run id, round records) for the caller's own checks."""
    import torch
    from safetensors.torch import load_file

    from fedadapt.server.store import Store

    (tmp_path / "run.toml").write_text(toml)
    d = Deployment(tmp_path, f"sqlite:///{tmp_path / 'fedadapt.db'}", tls=False)
    try:
        d.cli("simulate", tmp_path / "run.toml", "--out", tmp_path / "sim", "--threads", "1")
        for name in clients:
            d.add_client(name)
        d.start_coordinator()
        for name in clients:
            d.start_client(name)
        run_id = d.submit(toml)
        info = d.wait_status(run_id, ("finished", "failed"), timeout=timeout)
        assert info["status"] == "finished", d.logs()
        got, want = load_file(info["model_path"]), load_file(tmp_path / "sim" / "model.safetensors")
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
        with Store(d.db_url, d.data_dir) as store:
            records = [r for _, r in store.records(run_id)]
        yield d, run_id, records
    finally:
        d.close()
