"""Shared fixtures. `db_url` runs a test against every supported database backend; `data_file`, `reference`
and `deployment` serve the integration tests with real processes (tests/deploy.py); `run_flower` runs a
command in the Flower venv."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pg  # tests/pg.py: pytest puts this directory on sys.path (no tests/__init__.py)
import pytest
import torch
from deploy import Deployment, tiny_text_file
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def postgres_url():
    """One throwaway PostgreSQL cluster per test session, started only if a test asks for it."""
    cluster = pg.postgres_cluster()
    try:
        url = cluster.__enter__()
    except pg.PostgresUnavailable as e:
        problem = str(e)
    else:
        try:
            yield url
        finally:
            cluster.__exit__(None, None, None)
        return
    # Fail, not skip: a skipped backend would silently leave PostgreSQL untested in CI.
    pytest.fail(problem, pytrace=False)


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request, tmp_path):
    """A fresh, empty database URL per test, on SQLite and on PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'fedadapt.db'}"
        return
    url = pg.create_database(request.getfixturevalue("postgres_url"))
    yield url
    pg.drop_database(url)


@pytest.fixture(scope="session")
def data_file(tmp_path_factory):
    """A tiny two-label text file with three groups: one partition per client daemon, as in the simulation."""
    return tiny_text_file(tmp_path_factory.mktemp("data") / "lines.jsonl", n_groups=3)


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
    """`reference(toml)`: the final tensors of the in-process simulation of a scenario, one thread, computed
    once per distinct config: what a deployment of the same scenario and seed must reproduce."""
    cache: dict[str, dict[str, torch.Tensor]] = {}

    def simulate(toml: str) -> dict[str, torch.Tensor]:
        if toml not in cache:
            root = tmp_path_factory.mktemp("reference")
            (root / "run.toml").write_text(toml)
            Deployment(root, "unused", tls=False).cli("simulate", root / "run.toml", "--out", root / "out",
                                                      "--threads", "1", timeout=600)
            cache[toml] = load_file(root / "out" / "model.safetensors")
        return cache[toml]

    return simulate


@pytest.fixture
def deployment(tmp_path, db_url):
    """A coordinator deployment on 127.0.0.1 (tests/deploy.py), closed after the test."""
    d = Deployment(tmp_path, db_url)
    yield d
    d.close()


@pytest.fixture(scope="session")
def run_flower():
    """`run_flower(args, timeout)`: python ARGS in benchmarks/.venv-flower (made on first use, a few minutes),
    with this checkout overlaid and one torch thread (as the simulator side of a comparison must use too);
    returns the CompletedProcess, stdout and stderr together. Flower and Ray stay out of the project venv."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from flower_env import flower_python

    py, env = flower_python()
    env["OMP_NUM_THREADS"] = "1"  # Ray keeps a value already set

    def run(args: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
        ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths must fit AF_UNIX
        p = subprocess.Popen([str(py), *args], env={**env, "RAY_TMPDIR": ray_tmp}, cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            out, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)  # its own session: Ray's processes go too
            out, _ = p.communicate()
        finally:
            shutil.rmtree(ray_tmp, ignore_errors=True)
        return subprocess.CompletedProcess(p.args, p.returncode, out, "")

    return run


@pytest.fixture(scope="session")
def simulate_both(run_flower):
    """`simulate_both(scenario, out)`: the scenario through `fedadapt simulate` (one torch thread, as the Flower
    side) into out/sim and through Flower's simulation runtime into out/flower; returns both final models and
    both metrics.jsonl row lists."""
    import json

    from safetensors.torch import load_file

    from fedadapt.cli import main

    def both(scenario: Path, out: Path):
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # the Flower side runs with OMP_NUM_THREADS=1: the same kernels, the same bits
        try:
            assert main(["simulate", str(scenario), "--out", str(out / "sim")]) == 0
        finally:
            torch.set_num_threads(threads)
        r = run_flower(["-m", "fedadapt.flower.simulate", str(scenario), "--out", str(out / "flower")])
        assert r.returncode == 0, r.stdout[-4000:]
        models = [load_file(out / side / "model.safetensors") for side in ("sim", "flower")]
        rows = [[json.loads(line) for line in (out / side / "metrics.jsonl").read_text().splitlines()]
                for side in ("sim", "flower")]
        return (*models, rows)

    return both
