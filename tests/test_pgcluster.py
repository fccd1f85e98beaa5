"""The private PostgreSQL cluster: a real server in a temp directory, no mocks."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
from pgfixture import fresh_database, temporary_cluster

from runtime.pgcluster import ClusterError, LocalCluster, find_pg_bin, resolve_db_user


@pytest.fixture
def fresh_cluster() -> Iterator[LocalCluster]:
    """A cluster of this test's own, not yet initialised, for tests that start and stop it."""
    with temporary_cluster() as cluster:
        yield cluster


@pytest.fixture
def scratch_dir() -> Iterator[Path]:
    """A directory the postgres user can reach, unlike pytest's tmp_path."""
    path = Path(tempfile.mkdtemp(prefix="llamagate-pgtest-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    for child in path.rglob("*"):
        child.chmod(0o755)
    shutil.rmtree(path)


async def fetchval(dsn: str, sql: str) -> object:
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        return await conn.fetchval(sql)
    finally:
        await conn.close()


def postmaster_pid(cluster: LocalCluster) -> int:
    return int((cluster.data_dir / "postmaster.pid").read_text().split("\n", 1)[0])


@pytest.mark.asyncio
async def test_new_cluster_initialises_starts_and_answers_on_its_dsn(fresh_cluster):
    messages: list[str] = []
    dsn = fresh_cluster.ensure_running(echo=messages.append)
    assert fresh_cluster.is_initialised() and fresh_cluster.is_running()
    assert await fetchval(dsn, "SELECT 1") == 1
    assert await fetchval(dsn, "SELECT current_database()") == "llamagate"
    assert messages == [f"initialising a private PostgreSQL cluster in {fresh_cluster.data_dir}"]


def test_ensure_running_on_a_running_cluster_says_nothing(fresh_cluster):
    first = fresh_cluster.ensure_running()
    messages: list[str] = []
    assert fresh_cluster.ensure_running(echo=messages.append) == first
    assert messages == []


def test_server_log_goes_to_log_path_owned_by_the_server_user(fresh_cluster):
    fresh_cluster.ensure_running()
    assert fresh_cluster.log_path.stat().st_uid == fresh_cluster.db_user.uid
    assert "database system is ready" in fresh_cluster.log_path.read_text()


@pytest.mark.asyncio
async def test_cluster_listens_only_on_its_private_socket(pg_cluster):
    dsn = pg_cluster.dsn("postgres")
    assert await fetchval(dsn, "SHOW listen_addresses") == ""
    assert await fetchval(dsn, "SHOW unix_socket_directories") == str(pg_cluster.socket_dir)
    assert stat.S_ISSOCK(pg_cluster.socket_path.stat().st_mode)


def test_socket_dir_is_private_to_the_server_user(pg_cluster):
    info = pg_cluster.socket_dir.stat()
    assert stat.S_IMODE(info.st_mode) == 0o700
    assert info.st_uid == pg_cluster.db_user.uid


def test_server_never_runs_as_root(pg_cluster):
    assert pg_cluster.db_user.uid != 0
    assert os.stat(f"/proc/{postmaster_pid(pg_cluster)}").st_uid == pg_cluster.db_user.uid


@pytest.mark.asyncio
async def test_starting_a_running_cluster_is_harmless(fresh_cluster):
    dsn = fresh_cluster.ensure_running()
    pid = postmaster_pid(fresh_cluster)
    assert fresh_cluster.start() is False
    assert postmaster_pid(fresh_cluster) == pid
    assert await fetchval(dsn, "SELECT 1") == 1


def test_stop_reports_whether_it_was_running(fresh_cluster):
    fresh_cluster.ensure_running()
    assert fresh_cluster.stop() is True
    assert not fresh_cluster.is_running()
    assert fresh_cluster.stop() is False
    assert fresh_cluster.start() is True
    assert fresh_cluster.is_running()


def test_failed_start_reports_the_server_log(fresh_cluster):
    fresh_cluster.initdb()
    with open(fresh_cluster.data_dir / "postgresql.conf", "a") as conf:
        conf.write("no_such_setting_here = 1\n")
    with pytest.raises(ClusterError, match="no_such_setting_here"):
        fresh_cluster.start()
    assert not fresh_cluster.is_running()


def test_too_long_socket_path_is_refused_naming_it(scratch_dir):
    socket_dir = scratch_dir / ("s" * 100)
    with pytest.raises(ClusterError, match=str(socket_dir)):
        LocalCluster(scratch_dir / "data", socket_dir, scratch_dir / "postgres.log")


def test_unreachable_parent_directory_is_named_with_the_fix(scratch_dir):
    locked = scratch_dir / "locked"
    locked.mkdir(mode=0o600)
    cluster = LocalCluster(locked / "data", scratch_dir / "run", scratch_dir / "postgres.log")
    with pytest.raises(ClusterError, match=f"cannot enter {locked};.*chmod o\\+x {locked}"):
        cluster.initdb()
    assert list(locked.iterdir()) == []


def test_root_without_a_server_user_is_told_how_to_get_one(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    with pytest.raises(ClusterError, match="apt-get install postgresql.*adduser --system"):
        resolve_db_user(system_user="llamagate-no-such-user")


def test_missing_binary_error_names_the_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ClusterError, match="apt-get install postgresql"):
        find_pg_bin("initdb", search_glob=str(tmp_path / "*" / "bin"))


def test_newest_installed_version_is_found_off_path(monkeypatch, tmp_path):
    for version in ("9.6", "16", "15"):
        program = tmp_path / version / "bin" / "initdb"
        program.parent.mkdir(parents=True)
        program.write_text("#!/bin/sh\n")
        program.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    found = find_pg_bin("initdb", search_glob=str(tmp_path / "*" / "bin"))
    assert found == tmp_path / "16" / "bin" / "initdb"


@pytest.mark.asyncio
async def test_create_database_is_idempotent_and_drop_removes_it(pg_cluster):
    pg_cluster.create_database("twice")
    pg_cluster.create_database("twice")
    exists = "SELECT count(*) FROM pg_database WHERE datname = 'twice'"
    assert await fetchval(pg_cluster.dsn("postgres"), exists) == 1
    pg_cluster.drop_database("twice")
    assert await fetchval(pg_cluster.dsn("postgres"), exists) == 0


@pytest.mark.asyncio
async def test_each_test_database_starts_empty_and_is_dropped(pg_cluster, pg_dsn):
    conn = await asyncpg.connect(pg_dsn, timeout=10)
    await conn.execute("CREATE TABLE marker (id int)")
    await conn.close()
    has_marker = "SELECT to_regclass('marker') IS NOT NULL"
    assert await fetchval(pg_dsn, has_marker) is True
    with fresh_database(pg_cluster) as other_dsn:
        assert other_dsn != pg_dsn
        assert await fetchval(other_dsn, has_marker) is False
        other_name = await fetchval(other_dsn, "SELECT current_database()")
    count = f"SELECT count(*) FROM pg_database WHERE datname = '{other_name}'"
    assert await fetchval(pg_cluster.dsn("postgres"), count) == 0
