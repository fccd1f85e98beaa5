"""`console.sh test`: make sure the dev extras are installed, then run pytest."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

from runtime.settings import CODE_DIR

DEV_MODULES = ("pytest", "pytest_aiohttp", "pytest_timeout", "openai", "hypothesis")


def missing_dev_modules() -> list[str]:
    return [name for name in DEV_MODULES if importlib.util.find_spec(name) is None]


def run_tests(pytest_args: list[str]) -> int:
    """Install the dev extras if needed, then exec pytest in the checkout."""
    missing = missing_dev_modules()
    if missing:
        print(f"test: installing the dev extras ({', '.join(missing)} missing)", flush=True)
        command = [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--disable-pip-version-check",
            "-q",
            "-e",
            f"{CODE_DIR}[dev]",
        ]
        if subprocess.run(command, check=False).returncode != 0:
            print("test: error: pip could not install the dev extras (see above)", file=sys.stderr)
            return 1
    os.chdir(CODE_DIR)
    os.execv(sys.executable, [sys.executable, "-m", "pytest", *pytest_args])
