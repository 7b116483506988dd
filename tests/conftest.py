"""Shared fixtures. `db_url` runs a test against every supported database backend."""

from __future__ import annotations

import pytest

import pg  # tests/pg.py: pytest puts this directory on sys.path (no tests/__init__.py)


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
