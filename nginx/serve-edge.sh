#!/bin/bash
# Runs a KIWIspray edge server in the foreground: plain nginx with the
# shipped nginx/kiwispray-edge.conf, rewritten for the central server, the
# port and the cache directory, as nginx/serve.sh runs the central stack.
# Ctrl-C or SIGTERM stops it. The central server must list this machine's
# address in kiwispray.json's "trusted_proxies" to see the machines'
# own addresses.
#
# Environment:
#   UPSTREAM=http://HOST:PORT  the central KIWIspray (required)
#   PORT=5000                  port the edge listens on (all addresses)
#   CACHE=<RUN_DIR>/cache      the image cache; kept when given, so a
#                              restarted edge starts warm
#   RUN_DIR=<tmp>              where nginx.conf, logs and the pid go
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
PORT=${PORT:-5000}
UPSTREAM=${UPSTREAM:-}

say() { echo "kiwispray serve-edge: $*" >&2; }
die() { say "$*"; exit 1; }

[[ $PORT =~ ^[0-9]+$ ]] && (( PORT > 0 && PORT < 65536 )) || die "PORT=$PORT is not a port number"
[ -n "$UPSTREAM" ] || die "UPSTREAM=http://HOST:PORT (the central KIWIspray) is required"
[[ $UPSTREAM =~ ^http://([A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(:([0-9]+))?/?$ ]] \
    || die "UPSTREAM=$UPSTREAM is not http://HOST:PORT"
central=${BASH_REMATCH[1]}:${BASH_REMATCH[3]:-80}
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || die "nginx is not installed (apt-get install nginx-light)"
NGINX=$(command -v nginx || echo /usr/sbin/nginx)

own_run_dir=
if [ -z "${RUN_DIR:-}" ]; then
    RUN_DIR=$(mktemp -d "${TMPDIR:-/tmp}/kiwispray-edge.XXXXXX")
    own_run_dir=1
fi
mkdir -p "$RUN_DIR/tmp"
RUN_DIR=$(cd "$RUN_DIR" && pwd)
CACHE=${CACHE:-$RUN_DIR/cache}
mkdir -p "$CACHE"
CACHE=$(cd "$CACHE" && pwd)

sed -e "s#server 192\.168\.100\.1:5000;#server $central;#" \
    -e "s#/var/cache/kiwispray-edge#$CACHE#g" \
    -e "s#^\(\s*listen\s\+\)5000;#\1$PORT;#" \
    -e "s#^\(\s*listen\s\+\)\[::\]:5000;#\1[::]:$PORT;#" \
    -e "s#access_log /var/log/nginx/kiwispray-edge.access.log#access_log $RUN_DIR/access.log#" \
    "$here/nginx/kiwispray-edge.conf" > "$RUN_DIR/kiwispray-edge.conf"
if [ ! -e /proc/net/if_inet6 ]; then
    sed -i '/listen\s\+\[::\]/d' "$RUN_DIR/kiwispray-edge.conf"
fi
user_line=
[ "$(id -u)" = 0 ] && user_line="user root;"
cat > "$RUN_DIR/nginx.conf" <<EOC
$user_line
worker_processes 2;
daemon off;
pid $RUN_DIR/nginx.pid;
error_log $RUN_DIR/error.log warn;
events { worker_connections 4096; }
http {
    include /etc/nginx/mime.types;
    default_type application/octet-stream;
    client_body_temp_path $RUN_DIR/tmp/body;
    proxy_temp_path $RUN_DIR/tmp/proxy;
    fastcgi_temp_path $RUN_DIR/tmp/fastcgi;
    uwsgi_temp_path $RUN_DIR/tmp/uwsgi;
    scgi_temp_path $RUN_DIR/tmp/scgi;
    keepalive_requests 100000;
    include $RUN_DIR/kiwispray-edge.conf;
}
EOC
"$NGINX" -t -q -p "$RUN_DIR" -c "$RUN_DIR/nginx.conf" || die "nginx rejected $RUN_DIR/nginx.conf"

pid=
stopping=
stop() {
    [ -n "$stopping" ] && return
    stopping=1
    if [ -n "$pid" ]; then
        kill -TERM "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    fi
    pid=
    [ -n "$own_run_dir" ] && rm -rf "$RUN_DIR"
    say "stopped"
}
trap 'stop; exit 0' INT TERM
trap 'stop' EXIT
"$NGINX" -p "$RUN_DIR" -c "$RUN_DIR/nginx.conf" &
pid=$!
say "edge on port $PORT for $UPSTREAM, cache $CACHE (logs in $RUN_DIR); Ctrl-C stops"
set +e
wait "$pid"
status=$?
pid=
say "nginx exited (status $status)"
exit "$status"
