#!/usr/bin/env bash
# The test command: installs what is missing, then runs lint, type checks and every test
# (including the VM rig under TCG) through tox.  Extra arguments go to pytest.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$root/scripts/install.sh"
cd "$root"
exec "$root/.venv/bin/python" -m tox -e lint,type,tests -- "$@"
