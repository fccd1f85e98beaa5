#!/usr/bin/env bash
# For cron: a nightly restart, logged to runtime/logs/cron.log. The crontab line:
#   30 4 * * * /srv/llamagate/bin/cron_restart.sh
set -euo pipefail
repo_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PATH="/usr/local/bin:/usr/bin:/bin:${PATH:-}"
log_dir="${LLAMAGATE_ROOT:-$repo_dir}/runtime/logs"
mkdir -p "$log_dir"
exec "$repo_dir/console.sh" restart >>"$log_dir/cron.log" 2>&1
