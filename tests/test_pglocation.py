"""Where the private cluster lives: the choice, and how it is remembered (pure logic)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from runtime.pgcluster import SOCKET_PATH_LIMIT, DbUser
from runtime.pglocation import (
    OUT_OF_TREE_BASE,
    find_place,
    is_reachable,
    out_of_tree_home,
    out_of_tree_place,
)
from runtime.settings import Paths

STRANGER = DbUser("stranger", 54321, 54321, (54321,), "/")


def test_the_out_of_tree_home_is_stable_distinct_and_short():
    long_root = Path("/root") / ("a-very-long-checkout-directory-name-" * 4)
    home = out_of_tree_home(Paths(long_root))
    assert home == out_of_tree_home(Paths(long_root))
    assert home != out_of_tree_home(Paths(long_root / "other"))
    assert home.parent == OUT_OF_TREE_BASE
    socket = out_of_tree_place(home).socket_dir / ".s.PGSQL.5432"
    assert len(str(socket).encode()) < SOCKET_PATH_LIMIT


def test_the_symlink_remembers_an_out_of_tree_cluster_even_after_a_move(tmp_path):
    home = tmp_path / "var-lib" / "somewhere-0123456789ab"
    moved_root = tmp_path / "moved"
    (moved_root / "runtime").mkdir(parents=True)
    (moved_root / "runtime" / "pgdata").symlink_to(home / "pgdata")
    place = find_place(Paths(moved_root))
    assert place.home == home
    assert (place.data_dir, place.socket_dir) == (home / "pgdata", home / "socket")


def test_an_existing_pgdata_directory_stays_in_the_checkout(tmp_path):
    (tmp_path / "runtime" / "pgdata").mkdir(parents=True)
    place = find_place(Paths(tmp_path))
    assert not place.is_out_of_tree
    assert place.data_dir == tmp_path / "runtime" / "pgdata"


def test_a_private_directory_on_the_way_makes_the_checkout_unreachable():
    # Under /tmp itself: pytest's tmp_path has mode-0700 parents.
    private = Path(tempfile.mkdtemp(prefix="lg-reach-", dir="/tmp"))
    try:
        (private / "checkout").mkdir()
        private.chmod(0o755)
        assert is_reachable(private / "checkout" / "runtime", STRANGER)
        private.chmod(0o700)
        assert not is_reachable(private / "checkout" / "runtime", STRANGER)
    finally:
        shutil.rmtree(private)
