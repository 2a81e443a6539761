#!/bin/bash
# The edge part of `make bench` (called by run.sh, or on its own): N
# machines download the same image at once, (a) straight from the central
# server (nginx with the shipped nginx/kiwispray.conf), (b) through a cold
# edge (nginx with the shipped nginx/kiwispray-edge.conf, an empty cache) and
# (c) through the warm edge. The central server's access log, in a format
# of its own with the body bytes of each request, counts what crossed the
# "uplink". Goal: about one image per rack through the edge, whatever N is;
# N images without it. Prints a Markdown section on stdout.
#
# Usage: tests/bench/edge.sh [--smoke]   (smoke: 16 MiB image, N = 1 and 4)
# Environment: BENCH_DIR (default target/bench), PORT (first port to try,
# default 15780). Needs nginx and curl. Only 127.0.0.1 is used.
# Exit 1 when a download is incomplete or wrong; a missed goal is reported.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
OUT=${BENCH_DIR:-$repo/target/bench}

say() { echo "bench edge: $*" >&2; }
die() { say "$*"; exit 1; }

if [ "${1:-}" = --smoke ]; then
    image_size=$((16 * 1024 * 1024)) counts=(1 4)
else
    image_size=$((256 * 1024 * 1024)) counts=(1 8 32)
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
[ -x "$NGINX" ] || die "nginx is not installed (make deps-bench installs it)"
command -v curl >/dev/null || die "curl is not installed"

port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
port=${PORT:-15780}
while ! port_free "$port" || ! port_free $((port + 1)); do port=$((port + 2)); done
central=$port edge=$((port + 1))

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
run=$OUT/edge-run
root=$run/root
rm -rf "$run"
mkdir -p "$root/images/bench" "$run/central/tmp" "$run/edge"
chmod 755 "$OUT" "$run" "$root"
img=$OUT/edge-image-$image_size.img
# random bytes, so that a wrong slice would show in the checksum
[ -e "$img" ] || head -c "$image_size" /dev/urandom >"$img"
want=$(sha256sum <"$img" | cut -d' ' -f1)
# one name per run: each cold run starts with nothing cached for its file
for n in "${counts[@]}"; do ln "$img" "$root/images/bench/image-$n.img" 2>/dev/null || cp "$img" "$root/images/bench/image-$n.img"; done

pids=()
cleanup() {
    for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
    pids=()
}
trap cleanup EXIT
trap 'exit 130' INT TERM
wait_port() {
    for _ in $(seq 200); do port_free "$1" || return 0; sleep 0.05; done
    die "nothing listens on 127.0.0.1:$1 (see $run/*/error.log)"
}
user_line=
[ "$(id -u)" = 0 ] && user_line="user root;"
# nginx_conf DIR FILE: an nginx.conf in DIR including FILE.
nginx_conf() {
    cat >"$1/nginx.conf" <<NGINX
$user_line
worker_processes 2;
daemon off;
pid $1/nginx.pid;
error_log $1/error.log warn;
events { worker_connections 4096; }
http {
    include /etc/nginx/mime.types;
    default_type application/octet-stream;
    client_body_temp_path $1/tmp/body;
    proxy_temp_path $1/tmp/proxy;
    fastcgi_temp_path $1/tmp/fastcgi;
    uwsgi_temp_path $1/tmp/uwsgi;
    scgi_temp_path $1/tmp/scgi;
    keepalive_requests 100000;
    log_format bench_bytes '\$remote_addr "\$request" \$status \$body_bytes_sent';
    include $2;
}
NGINX
    "$NGINX" -t -q -p "$1" -c "$1/nginx.conf" || die "nginx rejected $1/nginx.conf"
    "$NGINX" -p "$1" -c "$1/nginx.conf" 2>>"$1/error.log" &
    pids+=($!)
}

# The central server: the shipped server block (its /images/ location is
# what the edge fetches from), on 127.0.0.1, with the byte log.
sed -e "s#/srv/kiwispray#$root#g" \
    -e "s#^\(\s*listen\s\+\)5000;#\1127.0.0.1:$central;#" \
    -e "/^\s*listen\s\+\[::\]:5000;/d" \
    -e "s#access_log /var/log/nginx/kiwispray.access.log;#access_log $run/central/access.log bench_bytes;#" \
    "$repo/nginx/kiwispray.conf" >"$run/central/kiwispray.conf"
nginx_conf "$run/central" "$run/central/kiwispray.conf"
# The edge: the shipped edge server block, as serve-edge.sh rewrites it.
mkdir -p "$run/edge/tmp" "$run/edge/cache"
sed -e "s#server 192\.168\.100\.1:5000;#server 127.0.0.1:$central;#" \
    -e "s#/var/cache/kiwispray-edge#$run/edge/cache#g" \
    -e "s#^\(\s*listen\s\+\)5000;#\1127.0.0.1:$edge;#" \
    -e "/^\s*listen\s\+\[::\]:5000;/d" \
    -e "s#access_log /var/log/nginx/kiwispray-edge.access.log#access_log $run/edge/access.log#" \
    "$repo/nginx/kiwispray-edge.conf" >"$run/edge/kiwispray-edge.conf"
nginx_conf "$run/edge" "$run/edge/kiwispray-edge.conf"
wait_port "$central"
wait_port "$edge"

# upstream_bytes SINCE FILE: body bytes the central server sent for FILE
# after line SINCE of its log.
upstream_bytes() {
    tail -n +"$(($1 + 1))" "$run/central/access.log" | awk -v f="/images/bench/$2" \
        '$3 == f { b += $(NF) } END { printf "%.0f\n", b }'
}
lines() {
    local n
    n=$(grep -c . "$run/central/access.log" 2>/dev/null) || true
    echo "${n:-0}"
}
failed=
# fetch PORT FILE N: N downloads at once; prints "seconds upstream_bytes".
fetch() {
    local since t0 i cfg=$run/fetch.curl
    since=$(lines)
    : >"$cfg"
    rm -rf "$run/got"
    mkdir -p "$run/got"
    for i in $(seq "$3"); do
        printf 'url = "http://127.0.0.1:%s/images/bench/%s"\noutput = "%s/got/%d"\n' "$1" "$2" "$run" "$i" >>"$cfg"
    done
    t0=$(date +%s.%N)
    curl -s --no-progress-meter --parallel --parallel-immediate --parallel-max "$3" --config "$cfg" -w '%{http_code}\n' >"$run/codes" || true
    local secs
    secs=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.2f", b - a }')
    if [ "$(grep -c '^200$' "$run/codes")" != "$3" ] \
        || [ "$(sha256sum "$run"/got/* | awk '{print $1}' | sort -u)" != "$want" ]; then
        say "port $1, $2, N=$3: a download is incomplete or wrong"
        failed=1
    fi
    rm -rf "$run/got"
    echo "$secs $(upstream_bytes "$since" "$2")"
}
mib() { awk -v b="$1" 'BEGIN { printf "%.1f", b / 1048576 }'; }
images() { awk -v b="$1" -v s="$image_size" 'BEGIN { printf "%.2f", b / s }'; }

rows=()
goal=met
for n in "${counts[@]}"; do
    f=image-$n.img
    read -r c_s c_b < <(fetch "$central" "$f" "$n")
    read -r cold_s cold_b < <(fetch "$edge" "$f" "$n")
    sleep 1.1   # past the edge's second: the warm run asks for the version anew
    read -r warm_s warm_b < <(fetch "$edge" "$f" "$n")
    say "N=$n: central ${c_s}s $(images "$c_b") images upstream; cold edge ${cold_s}s $(images "$cold_b"); warm edge ${warm_s}s $(images "$warm_b")"
    # goal: the cold edge pulls one image (slices rounded up), the warm one none
    awk -v b="$cold_b" -v w="$warm_b" -v s="$image_size" 'BEGIN { exit !(b <= 1.05 * s && w <= 0.01 * s) }' || goal=missed
    rows+=("| $n | $c_s s, $(mib "$c_b") MiB ($(images "$c_b")) | $cold_s s, $(mib "$cold_b") MiB ($(images "$cold_b")) | $warm_s s, $(mib "$warm_b") MiB ($(images "$warm_b")) |")
done
probes=$(awk '$5 == 304 || ($5 == 206 && $6 == 1)' "$run/central/access.log" | grep -c . || true)
cleanup

echo
echo "## Edge server: N downloads of one $(mib "$image_size") MiB image at once"
echo
echo "Time for all N, and the bytes the central server sent (in images). Goal:"
echo "about one image per rack through the edge, whatever N: **$goal**."
echo
echo "| N | from the central server | through a cold edge | through the warm edge |"
echo "|---|---|---|---|"
printf '%s\n' "${rows[@]}"
echo
echo "Each download through the edge first asks for the file's version (one byte,"
echo "or a 304: $probes of those in all)."
[ -z "$failed" ] || exit 1
