#!/usr/bin/env bash
# The main job: installs what is missing, then runs `snapimg demo` on the embedded default.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$root/scripts/install.sh"
exec "$root/.venv/bin/snapimg" demo "$@"
