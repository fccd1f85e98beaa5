"""Empty test databases, reused instead of created anew for every test.

CREATE DATABASE copies template1 and takes 0.3-1 s on the shared 2-core machine, and
about 300 tests each want an empty database of their own. Emptying a finished test's
database takes a few milliseconds: end its sessions, rename it (so that a process the test
left behind can no longer reach the next test's data), drop its schemas and make public
anew. A database is reused only if it then looks exactly like a new one to the catalogue
query below; otherwise it is dropped, and the next test gets a new one.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TypeVar

import asyncpg

from runtime.pgcluster import LocalCluster

log = logging.getLogger(__name__)
T = TypeVar("T")

SESSIONS_GONE_DEADLINE = 10.0  # seconds; terminated backends exit in milliseconds

# Everything an emptied database could still hold that a new one does not. Temporary
# schemas (pg_temp_N) are left out: they outlive sessions, empty, in new databases too.
CONTENTS_SQL = """
SELECT
    (SELECT array_agg(nspname || ':' || nspowner::regrole || ':' || coalesce(nspacl::text, '')
                      ORDER BY nspname)
       FROM pg_namespace WHERE nspname !~ '^pg_(toast_)?temp_'),
    (SELECT array_agg(extname ORDER BY extname) FROM pg_extension),
    (SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
      WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast')),
    (SELECT count(*) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
      WHERE n.nspname NOT IN ('pg_catalog', 'information_schema')),
    (SELECT count(*) FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
      WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast')),
    (SELECT count(*) FROM pg_event_trigger),
    (SELECT count(*) FROM pg_publication),
    (SELECT count(*) FROM pg_largeobject_metadata),
    (SELECT count(*) FROM pg_default_acl),
    (SELECT count(*) FROM pg_db_role_setting s JOIN pg_database d ON d.oid = s.setdatabase
      WHERE d.datname = current_database()),
    (SELECT datacl::text FROM pg_database WHERE datname = current_database())
"""

# Drops every schema a test made, and makes public anew as initdb does (PostgreSQL 15+).
RECREATE_PUBLIC_SQL = """
DO $$
DECLARE
    name text;
BEGIN
    FOR name IN SELECT nspname FROM pg_namespace
        WHERE nspname !~ '^pg_' AND nspname <> 'information_schema' LOOP
        EXECUTE format('DROP SCHEMA %I CASCADE', name);
    END LOOP;
END $$;
CREATE SCHEMA public AUTHORIZATION pg_database_owner;
GRANT USAGE ON SCHEMA public TO PUBLIC;
COMMENT ON SCHEMA public IS 'standard public schema';
"""


class DatabaseRecycler:
    """Hands out empty databases in one cluster, one test at a time."""

    def __init__(self, cluster: LocalCluster) -> None:
        self.cluster = cluster
        self._spare: list[str] = []
        self._new_contents: tuple | None = None

    @property
    def spare_count(self) -> int:
        """How many emptied databases wait to be handed out."""
        return len(self._spare)

    @contextmanager
    def empty_database(self) -> Iterator[str]:
        """The DSN of an empty database; emptied (or dropped) afterwards."""
        name = self._spare.pop() if self._spare else self._create()
        try:
            yield self.cluster.dsn(name)
        finally:
            spare = run_sync(lambda: self._empty(name))
            if spare:
                self._spare.append(spare)

    def _create(self) -> str:
        name = new_name()
        self.cluster.create_database(name)
        if self._new_contents is None:
            self._new_contents = run_sync(lambda: self._contents(name))
        return name

    async def _contents(self, name: str) -> tuple:
        conn = await asyncpg.connect(self.cluster.dsn(name))
        try:
            return tuple(await conn.fetchrow(CONTENTS_SQL))
        finally:
            await conn.close()

    async def _empty(self, name: str) -> str | None:
        """Rename and empty database name; its new name, or None if it was dropped."""
        admin = await asyncpg.connect(self.cluster.dsn("postgres"))
        try:
            spare = new_name()
            if await end_sessions(admin, name):
                await admin.execute(f'ALTER DATABASE "{name}" RENAME TO "{spare}"')
                if await self._recreate_public(spare):
                    return spare
                name = spare
            log.info("dropping test database %s: it cannot be emptied", name)
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            return None
        finally:
            await admin.close()

    async def _recreate_public(self, name: str) -> bool:
        conn = await asyncpg.connect(self.cluster.dsn(name))
        try:
            await conn.execute(RECREATE_PUBLIC_SQL)
            return tuple(await conn.fetchrow(CONTENTS_SQL)) == self._new_contents
        except asyncpg.PostgresError as error:
            log.info("emptying test database %s failed: %s", name, error)
            return False
        finally:
            await conn.close()


async def end_sessions(admin: asyncpg.Connection, name: str) -> bool:
    """Terminate every session on database name; whether they were all gone in time."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + SESSIONS_GONE_DEADLINE
    while loop.time() < deadline:
        remaining = await admin.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = $1 AND pid <> pg_backend_pid()",
            name,
        )
        if remaining == 0:
            return True
        await asyncio.sleep(0.01)
    return False


def new_name() -> str:
    return f"test_{uuid.uuid4().hex[:12]}"


def run_sync(coroutine_function: Callable[[], Coroutine[object, object, T]]) -> T:
    """Run a coroutine to completion from a fixture, whether or not an event loop runs."""
    # A thread of its own: async fixtures' finalisers run while a loop is running.
    with ThreadPoolExecutor(max_workers=1) as worker:
        return worker.submit(lambda: asyncio.run(coroutine_function())).result()
