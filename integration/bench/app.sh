#!/bin/sh
# meshproxy's app in the bench: the same two backends every other candidate talks to (the
# C sink and nginx with 100-byte responses), listening on the Unix sockets meshproxy
# assigns, pinned to CPU 0 like the other candidates' backends. Stops both on SIGTERM.
#   app.sh SINK_BIN LIFETIME_S NGINX_CONF NGINX_PREFIX
set -eu
taskset -c 0 "$1" "unix:$MESHPROXY_INBOUND_BULK" "$2" &
sink=$!
taskset -c 0 nginx -c "$3" -p "$4" -e "$4/error.log" &
web=$!
trap 'kill "$sink" "$web" 2>/dev/null; wait' TERM INT HUP
wait
