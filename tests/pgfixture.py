"""PostgreSQL for tests: one private cluster per session, an empty database per test.

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
from dbrecycler import DatabaseRecycler

from runtime.pgcluster import ClusterError, LocalCluster

# Durability against a crash of the machine is not under test, and fsync costs every
# commit (and every CREATE or DROP DATABASE) tens of milliseconds on a loaded CI disk.
# A killed server still loses nothing: the WAL reaches the kernel at each commit.
TEST_CLUSTER_SETTINGS = "fsync = off\nfull_page_writes = off\n"


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


def start_fast_cluster(cluster: LocalCluster) -> None:
    """Initialise cluster with TEST_CLUSTER_SETTINGS and start it."""
    cluster.initdb()
    with open(cluster.data_dir / "postgresql.conf", "a") as conf:
        conf.write(f"\n# llamagate tests\n{TEST_CLUSTER_SETTINGS}")
    cluster.ensure_running()


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[LocalCluster]:
    """The session's private PostgreSQL cluster, running."""
    try:
        with temporary_cluster() as cluster:
            start_fast_cluster(cluster)
            yield cluster
    except ClusterError as exc:
        pytest.fail(f"the test PostgreSQL cluster failed: {exc}", pytrace=False)


@pytest.fixture(scope="session")
def pg_databases(pg_cluster: LocalCluster) -> DatabaseRecycler:
    """Empty databases in the session's cluster, emptied and renamed for reuse."""
    return DatabaseRecycler(pg_cluster)


@pytest.fixture
def pg_dsn(pg_databases: DatabaseRecycler) -> Iterator[str]:
    """The DSN of an empty database of this test's own."""
    with pg_databases.empty_database() as dsn:
        yield dsn
