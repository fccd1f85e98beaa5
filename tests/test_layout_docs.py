"""agents.md's layout table names every module of the two packages, so a new module
cannot land undocumented (merges had left several out)."""

from __future__ import annotations

import pytest

from runtime.settings import CODE_DIR


def layout_row(package: str) -> str:
    text = (CODE_DIR / "agents.md").read_text()
    [row] = [line for line in text.splitlines() if line.startswith(f"| `{package}/*.py` |")]
    return row


@pytest.mark.parametrize("package", ["proxy", "runtime"])
def test_the_layout_table_names_every_module_of_the_package(package: str) -> None:
    row = layout_row(package)
    modules = sorted(path.name for path in (CODE_DIR / package).glob("*.py"))

    unnamed = [name for name in modules if f"`{name}`" not in row]

    assert modules and not unnamed, f"agents.md's `{package}/*.py` row does not name {unnamed}"
