#!/bin/sh
# meshproxy's app in the bench: the same two backends every other candidate talks to (the
# C sink, and the HTTP backend with 100-byte responses: the C responder httpd or nginx),
# listening on the Unix sockets meshproxy assigns, pinned to CPU 0 like the other
# candidates' backends. Stops both on SIGTERM.
#   app.sh SINK_BIN LIFETIME_S HTTP_BACKEND_ARGV...   (the argv pins itself: taskset -c 0 ...)
set -eu
sink_bin=$1
lifetime=$2
shift 2
taskset -c 0 "$sink_bin" "unix:$MESHPROXY_INBOUND_BULK" "$lifetime" &
sink=$!
"$@" &
web=$!
trap 'kill "$sink" "$web" 2>/dev/null; wait' TERM INT HUP
wait
