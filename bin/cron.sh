#!/usr/bin/env bash
# For cron: run a console command with cron's bare environment, appending its output
# to runtime/logs/cron.log. `ensure` is silent when all is well. Crontab lines (agents.md):
#   * * * * *  /srv/llamagate/bin/cron.sh ensure
#   30 4 * * * /srv/llamagate/bin/cron.sh restart
set -euo pipefail
repo_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# cron's PATH is minimal; the installer needs python3, pip and a compiler on it.
export PATH="/usr/local/bin:/usr/bin:/bin:${PATH:-}"
log_dir="${LLAMAGATE_ROOT:-$repo_dir}/runtime/logs"
mkdir -p "$log_dir"
exec "$repo_dir/console.sh" "$@" >>"$log_dir/cron.log" 2>&1
