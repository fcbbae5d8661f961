#!/usr/bin/env bash
# Build meshproxy._native_tls with AddressSanitizer + UBSan into a temporary directory and
# run the native tests against that build; fail on any sanitizer report.
#
#   native_tls/test-asan.sh [extra pytest args]
#
# The build never touches the tree: a shadow copy of the meshproxy package (Python sources
# + the sanitized .so) is put first on sys.path. Python itself is not instrumented, so the
# ASan runtime is preloaded; leak detection is off (the interpreter leaks by design).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-$ROOT/.venv/bin/python}
TMP=$(mktemp -d /tmp/mp-asan.XXXXXX)
trap 'rm -rf "$TMP"' EXIT

echo "== building with MESHPROXY_NATIVE_DEBUG=asan in $TMP"
MESHPROXY_NATIVE_DEBUG=asan "$PY" setup.py -q build_ext --force \
    --build-lib "$TMP/lib" --build-temp "$TMP/build" >"$TMP/build.log" 2>&1 \
    || { cat "$TMP/build.log"; exit 1; }
tar -C "$ROOT" --exclude='*.so' --exclude=__pycache__ -cf - meshproxy | tar -C "$TMP/lib" -xf -

LIBASAN=$(gcc -print-file-name=libasan.so)
[ -e "$LIBASAN" ] || { echo "libasan not found (apt-get install gcc)"; exit 1; }
export LD_PRELOAD=$LIBASAN
export ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:log_path=$TMP/report.asan"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1:log_path=$TMP/report.ubsan"
export PYTHONPATH=$TMP/lib PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 MESHPROXY_TEST_BACKENDS=c

cd "$TMP/lib"  # python -m puts the working directory first: the shadow package wins
"$PY" -c 'import meshproxy._native_tls as n, sys; sys.exit(0 if "/mp-asan." in n.__file__ else
          f"the sanitized module is not the one imported: {n.__file__}")'

# Not the curl test: curl inherits LD_PRELOAD and deadlocks in glibc's setlocale under the
# ASan runtime; the public-inbound test covers the same C path.
echo "== native tests under ASan + UBSan"
status=0
"$PY" -m pytest -p no:cacheprovider -c "$ROOT/pyproject.toml" --rootdir "$ROOT" -q \
    "$ROOT/tests/test_native_engine.py" "$ROOT/tests/test_proxy_relay.py" "$ROOT/tests/test_h2relay.py" \
    "$ROOT/tests/test_h2native.py" "$ROOT/tests/test_native_tuning.py" \
    -k "not curl" "$@" || status=$?

reports=$(find "$TMP" -maxdepth 1 -name 'report.*' | sort)
if [ -n "$reports" ]; then
    echo "== sanitizer reports:"
    for r in $reports; do echo "--- $r"; cat "$r"; done
    exit 1
fi
[ "$status" -eq 0 ] || { echo "== tests failed under ASan (status $status)"; exit "$status"; }
echo "== ASan + UBSan: clean"
