"""The test databases that pg_dsn hands out are empty, even when they are reused."""

from __future__ import annotations

import subprocess
import sys

import asyncpg
import pytest
from conftest import wait_for
from dbrecycler import DatabaseRecycler, run_sync

from runtime.pgcluster import LocalCluster

LEFT_BEHIND = """
CREATE TABLE users (id serial PRIMARY KEY, name text);
INSERT INTO users (name) VALUES ('left-behind');
CREATE FUNCTION f() RETURNS int LANGUAGE sql AS 'SELECT 1';
CREATE SCHEMA other;
CREATE TABLE other.t (x int);
"""

SLEEPING_SESSION = """
import asyncio, sys, asyncpg
async def main():
    conn = await asyncpg.connect(sys.argv[1])
    await conn.execute("SELECT pg_sleep(120)")
asyncio.run(main())
"""


def fetch(dsn: str, sql: str) -> list[asyncpg.Record]:
    return run_sync(lambda: on_connection(dsn, lambda conn: conn.fetch(sql)))


def execute(dsn: str, sql: str) -> None:
    run_sync(lambda: on_connection(dsn, lambda conn: conn.execute(sql)))


async def on_connection(dsn: str, action):
    conn = await asyncpg.connect(dsn)
    try:
        return await action(conn)
    finally:
        await conn.close()


def user_objects(dsn: str) -> list[str]:
    rows = fetch(
        dsn,
        "SELECT relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast') "
        "UNION ALL SELECT proname FROM pg_proc WHERE proname = 'f' "
        "UNION ALL SELECT nspname FROM pg_namespace WHERE nspname = 'other'",
    )
    return [row[0] for row in rows]


def test_a_reused_database_is_empty_and_its_old_name_reaches_nothing(pg_cluster: LocalCluster):
    recycler = DatabaseRecycler(pg_cluster)
    with recycler.empty_database() as first:
        execute(first, LEFT_BEHIND)
        assert "users" in user_objects(first)
        # A session the test forgot: it is ended, as DROP DATABASE ... WITH (FORCE) would.
        forgotten = subprocess.Popen(
            [sys.executable, "-c", SLEEPING_SESSION, first],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for(
            lambda: fetch(
                first,
                "SELECT 1 FROM pg_stat_activity WHERE query LIKE '%pg_sleep%'"
                " AND pid <> pg_backend_pid()",
            ),
            what="the forgotten session",
        )
    assert recycler.spare_count == 1
    assert forgotten.wait(timeout=30) != 0
    with recycler.empty_database() as second:
        assert recycler.spare_count == 0
        assert user_objects(second) == []
    with pytest.raises(asyncpg.InvalidCatalogNameError):
        fetch(first, "SELECT 1")


def test_a_database_that_cannot_be_emptied_is_dropped(pg_cluster: LocalCluster):
    recycler = DatabaseRecycler(pg_cluster)
    with recycler.empty_database() as first:
        name = fetch(first, "SELECT current_database()")[0][0]
        execute(first, f"ALTER DATABASE {name} SET work_mem = '8MB'")
    assert recycler.spare_count == 0
    with recycler.empty_database() as second:
        assert fetch(second, "SELECT current_setting('work_mem')")[0][0] != "8MB"
    with pytest.raises(asyncpg.InvalidCatalogNameError):
        fetch(first, "SELECT 1")
