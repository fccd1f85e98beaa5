#!/usr/bin/env bash
# Make sure the venv, the database and the schema exist, then run an admin command
# (init-db when none is given). --bootstrap makes runtime.admin start the private
# cluster, creating it on first use, when that is the database in use.
#   bin/bootstrap_user_cli.sh
#   bin/bootstrap_user_cli.sh create-user --username alice
set -euo pipefail

exec "$(dirname "${BASH_SOURCE[0]}")/user_management_cli.sh" --bootstrap "$@"
