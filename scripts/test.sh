#!/usr/bin/env bash
# The test command: installs what is missing, then runs lint, type checks and every test
# (including the VM rig under TCG) through tox, then the compiled data path's tests again
# with its C extension built under AddressSanitizer and UndefinedBehaviorSanitizer.
# Extra arguments go to pytest and make it a focused run: lint, type and those tests.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$root/scripts/install.sh"
cd "$root"
if (($#)); then
  exec "$root/.venv/bin/python" -m tox -e lint,type,tests -- "$@"
fi
exec "$root/.venv/bin/python" -m tox -e lint,type,tests,sanitize
