#!/usr/bin/env bash
# Sets up everything meshproxy needs on a fresh Debian machine: the system packages the
# build and the real-peer tests use, a virtual environment, and the project itself
# (compiling native_tls into meshproxy._native_tls). Safe to run again: it only does
# what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

# The interpreter: $PYTHON if set, else Debian's own /usr/bin/python3.11 (built with PGO and LTO:
# imports, start-up and the coordinator's Python run markedly faster than on a plain
# source build such as pyenv's; see README "Python interpreter"). Installed below if missing.
PY=${PYTHON:-/usr/bin/python3.11}
DEBS=(python3.11 python3.11-dev python3.11-venv libssl-dev libnghttp2-dev openssl curl redis-server redis-tools tcpdump iproute2 procps etcd-server nghttp2-client haproxy nginx stunnel4)

missing=()
for pkg in "${DEBS[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  echo "setup: installing system packages: ${missing[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
fi
# Debian's redis-server package starts a system instance; the tests start their own.

# A .venv made from another interpreter is made again (and everything reinstalled).
want="$("$PY" -c 'import os, sys; print(os.path.realpath(sys.executable))')"
if [ -x .venv/bin/python ] && [ "$(cat .venv/.meshproxy-python 2>/dev/null)" != "$want" ]; then
  echo "setup: .venv was made from another interpreter; making it again from $want"
  rm -rf .venv
fi
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$PY" -m venv .venv
  .venv/bin/pip install -q --upgrade pip "setuptools>=68" wheel
  echo "$want" > .venv/.meshproxy-python
fi
stamp=.venv/.meshproxy-installed
if [ ! -f "$stamp" ] || [ -n "$(find pyproject.toml setup.py native_tls -newer "$stamp" 2>/dev/null | head -1)" ]; then
  echo "setup: installing meshproxy (builds native_tls)"
  .venv/bin/pip install -q -e '.[dev]'
  touch "$stamp"
fi
.venv/bin/python -c "import meshproxy._native_tls as n; print('setup: native module OK,', n.openssl_version())"
# meshproxy never writes bytecode itself (what runs in an enclave must be what was measured):
# compile it here, checked-hash, so that a start does not compile every module from source.
.venv/bin/python -m compileall -q -f --invalidation-mode checked-hash meshproxy
