"""Where the private cluster's files live: in the checkout, or outside it when they must.

PostgreSQL refuses to run as root, so a root console runs it as the `postgres` system
user. That user cannot traverse a checkout in a private directory such as /root (mode
0700 on Debian). Then the cluster's data, socket and log live in a directory of their
own that the postgres user owns, /var/lib/llamagate/<name>-<hash of the state root>/
(mode 0700), and runtime/pgdata is a symlink to its data directory. The symlink is
what remembers the choice: every later command (stop, status, info, the admin CLI)
follows it, and so does a checkout that was moved. A runtime/pgdata that is a real
directory, from an existing install, stays where it is.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from runtime.pgcluster import DbUser, can_enter, resolve_db_user
from runtime.settings import Paths

OUT_OF_TREE_BASE = Path("/var/lib/llamagate")
# Which checkout a directory under OUT_OF_TREE_BASE belongs to, for an operator tidying up.
OWNER_FILE = "state-root"
NAME_CHARACTERS = re.compile(r"[^A-Za-z0-9._-]")


@dataclass(frozen=True)
class ClusterPlace:
    """The private cluster's data directory, socket directory and server log."""

    data_dir: Path
    socket_dir: Path
    log_path: Path
    # The directory of its own outside the checkout; None when it all lives in runtime/.
    home: Path | None = None

    @property
    def is_out_of_tree(self) -> bool:
        return self.home is not None


def in_tree_place(paths: Paths) -> ClusterPlace:
    return ClusterPlace(paths.pgdata_dir, paths.db_socket_dir, paths.logs_dir / "db.log")


def out_of_tree_place(home: Path) -> ClusterPlace:
    return ClusterPlace(home / "pgdata", home / "socket", home / "db.log", home=home)


def out_of_tree_home(paths: Paths, base: Path = OUT_OF_TREE_BASE) -> Path:
    """A short name that is stable for one state root and distinct between state roots.

    Short because the socket path must stay under about 100 bytes.
    """
    digest = hashlib.sha256(os.fsencode(paths.root)).hexdigest()[:12]
    name = NAME_CHARACTERS.sub("_", paths.root.name)[:24] or "root"
    return base / f"{name}-{digest}"


def find_place(paths: Paths, base: Path = OUT_OF_TREE_BASE) -> ClusterPlace:
    """Where this state root's cluster is, or would be created. Changes nothing."""
    link = paths.pgdata_dir
    if link.is_symlink():
        return out_of_tree_place(Path(os.readlink(link)).parent)
    if link.exists() or os.geteuid() != 0:
        return in_tree_place(paths)
    if is_reachable(paths.runtime_dir, resolve_db_user()):
        return in_tree_place(paths)
    return out_of_tree_place(out_of_tree_home(paths, base))


def is_reachable(directory: Path, user: DbUser) -> bool:
    """Whether user can traverse every existing directory from / down to directory."""
    directory = directory.resolve()
    for parent in [*reversed(directory.parents), directory]:
        if not parent.exists():
            return True  # we create the rest, with a mode the user can traverse
        if not can_enter(parent, user):
            return False
    return True


def prepare_place(paths: Paths, place: ClusterPlace) -> None:
    """Create an out-of-tree home (0700, the server's user's) and link runtime/pgdata to it."""
    if place.home is None:
        return
    user = resolve_db_user()
    try:
        place.home.parent.mkdir(parents=True)
    except FileExistsError:
        pass
    else:
        # 0755 whatever the umask: the server's user must traverse it to reach its home.
        place.home.parent.chmod(0o755)
    place.home.mkdir(mode=0o700, exist_ok=True)
    place.home.chmod(0o700)
    (place.home / OWNER_FILE).write_text(f"{paths.root}\n")
    os.chown(place.home, user.uid, user.gid)
    link = paths.pgdata_dir
    link.parent.mkdir(parents=True, exist_ok=True)
    # The admin CLI's --bootstrap takes no console lock, so it may race a start here.
    with contextlib.suppress(FileExistsError):
        link.symlink_to(place.data_dir)
