"""The private local PostgreSQL cluster: initdb, start, stop, and a DSN for its Unix socket.

PostgreSQL refuses to run as root, so when the console is root the server runs as the
`postgres` system user, and the directories it needs are handed to that user.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import pwd
import shutil
import stat
import subprocess
from collections.abc import Awaitable, Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import asyncpg

from runtime import proctable

PG_BIN_GLOB = "/usr/lib/postgresql/*/bin"
DB_SYSTEM_USER = "postgres"
SUPERUSER = "llamagate"
PORT = 5432
# Linux allows 107 bytes for a socket path; keep a margin.
SOCKET_PATH_LIMIT = 100
SETTINGS_FILE = "llamagate.conf"
INSTALL_HINT = (
    "install PostgreSQL: apt-get install postgresql (runtime/install.sh does this as root)"
)


class ClusterError(Exception):
    """The private cluster cannot be found, set up, started or stopped; the message says why."""


@dataclass(frozen=True)
class DbUser:
    """The account the server processes run as."""

    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]
    home: str


def find_pg_bin(name: str, search_glob: str = PG_BIN_GLOB) -> Path:
    """Path of a PostgreSQL program: on PATH, else in the newest /usr/lib/postgresql/*/bin."""
    on_path = shutil.which(name)
    if on_path:
        return Path(on_path).resolve()
    # Debian keeps initdb and pg_ctl off PATH, in one directory per major version.
    for bin_dir in sorted(glob.glob(search_glob), key=_version_key, reverse=True):
        candidate = Path(bin_dir) / name
        if os.access(candidate, os.X_OK):
            return candidate
    raise ClusterError(
        f"PostgreSQL's {name} was not found on PATH or in {search_glob}; {INSTALL_HINT}"
    )


def _version_key(bin_dir: str) -> tuple[int, ...]:
    """Sort /usr/lib/postgresql/9.6/bin below .../15/bin, which a string sort would not."""
    version = Path(bin_dir).parent.name
    return tuple(int(part) for part in version.split(".") if part.isdigit())


def resolve_db_user(system_user: str = DB_SYSTEM_USER) -> DbUser:
    """The current user, or the `postgres` system user when running as root."""
    if os.geteuid() != 0:
        try:
            entry = pwd.getpwuid(os.geteuid())
        except KeyError:  # an anonymous uid, as in some containers
            return DbUser(str(os.geteuid()), os.geteuid(), os.getegid(), tuple(os.getgroups()), "/")
    else:
        try:
            entry = pwd.getpwnam(system_user)
        except KeyError:
            raise ClusterError(
                f"running as root, and PostgreSQL refuses to run as root, but there is no "
                f"'{system_user}' system user to run it as; {INSTALL_HINT} (the package creates "
                f"the user), or create it: adduser --system --group {system_user}"
            ) from None
    groups = tuple(os.getgrouplist(entry.pw_name, entry.pw_gid))
    return DbUser(entry.pw_name, entry.pw_uid, entry.pw_gid, groups, entry.pw_dir)


def can_enter(directory: Path, user: DbUser) -> bool:
    """Whether user may traverse directory, by its mode bits (ACLs are not consulted)."""
    if user.uid == 0:
        return True
    info = directory.stat()
    if info.st_uid == user.uid:
        return bool(info.st_mode & stat.S_IXUSR)
    if info.st_gid in user.groups:
        return bool(info.st_mode & stat.S_IXGRP)
    return bool(info.st_mode & stat.S_IXOTH)


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


class LocalCluster:
    """One private cluster: data in data_dir, reachable only through a socket in socket_dir.

    Trust authentication is safe only because socket_dir is mode 0700 and owned by the
    server's user, so socket_dir must be a directory of its own, not a shared one.
    """

    def __init__(self, data_dir: Path, socket_dir: Path, log_path: Path) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.socket_dir = Path(socket_dir).resolve()
        self.log_path = Path(log_path).resolve()
        self.db_user = resolve_db_user()
        self._is_root = os.geteuid() == 0
        socket_bytes = len(os.fsencode(self.socket_path))
        if socket_bytes > SOCKET_PATH_LIMIT:
            raise ClusterError(
                f"the PostgreSQL socket path {self.socket_path} is {socket_bytes} bytes; Unix "
                f"sockets need it under {SOCKET_PATH_LIMIT}: move the checkout to a shorter path"
            )

    @property
    def socket_path(self) -> Path:
        return self.socket_dir / f".s.PGSQL.{PORT}"

    def is_initialised(self) -> bool:
        """Whether initdb has run in data_dir."""
        return (self.data_dir / "PG_VERSION").exists()

    def is_running(self) -> bool:
        """Whether the postmaster named in postmaster.pid is alive."""
        try:
            pid = int((self.data_dir / "postmaster.pid").read_text().split("\n", 1)[0])
            # The comm check stops a stale pid file, whose pid was reused, from counting.
            return proctable.program_name(pid) == "postgres"
        except (OSError, ValueError):
            return False

    def initdb(self) -> None:
        """Create the cluster in data_dir, with superuser llamagate and trust auth."""
        if self.is_initialised():
            return
        initdb = find_pg_bin("initdb")
        self._prepare_parent(self.data_dir.parent)
        self.data_dir.mkdir(mode=0o700, exist_ok=True)
        self._give_to_db_user(self.data_dir)
        # --locale=C: the operator's locale may not exist for the server's user.
        argv = [initdb, "-D", self.data_dir, "-U", SUPERUSER, "--auth=trust", "-E", "UTF8"]
        result = self._run_as_db_user([*argv, "--locale=C"], timeout=120)
        if result.returncode != 0:
            raise ClusterError(f"initdb failed in {self.data_dir}:\n{_tail(result.stdout)}")

    def start(self, timeout: float = 30) -> bool:
        """Start the server unless it is running; return whether it was started."""
        if self.is_running():
            return False
        if not self.is_initialised():
            raise ClusterError(f"no PostgreSQL cluster in {self.data_dir}; initialise it first")
        pg_ctl = find_pg_bin("pg_ctl")
        self._prepare_socket_dir()
        self._prepare_log_file()
        self._write_settings()
        argv = [pg_ctl, "-D", self.data_dir, "-l", self.log_path, "-w", "-t", str(int(timeout))]
        result = self._run_as_db_user([*argv, "start"], timeout=timeout + 10)
        if result.returncode != 0:
            log = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
            raise ClusterError(
                f"PostgreSQL did not start: {result.stdout.strip()}\n"
                f"last lines of {self.log_path}:\n{_tail(log)}"
            )
        return True

    def stop(self, timeout: float = 30) -> bool:
        """Stop the server (fast mode); return whether it was running."""
        if not self.is_running():
            return False
        argv = [find_pg_bin("pg_ctl"), "-D", self.data_dir, "-m", "fast", "-w"]
        result = self._run_as_db_user([*argv, "-t", str(int(timeout)), "stop"], timeout + 10)
        # A server that exited on its own between the check and pg_ctl is stopped all the same.
        if result.returncode != 0 and self.is_running():
            raise ClusterError(f"PostgreSQL did not stop: {result.stdout.strip()}")
        return True

    def create_database(self, name: str) -> None:
        """Create database name unless it exists."""

        async def create(conn: asyncpg.Connection) -> None:
            if await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name):
                return
            # Another process may create it between the check and here.
            with contextlib.suppress(asyncpg.DuplicateDatabaseError):
                await conn.execute(f"CREATE DATABASE {_quote_ident(name)}")

        self._run_admin(create, f"cannot create database {name}")

    def drop_database(self, name: str) -> None:
        """Drop database name if it exists, disconnecting its sessions."""

        async def drop(conn: asyncpg.Connection) -> None:
            await conn.execute(f"DROP DATABASE IF EXISTS {_quote_ident(name)} WITH (FORCE)")

        self._run_admin(drop, f"cannot drop database {name}")

    def dsn(self, database: str = "llamagate") -> str:
        """An asyncpg/libpq DSN for database through the private socket."""
        # The explicit port keeps a PGPORT in the environment from redirecting clients.
        host = quote(str(self.socket_dir), safe="/")
        return f"postgresql://{SUPERUSER}@/{quote(database, safe='')}?host={host}&port={PORT}"

    def ensure_running(
        self, database: str = "llamagate", echo: Callable[[str], None] | None = None
    ) -> str:
        """Initialise if needed, start, create database; return its DSN."""
        if not self.is_initialised():
            if echo:
                echo(f"initialising a private PostgreSQL cluster in {self.data_dir}")
            self.initdb()
        self.start()
        self.create_database(database)
        return self.dsn(database)

    def _run_as_db_user(self, argv: list[object], timeout: float) -> subprocess.CompletedProcess:
        user = self.db_user
        as_user = {}
        if self._is_root:
            # extra_groups drops root's supplementary groups, which would otherwise be kept.
            as_user = {"user": user.uid, "group": user.gid, "extra_groups": list(user.groups)}
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": user.home, "USER": user.name}
        try:
            return subprocess.run(
                [str(arg) for arg in argv],
                cwd=self.data_dir,  # root's cwd may be closed to the server's user
                env={**env, "LOGNAME": user.name, "LC_ALL": "C"},
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                timeout=timeout,
                **as_user,
            )
        except (OSError, subprocess.SubprocessError) as exc:
            raise ClusterError(f"cannot run {Path(argv[0]).name} as {user.name}: {exc}") from exc

    def _run_admin(
        self, action: Callable[[asyncpg.Connection], Awaitable[None]], what: str
    ) -> None:
        """Run action on a connection to the maintenance database `postgres`."""

        async def run() -> None:
            conn = await asyncpg.connect(self.dsn("postgres"), timeout=10)
            try:
                await action(conn)
            finally:
                await conn.close()

        try:
            _run_blocking(run)
        except (OSError, asyncpg.PostgresError) as exc:
            raise ClusterError(f"{what} through {self.socket_path}: {exc}") from exc

    def _prepare_parent(self, directory: Path) -> None:
        """Make directory exist and be reachable by the server's user, or say what blocks it."""
        for parent in [*reversed(directory.parents), directory]:
            if not parent.exists():
                break
            if not can_enter(parent, self.db_user):
                raise ClusterError(
                    f"PostgreSQL runs as '{self.db_user.name}', which cannot enter {parent}; "
                    f"allow it with `chmod o+x {parent}`, or move the checkout somewhere it can"
                )
        # Directories we create are ours, so they get a mode the server's user can traverse.
        missing = [path for path in [directory, *directory.parents] if not path.exists()]
        for path in reversed(missing):
            path.mkdir(exist_ok=True)
            path.chmod(0o755)

    def _prepare_socket_dir(self) -> None:
        self._prepare_parent(self.socket_dir.parent)
        self.socket_dir.mkdir(mode=0o700, exist_ok=True)
        self.socket_dir.chmod(0o700)
        self._give_to_db_user(self.socket_dir)

    def _prepare_log_file(self) -> None:
        # pg_ctl opens the log as the server's user, who cannot create files in runtime/logs.
        self._prepare_parent(self.log_path.parent)
        os.close(os.open(self.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640))
        self._give_to_db_user(self.log_path)

    def _write_settings(self) -> None:
        # Rewritten at each start so that a moved checkout gets its new socket path.
        socket_dir = str(self.socket_dir).replace("'", "''")
        settings = self.data_dir / SETTINGS_FILE
        settings.write_text(
            "# Written by llamagate at each start. No TCP: only the private socket.\n"
            "listen_addresses = ''\n"
            f"unix_socket_directories = '{socket_dir}'\n"
            "unix_socket_permissions = 0700\n"
            f"port = {PORT}\n"
        )
        self._give_to_db_user(settings)
        # A mandatory include: a server started without these settings would listen on TCP.
        conf = self.data_dir / "postgresql.conf"
        include = f"include = '{SETTINGS_FILE}'\n"
        if include not in conf.read_text():
            with open(conf, "a") as stream:
                stream.write(f"\n# llamagate's private settings\n{include}")

    def _give_to_db_user(self, path: Path) -> None:
        if self._is_root:
            os.chown(path, self.db_user.uid, self.db_user.gid)


def _run_blocking(coroutine_function: Callable[[], Coroutine[object, object, None]]) -> None:
    """Run a coroutine to completion from sync code, even when an event loop is running."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        asyncio.run(coroutine_function())
        return
    # Inside a loop (async code, an async test) asyncio.run refuses; use a private loop
    # in a worker thread. This blocks the caller's loop briefly, which admin calls can afford.
    with ThreadPoolExecutor(max_workers=1) as pool:
        pool.submit(lambda: asyncio.run(coroutine_function())).result()


def _tail(text: str, lines: int = 20) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])
