"""PostgreSQL for tests: one private cluster per session, a fresh database per test.

Registered from conftest.py as a plugin. Nothing is skipped without PostgreSQL: the
fixture fails with the ClusterError message, which names the fix.
"""

from __future__ import annotations

import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from runtime.pgcluster import ClusterError, LocalCluster


@contextmanager
def temporary_cluster() -> Iterator[LocalCluster]:
    """A LocalCluster in a new directory under /tmp, not yet initialised; removed afterwards."""
    # Not pytest's tmp_path: its parents are mode 0700, which the postgres user cannot
    # traverse when the tests run as root.
    root = Path(tempfile.mkdtemp(prefix="llamagate-pg-", dir="/tmp"))
    root.chmod(0o755)
    cluster = None
    try:
        cluster = LocalCluster(root / "data", root / "run", root / "postgres.log")
        yield cluster
    finally:
        try:
            if cluster is not None:
                cluster.stop()
        finally:
            shutil.rmtree(root, ignore_errors=True)


@contextmanager
def fresh_database(cluster: LocalCluster) -> Iterator[str]:
    """A new, uniquely named database in cluster; its DSN, and it is dropped afterwards."""
    name = f"test_{uuid.uuid4().hex[:12]}"
    cluster.create_database(name)
    try:
        yield cluster.dsn(name)
    finally:
        cluster.drop_database(name)


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[LocalCluster]:
    """The session's private PostgreSQL cluster, running."""
    try:
        with temporary_cluster() as cluster:
            cluster.ensure_running()
            yield cluster
    except ClusterError as exc:
        pytest.fail(f"the test PostgreSQL cluster failed: {exc}", pytrace=False)


@pytest.fixture
def pg_dsn(pg_cluster: LocalCluster) -> Iterator[str]:
    """The DSN of an empty database of this test's own."""
    with fresh_database(pg_cluster) as dsn:
        yield dsn
