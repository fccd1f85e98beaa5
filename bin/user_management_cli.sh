#!/usr/bin/env bash
# Manage the gateway's users, API keys and shared backends: python -m runtime.admin, which finds the
# database (the private cluster, or the server set in .env) and runs proxy.admin.
#   bin/user_management_cli.sh create-user --username alice
#   bin/user_management_cli.sh --help
set -euo pipefail

repo_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv_python="$repo_dir/runtime/.venv/bin/python"
install_stamp="$repo_dir/runtime/.venv/.llamagate-installed"

# As in console.sh: install on first use, or when pyproject.toml changed. Installer
# output goes to stderr so that --json and --csv output stays clean.
if [[ ! -x "$venv_python" || "$(cat "$install_stamp" 2>/dev/null)" != "$(sha256sum "$repo_dir/pyproject.toml" | cut -d' ' -f1)" ]]; then
    flock "$repo_dir/runtime/.install.lock" "$repo_dir/runtime/install.sh" --unless-failed-recently >&2
fi

cd "$repo_dir"
exec "$venv_python" -m runtime.admin "$@"
