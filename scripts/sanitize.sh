#!/usr/bin/env bash
# Builds snapimg's C extension with AddressSanitizer and UndefinedBehaviorSanitizer
# into a copy of the package and runs the tests of the compiled data path against it
# (the engine suite on both data paths, the NBD transmission in C, the interop suite
# through `snapimg serve`, the differential test).  Any sanitizer report fails the run.
# Extra arguments go to pytest.  Run by `tox -e sanitize` (part of scripts/test.sh).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${PYTHON:-python}
if [ -z "${PYTHON:-}" ] && [ -z "${VIRTUAL_ENV:-}" ] && [ -x "$root/.venv/bin/python" ]; then
  python="$root/.venv/bin/python"
fi
work=$(mktemp -d)
trap '[ -n "${SANITIZE_KEEP:-}" ] || rm -rf "$work"' EXIT
cp -r "$root/snapimg" "$work/snapimg"
rm -f "$work"/snapimg/_datapath*.so
(cd "$root" && SNAPIMG_SANITIZE=1 "$python" setup.py -q build_ext \
    --build-lib "$work" --build-temp "$work/tmp" >/dev/null)
ls "$work"/snapimg/_datapath*.so >/dev/null
# The tests run from the copy (its directory comes first on sys.path, as the
# repository's does in a normal run), and so do the `snapimg serve` children.
cp -r "$root/tests" "$root/pyproject.toml" "$work/"
export PYTHONPATH="$work${PYTHONPATH:+:$PYTHONPATH}"
# Only Python processes get the sanitizer runtimes (QEMU's tools under ASan hang in
# their coroutines): every Python started with this copy's sitecustomize re-executes
# itself once with LD_PRELOAD, and takes it out of the environment of its children.
export SNAPIMG_SANITIZE_PRELOAD="$(gcc -print-file-name=libasan.so):$(gcc -print-file-name=libubsan.so)"
cat >"$work/sitecustomize.py" <<'PY'
import os
import sys

_libs = os.environ.get("SNAPIMG_SANITIZE_PRELOAD")
if _libs and os.environ.get("LD_PRELOAD") != _libs:
    os.environ["LD_PRELOAD"] = _libs
    os.execv(sys.executable, sys.orig_argv)
elif _libs:
    del os.environ["LD_PRELOAD"]
PY
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:log_path=$work/asan"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1:log_path=$work/ubsan"
echo "sanitize: reports go to $work/asan.* and $work/ubsan.*" >&2
cd "$work"
loaded=$("$python" -c 'import os, snapimg._datapath as m; assert "asan" in open("/proc/self/maps").read(); print(m.__file__)')
case "$loaded" in
  "$work"/*) ;;
  *) echo "sanitize: the sanitized build is not the one imported ($loaded)" >&2; exit 1 ;;
esac
status=0
# (not the README example: it runs as another user, on the normal build)
# (--capture=sys: a sanitizer's report, written to file descriptor 2, stays visible)
"$python" -m pytest -q -p no:cacheprovider --capture=sys tests/engine tests/nbd/test_compiled.py tests/datapath \
    tests/interop --ignore tests/interop/test_readme_serving.py "$@" || status=$?
if ls "$work"/asan.* "$work"/ubsan.* >/dev/null 2>&1; then
  cat "$work"/asan.* "$work"/ubsan.* 2>/dev/null >&2
  echo "sanitize: sanitizer reports above" >&2
  exit 1
fi
exit $status
