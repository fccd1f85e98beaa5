#!/usr/bin/env bash
# For cron: start whatever is down. Silent when all is well; anything it does or fails
# to do is appended to runtime/logs/cron.log. The crontab line (see agents.md):
#   * * * * * /srv/llamagate/bin/cron_ensure.sh
set -euo pipefail
repo_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# cron's PATH is minimal; the installer needs python3, pip and a compiler on it.
export PATH="/usr/local/bin:/usr/bin:/bin:${PATH:-}"
log_dir="${LLAMAGATE_ROOT:-$repo_dir}/runtime/logs"
mkdir -p "$log_dir"
exec "$repo_dir/console.sh" ensure >>"$log_dir/cron.log" 2>&1
