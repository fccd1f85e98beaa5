"""The gateway's PostgreSQL, seen from the console: the private cluster or the operator's own.

With no POSTGRES_AUTH_* set, the console owns a private cluster in runtime/pgdata that
listens only on a socket in runtime/run/pg and starts and stops with the rest (or, when
a root console's server user cannot reach the checkout, in a directory of its own under
/var/lib/llamagate: see runtime/pglocation.py). With
POSTGRES_AUTH_DSN (or the POSTGRES_AUTH_* parts) the operator's server is used and the
console manages nothing: it only checks that it answers.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from proxy import store
from proxy.config import redact_dsn
from runtime.pgcluster import ClusterError, LocalCluster
from runtime.pglocation import ClusterPlace, find_place, prepare_place
from runtime.settings import Settings
from runtime.states import ComponentStatus, State

DATABASE_NAME = "llamagate"


class DatabaseError(Exception):
    """The database could not be started or reached; the message says what to do."""


class Database:
    """Start, stop and probe the database the gateway uses."""

    def __init__(self, settings: Settings, echo: Callable[[str], None] = print) -> None:
        self.settings = settings
        self.echo = echo
        self.external_dsn = settings.external_dsn

    @property
    def is_managed(self) -> bool:
        """True when the console owns the private cluster."""
        return not self.external_dsn

    def place(self) -> ClusterPlace:
        """Where the private cluster's files are, or will be created."""
        return find_place(self.settings.paths)

    def cluster(self) -> LocalCluster:
        place = self.place()
        return LocalCluster(place.data_dir, place.socket_dir, place.log_path)

    def dsn(self) -> str:
        if not self.is_managed:
            return self.external_dsn
        return self.cluster().dsn(DATABASE_NAME)

    def ensure_running(self) -> str:
        """Start the private cluster if it is ours (creating it on first use); return the DSN."""
        if not self.is_managed:
            self._check_reachable(self.external_dsn)
            return self.external_dsn
        try:
            place = self.place()
            if place.is_out_of_tree and not place.data_dir.exists():
                self.echo(
                    f"PostgreSQL's user cannot reach {self.settings.paths.root}, so the "
                    f"private cluster lives in {place.home} (linked from runtime/pgdata)"
                )
            prepare_place(self.settings.paths, place)
            return self.cluster().ensure_running(DATABASE_NAME, echo=self.echo)
        except ClusterError as error:
            raise DatabaseError(str(error)) from None

    def stop(self) -> bool:
        """Stop the private cluster; True if it was running. The operator's server is left alone."""
        if not self.is_managed:
            return False
        try:
            return self.cluster().stop()
        except ClusterError as error:
            raise DatabaseError(str(error)) from None

    def status(self) -> ComponentStatus:
        if self.is_managed:
            try:
                cluster = self.cluster()
            except ClusterError as error:
                return ComponentStatus(State.STOPPED, "private cluster", detail=str(error))
            url = f"private cluster in {cluster.data_dir}, socket {cluster.socket_dir}"
            return ComponentStatus(State.SERVING if cluster.is_running() else State.STOPPED, url)
        url = redact_dsn(self.external_dsn)
        try:
            self._check_reachable(self.external_dsn)
        except DatabaseError as error:
            return ComponentStatus(State.DEGRADED, url, detail=str(error))
        return ComponentStatus(State.SERVING, url)

    @staticmethod
    def _check_reachable(dsn: str) -> None:
        async def probe() -> None:
            conn = await store.connect(dsn)
            await conn.close()

        try:
            asyncio.run(probe())
        except store.StoreError as error:
            raise DatabaseError(str(error)) from None
