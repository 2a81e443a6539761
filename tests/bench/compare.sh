#!/bin/bash
# `make bench-compare BASE=DIR`: finished-host /bootstrap throughput of this
# build against another build of kiwispray-fcgi (BASE: a directory holding
# its binary, e.g. an earlier commit built with `git worktree add` and
# `cargo build --release`), in one run, through one nginx with the shipped
# nginx/kiwispray.conf, on copies of the same database. Plain wrk (no Lua
# script, so the client is not the bottleneck) asks for one finished host
# over and over: the read-only path. The two are measured in turns, ROUNDS
# times each, and the median ratio this/base is printed; so is plain nginx
# serving the same answer as a static file, for scale.
#
# Usage: tests/bench/compare.sh BASE_BIN_DIR [HOSTS] [SECONDS] [ROUNDS]
# Environment: BIN_DIR (this build, default target/release), BENCH_DIR
# (default target/bench). Only 127.0.0.1 is used.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
base_bin=${1:?usage: compare.sh BASE_BIN_DIR [HOSTS] [SECONDS] [ROUNDS]}
hosts=${2:-10000}
seconds=${3:-5}
rounds=${4:-5}
BIN_DIR=${BIN_DIR:-$repo/target/release}
OUT=${BENCH_DIR:-$repo/target/bench}/compare
say() { echo "compare: $*" >&2; }
die() { say "$*"; exit 1; }
for b in "$BIN_DIR" "$base_bin"; do
    [ -x "$b/kiwispray-fcgi" ] || die "$b/kiwispray-fcgi is missing"
done
command -v wrk >/dev/null || die "wrk is not installed (make deps-bench installs it)"
NGINX=$(command -v nginx || echo /usr/sbin/nginx)

port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
port=15780
while ! port_free "$port" || ! port_free $((port + 1)) || ! port_free $((port + 2)); do port=$((port + 3)); done

rm -rf "$OUT"
mkdir -p "$OUT/tmp"
chmod 755 "$OUT"
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap cleanup EXIT

conf=""
n=0
for which in this base; do
    root="$OUT/root-$which"
    mkdir -p "$root/images"
    cp -a "$repo/templates" "$root/templates"
    "$here/gen-hosts.sh" "$hosts" >"$root/known_hosts.json"
    bin=$BIN_DIR
    [ "$which" = base ] && bin=$base_bin
    "$bin/kiwispray-fcgi" --root "$root" --bind "unix:$OUT/$which.sock" --socket-mode 666 \
        2>>"$OUT/$which.log" &
    pids+=($!)
    for _ in $(seq 100); do [ -S "$OUT/$which.sock" ] && break; sleep 0.05; done
    [ -S "$OUT/$which.sock" ] || die "$which kiwispray-fcgi did not start (see $OUT/$which.log)"
    sed -e "s#/srv/kiwispray#$root#g" \
        -e "s#unix:/run/kiwispray/fcgi.sock#unix:$OUT/$which.sock#" \
        -e "s#upstream kiwispray_fcgi#upstream kiwispray_fcgi_$which#" \
        -e "s#fastcgi_pass kiwispray_fcgi;#fastcgi_pass kiwispray_fcgi_$which;#" \
        -e "s#limit_conn_zone \(.*\) zone=kiwispray_fcgi:#limit_conn_zone \1 zone=kiwispray_fcgi_$which:#" \
        -e "s#limit_conn kiwispray_fcgi #limit_conn kiwispray_fcgi_$which #" \
        -e "s#^\(\s*listen\s\+\)5000;#\1127.0.0.1:$((port + n));#" \
        -e "/^\s*listen\s\+\[::\]:5000;/d" \
        -e "s#access_log /var/log/nginx/kiwispray.access.log;#access_log off;#" \
        "$repo/nginx/kiwispray.conf" >"$OUT/$which.conf"
    conf="$conf    include $OUT/$which.conf;"$'\n'
    n=$((n + 1))
done
user_line=
[ "$(id -u)" = 0 ] && user_line="user root;"
cat >"$OUT/nginx.conf" <<NGINX
$user_line
worker_processes 2;
daemon off;
pid $OUT/nginx.pid;
error_log $OUT/error.log warn;
events { worker_connections 4096; }
http {
    include /etc/nginx/mime.types;
    client_body_temp_path $OUT/tmp/body;
    proxy_temp_path $OUT/tmp/proxy;
    fastcgi_temp_path $OUT/tmp/fastcgi;
    uwsgi_temp_path $OUT/tmp/uwsgi;
    scgi_temp_path $OUT/tmp/scgi;
    keepalive_requests 1000000;
$conf
    server { listen 127.0.0.1:$((port + 2)); root $OUT/root-this; access_log off; }
}
NGINX
"$NGINX" -p "$OUT" -c "$OUT/nginx.conf" 2>>"$OUT/error.log" &
pids+=($!)
for p in "$port" $((port + 1)) $((port + 2)); do
    for _ in $(seq 200); do port_free "$p" || break; sleep 0.05; done
done

# Host 1 is finished (gen-hosts.sh).
query="bootstrap?net0=0c-c4-7a-00-00-01&serial=CZ0000001K&platform=efi"
for p in "$port" $((port + 1)); do
    curl -sf "http://127.0.0.1:$p/$query" | grep -q 'exit 1' || die "host 1 is not answered as finished on port $p"
done
curl -sf -o "$OUT/root-this/finished.ipxe" "http://127.0.0.1:$port/$query"

rps() { # url [wrk args]
    local url=$1
    shift
    KS_HOSTS=$hosts KS_KIND=finished wrk -t2 -c32 -d"${seconds}s" "$@" "$url" 2>&1 |
        awk '/Requests\/sec/ { printf "%.0f", $2 }'
}
this=() base=() static=() this_r=() base_r=()
for r in $(seq "$rounds"); do
    this+=("$(rps "http://127.0.0.1:$port/$query")")
    base+=("$(rps "http://127.0.0.1:$((port + 1))/$query")")
    static+=("$(rps "http://127.0.0.1:$((port + 2))/finished.ipxe")")
    # Random finished hosts, so that "last seen" is written for each.
    this_r+=("$(rps "http://127.0.0.1:$port/bootstrap" -s "$here/bootstrap.lua")")
    base_r+=("$(rps "http://127.0.0.1:$((port + 1))/bootstrap" -s "$here/bootstrap.lua")")
    say "round $r: one host: this ${this[-1]}/s, base ${base[-1]}/s, static file ${static[-1]}/s;" \
        "random hosts: this ${this_r[-1]}/s, base ${base_r[-1]}/s"
done
median() { printf '%s\n' "$@" | sort -n | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }'; }
ratios=()
for i in "${!this[@]}"; do
    ratios+=("$(awk -v a="${this[$i]}" -v b="${base[$i]}" 'BEGIN { printf "%.3f", a / b }')")
done
echo "finished /bootstrap at $hosts hosts, $rounds rounds of ${seconds}s, plain wrk -c32:"
echo "  this build: median $(median "${this[@]}") req/s; base: median $(median "${base[@]}") req/s; static file: median $(median "${static[@]}") req/s"
echo "  this/base per round: ${ratios[*]}; median $(median "${ratios[@]}")"
ratios=()
for i in "${!this_r[@]}"; do
    ratios+=("$(awk -v a="${this_r[$i]}" -v b="${base_r[$i]}" 'BEGIN { printf "%.3f", a / b }')")
done
echo "random finished hosts (bootstrap.lua, each host's last seen written once):"
echo "  this build: median $(median "${this_r[@]}") req/s; base: median $(median "${base_r[@]}") req/s"
echo "  this/base per round: ${ratios[*]}; median $(median "${ratios[@]}")"
