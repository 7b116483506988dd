"""Submit-time validation of the coordinator's RunManager, without processes: simulation-only `[attack]`
and `[availability]` configs are refused with one line (INVALID_ARGUMENT on the Control API, exit code 2 in the CLI) and
nothing is queued."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from fedadapt.core.errors import ConfigError
from fedadapt.server.hub import ClientHub
from fedadapt.server.runs import RunManager
from fedadapt.server.service import ControlService
from fedadapt.server.store import Store

BASE = (Path(__file__).resolve().parent.parent / "simulations/frl-digits.toml").read_text()


@pytest.fixture
def manager(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'fedadapt.db'}", tmp_path / "blobs")
    yield RunManager(store, ClientHub())  # never started: submit only queues
    store.close()


def with_attack(kind: str, fraction: float) -> str:
    return BASE + f'\n[attack]\nkind = "{kind}"\nfraction = {fraction}\nscale = 10.0\n'


@pytest.mark.parametrize("kind", ["reverse-ranking", "sign-flip", "label-flip"])
def test_an_enabled_attack_is_refused_and_nothing_is_queued(manager, kind):
    with pytest.raises(ConfigError) as err:
        manager.submit(with_attack(kind, 0.2))
    msg = str(err.value)
    assert "\n" not in msg and "[attack]" in msg and kind in msg and "simulation" in msg
    assert manager.list() == []


@pytest.mark.parametrize("kind, fraction", [("none", 0.3), ("sign-flip", 0.0)])
def test_an_attack_section_that_enables_nothing_is_accepted(manager, kind, fraction):
    info = manager.submit(with_attack(kind, fraction))
    assert info.status == "queued"
    assert [r.run_id for r in manager.list()] == [info.run_id]


@pytest.mark.parametrize("pattern", ["bernoulli", "markov", "cyclic"])
def test_a_simulated_availability_pattern_is_refused(manager, pattern):
    with pytest.raises(ConfigError) as err:
        manager.submit(BASE + f'\n[availability]\npattern = "{pattern}"\n')
    msg = str(err.value)
    assert "\n" not in msg and "[availability]" in msg and pattern in msg
    assert manager.list() == []
    assert manager.submit(BASE + '\n[availability]\npattern = "always"\n').status == "queued"


class _Aborted(Exception):
    pass


class _Context:
    """Enough of a grpc.aio.ServicerContext for ControlService (authentication is the server's interceptor)."""

    code = details = None

    def invocation_metadata(self):
        return ()

    async def abort(self, code, details):
        self.code, self.details = code, details
        raise _Aborted()


def test_the_control_api_answers_invalid_argument(manager):
    import asyncio

    from fedadapt.proto import fedadapt_pb2 as pb

    ctx = _Context()
    with pytest.raises(_Aborted):
        asyncio.run(ControlService(manager).SubmitRun(
            pb.SubmitRunRequest(config_toml=with_attack("reverse-ranking", 0.2)), ctx))
    assert ctx.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "[attack]" in ctx.details and "\n" not in ctx.details
    assert manager.list() == []


def test_downloading_a_run_with_no_committed_round_or_an_unknown_run_is_one_line(manager):
    import asyncio

    from fedadapt.proto import fedadapt_pb2 as pb

    run_id = manager.submit(BASE).run_id  # queued: nothing committed yet

    async def drain(ref):
        return [part async for part in ControlService(manager).DownloadRun(ref, ctx)]

    for ref, code, says in [(run_id, grpc.StatusCode.INVALID_ARGUMENT, "has no committed round yet"),
                            ("run-00000000", grpc.StatusCode.NOT_FOUND, "no run 'run-00000000'")]:
        ctx = _Context()
        with pytest.raises(_Aborted):
            asyncio.run(drain(pb.RunRef(run_id=ref)))
        assert ctx.code == code and says in ctx.details and "\n" not in ctx.details
