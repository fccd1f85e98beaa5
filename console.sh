#!/usr/bin/env bash
# llamagate console: installs on first use, then hands over to the Python console.
# All logic lives in runtime/ (python -m runtime); see agents.md.
set -euo pipefail

repo_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv_python="$repo_dir/runtime/.venv/bin/python"
install_stamp="$repo_dir/runtime/.venv/.llamagate-installed"

# The stamp holds the checksum of pyproject.toml, so a changed dependency list reinstalls.
if [[ ! -x "$venv_python" || "$(cat "$install_stamp" 2>/dev/null)" != "$(sha256sum "$repo_dir/pyproject.toml" | cut -d' ' -f1)" ]]; then
    # flock: overlapping cron runs must not build the venv twice at once; the installer
    # skips what the first run finished.
    flock "$repo_dir/runtime/.install.lock" "$repo_dir/runtime/install.sh" --unless-failed-recently >&2
fi

cd "$repo_dir"
exec "$venv_python" -m runtime "$@"
