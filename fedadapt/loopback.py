"""`fedadapt simulate --transport grpc`: the same scenario with a real coordinator and virtual clients that
talk gRPC over 127.0.0.1.

Each virtual client is a full ClientAgent (join, task stream, chunked uploads, heartbeats) with its own
token; they share one model and executor like the in-process simulator and train one at a time under a
lock, so a seeded run gives the same global tensors as `--transport inprocess`. It joins the coordinator
(fedadapt.server) and the daemon (fedadapt.client), so it sits above both, beside the CLI.
"""

from __future__ import annotations

import hmac
import json
import secrets
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from fedadapt.client.agent import ClientAgent
from fedadapt.client.workload import Workload
from fedadapt.core import codec
from fedadapt.core.errors import AuthError, FedadaptError
from fedadapt.models.classifier import Features
from fedadapt.proto.auth import Credentials
from fedadapt.runtime.setup import Run
from fedadapt.server.hub import ClientHub
from fedadapt.server.service import serve

JOIN_TIMEOUT = 120.0


@contextmanager
def grpc_transport(run: Run, data: dict[str, Features], on_client_done=lambda cid: None) -> Iterator[ClientHub]:
    """A coordinator's hub on 127.0.0.1 with one ClientAgent per client of `data`, all joined."""
    tokens = {cid: secrets.token_urlsafe(16) for cid in data}

    def authenticate(name: str, token: str) -> None:
        if name not in tokens or not hmac.compare_digest(tokens[name], token):
            raise AuthError(f"client {name!r} is not part of this simulation")

    hub = ClientHub()
    server, port = serve("127.0.0.1:0", hub, authenticate=authenticate, max_payload_bytes=codec.DEFAULT_MAX_BYTES)
    lock = threading.Lock()
    agents, threads = [], []
    for cid, features in data.items():
        workload = Workload(run.executor, features)

        def make(spec, w=workload, cid=cid):
            return w

        agent = ClientAgent(f"127.0.0.1:{port}", Credentials(cid, tokens[cid], None), make, insecure=True,
                            capabilities={"num_examples": len(features)}, train_lock=_Notify(lock, on_client_done, cid),
                            log=lambda msg: None)
        agents.append(agent)
        threads.append(threading.Thread(target=agent.run, name=f"client-{cid}", daemon=True))
    try:
        hub.begin_run("simulation", json.dumps(run.spec_for_clients()))
        for t in threads:
            t.start()
        if not hub.wait_for_clients(len(agents), JOIN_TIMEOUT):
            raise FedadaptError(f"only {len(hub.clients())} of {len(agents)} virtual clients joined within "
                                f"{JOIN_TIMEOUT:.0f}s")
        yield hub
    finally:
        for a in agents:
            a.stop()
        hub.shutdown()
        server.stop(grace=1.0).wait()
        for t in threads:
            t.join(timeout=5)


class _Notify:
    """The shared training lock, which also reports each finished client (for the progress bar)."""

    def __init__(self, lock: threading.Lock, done, cid: str):
        self.lock, self.done, self.cid = lock, done, cid

    def __enter__(self):
        self.lock.acquire()

    def __exit__(self, *exc):
        self.lock.release()
        if exc[0] is None:
            self.done(self.cid)
