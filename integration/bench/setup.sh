#!/usr/bin/env bash
# Installs what `make bench` needs and the tests do not: the peers it compares against
# (haproxy, nginx with its stream module, stunnel), the load generators (wrk; h2load from
# nghttp2-client, recorded for later HTTP/2 scenarios) and the C toolchain for the bench's
# own clients (OpenSSL; GnuTLS for the handshake client `hsc rate`). Only what is missing
# is installed. Debian starts nginx and haproxy as services on install; the bench runs its
# own instances, so while installing a temporary policy-rc.d (only if the machine has
# none) keeps apt from starting them.
set -euo pipefail

DEBS=(haproxy nginx libnginx-mod-stream stunnel4 wrk nghttp2-client gcc libc6-dev libssl-dev
      libgnutls28-dev openssl util-linux procps)

missing=()
for pkg in "${DEBS[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]} == 0)); then
  exit 0
fi

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
echo "bench setup: installing ${missing[*]}"
policy=/usr/sbin/policy-rc.d
ours=""
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\n# temporary, written by meshproxy integration/bench/setup.sh\nexit 101\n' \
    | $SUDO tee "$policy" >/dev/null
  $SUDO chmod 755 "$policy"
  ours=1
fi
cleanup() { if [ -n "$ours" ]; then $SUDO rm -f "$policy"; fi; }
trap cleanup EXIT
$SUDO apt-get update -q >/dev/null
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
