"""A PostgreSQL cluster of a test module's own, which its tests may stop and start at will.

Registered through `pytest_plugins` by the modules that take the database away
(test_faults_outage.py, test_faults_tokens.py). `own_cluster` is module-scoped, so each
such module gets its own cluster: stopping it disturbs no other module's database.
"""

from __future__ import annotations

import asyncio

import pytest
from pgfixture import fresh_database, temporary_cluster

from proxy import store


@pytest.fixture(scope="module")
def own_cluster():
    """A cluster this module may stop and start at will."""
    with temporary_cluster() as cluster:
        cluster.ensure_running()
        yield cluster


@pytest.fixture
def own_dsn(own_cluster):
    """A fresh, migrated database in the module's cluster, running again afterwards."""
    own_cluster.start()
    with fresh_database(own_cluster) as dsn:
        asyncio.run(_migrate(dsn))
        yield dsn
        own_cluster.start()  # so that the database can be dropped


async def _migrate(dsn: str) -> None:
    pool = await store.create_pool(dsn)
    await pool.close()
