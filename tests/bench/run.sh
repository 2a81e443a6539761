#!/bin/bash
# `make bench`: measures KIWIspray through the real stack (kiwispray-fcgi
# behind nginx with the shipped nginx/kiwispray.conf) with databases of
# 1,000, 10,000 and 100,000 hosts written by gen-hosts.sh, and compares
# each figure with plain nginx measured in the same run:
#
#   1. /bootstrap of finished hosts (read-only path) vs a static file of
#      the same size from the same nginx;
#   2. /bootstrap of hosts in an install state (a new bootid is written);
#   3. a registration storm of unknown machines at 64 connections, checked
#      for lost registrations and duplicate ids;
#   4. a 1 GiB image download and 64 KiB range requests, vs a plain nginx
#      server block on the same file;
#   5. resident memory of kiwispray-fcgi;
#   6. how the figures scale from 1k to 10k to 100k hosts;
#   7. the ceiling of the architecture: a no-op FastCGI responder on the
#      vendored fastcgi crate (examples/noop-fcgi.rs) behind the same
#      nginx, answering the finished host's bytes to the same requests;
#   8. the CLI on the same database: a single-host command (by id, and by
#      MAC, which builds the key index), a bulk `set --where` of 1,000
#      hosts, and `import-inventory` of 10,000 rows (half updates of
#      existing hosts, half new ones), each as one write.
#
# It prints a table and writes it to target/bench/results.md. These are
# benchmarks: a missed target is reported, not failed. A lost registration,
# a duplicate id or an error response fails the run (exit 1).
#
# Usage: tests/bench/run.sh [--smoke] [--sizes 1000,10000] [--seconds N]
#   --smoke    tiny databases, one-second runs, a 16 MiB image: a check
#              that the benchmark and the stack work, for CI
# Environment: BIN_DIR (default target/release), BENCH_DIR (default
# target/bench), PORT (first port to try, default 15680).
# Needs nginx, wrk and curl (make deps-bench installs them). Only
# 127.0.0.1 is used.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
BIN_DIR=${BIN_DIR:-$repo/target/release}
OUT=${BENCH_DIR:-$repo/target/bench}

say() { echo "bench: $*" >&2; }
die() { say "$*"; exit 1; }

smoke=
sizes=(1000 10000 100000)
seconds=5
while [ $# -gt 0 ]; do
    case $1 in
        --smoke) smoke=1 ;;
        --sizes) shift; IFS=, read -ra sizes <<<"${1:?--sizes needs a list}" ;;
        --seconds) shift; seconds=${1:?--seconds needs a number} ;;
        -h|--help) sed -n '2,/^set -e/p' "$0" | sed 's/^# \{0,1\}//;$d'; exit 0 ;;
        *) die "unknown argument $1 (see --help)" ;;
    esac
    shift
done
if [ -n "$smoke" ]; then
    sizes=(100 1000)
    seconds=1
    storm=100
    image_size=$((16 * 1024 * 1024))
else
    storm=1000
    image_size=$((1024 * 1024 * 1024))
fi
conns=32
storm_conns=64

for cmd in wrk curl awk; do
    command -v $cmd >/dev/null || die "$cmd is not installed (make deps-bench installs it)"
done
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
[ -x "$NGINX" ] || die "nginx is not installed (make deps-bench installs it)"
[ -x "$BIN_DIR/kiwispray-fcgi" ] || die "$BIN_DIR/kiwispray-fcgi is missing; run make build"
NOOP=${NOOP:-$BIN_DIR/examples/noop-fcgi}
if [ ! -x "$NOOP" ]; then
    say "building the no-op responder (examples/noop-fcgi.rs)"
    (cd "$repo" && cargo build --release --locked --example noop-fcgi) >&2 || die "cannot build examples/noop-fcgi.rs"
fi

port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
port=${PORT:-15680}
while ! port_free "$port" || ! port_free $((port + 1)); do port=$((port + 2)); done
plain_port=$((port + 1))

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
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
    die "nothing listens on 127.0.0.1:$1"
}

# "requests/s errors" from wrk's output.
run_wrk() { # script kind url [connections]
    local out
    out=$(KS_HOSTS=$size KS_KIND=$2 KS_SIZE=$image_size KS_PATH=/images/bench/big.img \
        wrk -t2 -c"${4:-$conns}" -d"${seconds}s" --timeout 10s -s "$here/$1" "$3" 2>&1) ||
        die "wrk failed: $out"
    echo "$out" >>"$run/wrk.log"
    awk '/Requests\/sec/ { rps = $2 }
         /Non-2xx/ { bad += $NF }
         /Socket errors/ { gsub(/,/, ""); bad += $4 + $6 + $8 + $10 }
         END { printf "%.0f %d\n", rps, bad }' <<<"$out"
}

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "n/a" }'; }

big="$OUT/big-$image_size.img"
[ -e "$big" ] || truncate -s "$image_size" "$big"

failed=
rows=()
declare -A fin_rps
user_line=
[ "$(id -u)" = 0 ] && user_line="user root;"

for size in "${sizes[@]}"; do
    say "=== $size hosts ==="
    root="$OUT/root-$size"
    run="$OUT/run-$size"
    rm -rf "$root" "$run"
    mkdir -p "$root/images/bench" "$run/tmp"
    chmod 755 "$OUT" "$root" "$run"
    cp -a "$repo/templates" "$root/templates"
    ln -s "$big" "$root/images/bench/big.img"
    "$here/gen-hosts.sh" "$size" >"$root/known_hosts.json"
    # Install-state boots repeat for the same hosts without a /finish: keep
    # the loop breaker out of the measurement.
    echo '{"max_install_boots": 1000000000}' >"$root/kiwispray.json"

    # The stack, as nginx/serve.sh runs it, but on 127.0.0.1 only.
    sock="$run/fcgi.sock"
    "$BIN_DIR/kiwispray-fcgi" --root "$root" --bind "unix:$sock" --socket-mode 666 \
        2>>"$run/fcgi.log" &
    fcgi_pid=$!
    pids+=("$fcgi_pid")
    for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.05; done
    [ -S "$sock" ] || die "kiwispray-fcgi did not create $sock (see $run/fcgi.log)"
    sed -e "s#/srv/kiwispray#$root#g" \
        -e "s#unix:/run/kiwispray/fcgi.sock#unix:$sock#" \
        -e "s#^\(\s*listen\s\+\)5000;#\1127.0.0.1:$port;#" \
        -e "/^\s*listen\s\+\[::\]:5000;/d" \
        -e "s#access_log /var/log/nginx/kiwispray.access.log;#access_log $run/access.log;#" \
        "$repo/nginx/kiwispray.conf" >"$run/kiwispray.conf"
    # The no-op responder, in the same server block and configured like
    # the handler's own location.
    noop_sock="$run/noop.sock"
    awk -v sock="$noop_sock" '
        /^[[:space:]]*location ~ \^\/\(bootstrap\|/ && !done {
            print "    location = /noop {"
            print "        include /etc/nginx/fastcgi_params;"
            print "        fastcgi_param HTTP_HOST $http_host;"
            print "        fastcgi_pass unix:" sock ";"
            print "        fastcgi_next_upstream off;"
            print "    }"
            done = 1
        }
        { print }' "$run/kiwispray.conf" >"$run/kiwispray.conf.new"
    mv "$run/kiwispray.conf.new" "$run/kiwispray.conf"
    grep -q 'location = /noop' "$run/kiwispray.conf" || die "could not add the no-op location to the nginx config"
    cat >"$run/nginx.conf" <<NGINX
$user_line
worker_processes 2;
daemon off;
pid $run/nginx.pid;
error_log $run/error.log warn;
events { worker_connections 4096; }
http {
    include /etc/nginx/mime.types;
    default_type application/octet-stream;
    client_body_temp_path $run/tmp/body;
    proxy_temp_path $run/tmp/proxy;
    fastcgi_temp_path $run/tmp/fastcgi;
    uwsgi_temp_path $run/tmp/uwsgi;
    scgi_temp_path $run/tmp/scgi;
    keepalive_requests 100000;
    include $run/kiwispray.conf;
    # Plain nginx on the same files, for comparison.
    server {
        listen 127.0.0.1:$plain_port;
        root $root;
        sendfile on;
        access_log $run/plain-access.log;
    }
}
NGINX
    "$NGINX" -p "$run" -c "$run/nginx.conf" 2>>"$run/error.log" &
    pids+=($!)
    wait_port "$port"
    wait_port "$plain_port"
    base="http://127.0.0.1:$port"

    # The static file: a finished host's answer, served by nginx.
    t0=$(date +%s.%N)
    code=$(curl -s -o "$root/images/bench/finished.ipxe" -w '%{http_code}' \
        "$base/bootstrap?net0=0c-c4-7a-00-00-01&serial=CZ0000001K")
    load_s=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.2f", b - a }')
    [ "$code" = 200 ] || die "first /bootstrap answered $code: $(cat "$root/images/bench/finished.ipxe")"
    grep -q 'exit 1' "$root/images/bench/finished.ipxe" || die "host 1 is not answered as finished"
    rss_idle=$(awk '/VmRSS/ { print int($2 / 1024) }' "/proc/$fcgi_pid/status")

    "$NOOP" "$noop_sock" "$root/images/bench/finished.ipxe" 2>>"$run/noop.log" &
    pids+=($!)
    for _ in $(seq 100); do [ -S "$noop_sock" ] && break; sleep 0.05; done
    cmp -s <(curl -s "$base/noop") "$root/images/bench/finished.ipxe" ||
        die "the no-op responder does not answer the finished host's bytes (see $run/noop.log)"

    read -r static_rps static_err < <(run_wrk bootstrap.lua finished "$base/images/bench/finished.ipxe")
    read -r noop_rps noop_err < <(run_wrk bootstrap.lua finished "$base/noop")
    read -r fin_rps_now fin_err < <(run_wrk bootstrap.lua finished "$base/bootstrap")
    read -r inst_rps inst_err < <(run_wrk bootstrap.lua install "$base/bootstrap")
    fin_rps[$size]=$fin_rps_now
    say "static $static_rps/s, no-op responder $noop_rps/s, finished $fin_rps_now/s, install $inst_rps/s"
    for e in "$static_err" "$noop_err" "$fin_err" "$inst_err"; do
        [ "$e" = 0 ] || { say "error responses during the /bootstrap runs (see $run/wrk.log)"; failed=1; }
    done

    # The storm: unknown machines, each with its own MAC, all at once.
    mkdir -p "$run/storm"
    : >"$run/storm.curl"
    for j in $(seq 1 "$storm"); do
        printf 'url = "%s/bootstrap?net0=52-54-00-%02x-%02x-%02x&serial=STORM%05d&platform=efi"\noutput = "%s/storm/%d"\n' \
            "$base" $((j / 65536)) $((j / 256 % 256)) $((j % 256)) "$j" "$run" "$j" >>"$run/storm.curl"
    done
    t0=$(date +%s.%N)
    # Like iPXE, a machine told 503 (Retry-After) asks again.
    curl -s --no-progress-meter --parallel --parallel-immediate --parallel-max "$storm_conns" --config "$run/storm.curl" \
        --retry 5 -w '%{http_code}\n' >"$run/storm.codes" || true
    storm_s=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.2f", b - a }')
    storm_ok=$(grep -c '^200$' "$run/storm.codes" || true)
    storm_503=$(grep '/bootstrap?net0=52-54-00-' "$run/access.log" | grep -c '" 503 ' || true)
    ids=$(cat "$run"/storm/* | grep -ho 'registered as host [0-9]*' | awk '{ print $4 }' | sort -n)
    storm_ids=$(printf '%s\n' "$ids" | grep -c . || true)
    storm_dup=$(printf '%s\n' "$ids" | uniq -d | grep -c . || true)
    # Every answered registration is in the database, once.
    in_db=$(grep -oE '52:54:00:[0-9A-F]{2}:[0-9A-F]{2}:[0-9A-F]{2}' "$root/known_hosts.json" | sort | uniq -c)
    storm_in_db=$(printf '%s\n' "$in_db" | grep -c . || true)
    storm_twice=$(printf '%s\n' "$in_db" | awk '$1 > 1' | grep -c . || true)
    listed=$(curl -s "$base/hosts" | tail -n +2 | grep -c . || true)
    storm_lost=$((storm - storm_in_db))
    say "storm: $storm in ${storm_s}s, $storm_ok answered 200, $storm_ids ids ($storm_dup duplicate), $storm_in_db in the database, /hosts lists $listed"
    if [ "$storm_ok" != "$storm" ] || [ "$storm_ids" != "$storm" ] || [ "$storm_dup" != 0 ] ||
        [ "$storm_lost" != 0 ] || [ "$storm_twice" != 0 ] || [ "$listed" != $((size + storm)) ]; then
        say "registration storm lost or duplicated machines"
        failed=1
    fi
    rss=$(awk '/VmRSS/ { print int($2 / 1024) }' "/proc/$fcgi_pid/status")
    hwm=$(awk '/VmHWM/ { print int($2 / 1024) }' "/proc/$fcgi_pid/status")
    threads=$(awk '/Threads/ { print $2 }' "/proc/$fcgi_pid/status")

    # Image download and range requests: the kiwispray server block vs plain.
    dl() { curl -s -o /dev/null -w '%{speed_download} %{size_download} %{http_code}\n' "$1"; }
    read -r ks_bps ks_bytes ks_code < <(dl "$base/images/bench/big.img")
    read -r plain_bps plain_bytes plain_code < <(dl "http://127.0.0.1:$plain_port/images/bench/big.img")
    if [ "$ks_code" != 200 ] || [ "$ks_bytes" != "$image_size" ] || [ "$plain_bytes" != "$image_size" ]; then
        say "image download incomplete: $ks_code $ks_bytes bytes (plain: $plain_code $plain_bytes)"
        failed=1
    fi
    read -r ks_range range_err < <(run_wrk range.lua range "$base/images/bench/big.img" 16)
    read -r plain_range plain_range_err < <(run_wrk range.lua range "http://127.0.0.1:$plain_port/images/bench/big.img" 16)
    # wrk counts 206 as success.
    [ "$range_err" = 0 ] && [ "$plain_range_err" = 0 ] || { say "range requests failed"; failed=1; }
    ks_mbs=$(awk -v b="$ks_bps" 'BEGIN { printf "%.0f", b / 1048576 }')
    plain_mbs=$(awk -v b="$plain_bps" 'BEGIN { printf "%.0f", b / 1048576 }')

    # The CLI on the same database, with the handler running.
    cli_s() { # prints the wall time of one kiwispray-hosts command
        local t0
        t0=$(date +%s.%N)
        "$BIN_DIR/kiwispray-hosts" --root "$root" "$@" >>"$run/cli.log" 2>&1 ||
            die "kiwispray-hosts $* failed (see $run/cli.log)"
        awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.2f", b - a }'
    }
    show_id_s=$(cli_s show 5)
    show_mac_s=$(cli_s show 0C:C4:7A:00:00:05)
    bulk=$((size < 2000 ? size / 2 : 1000))
    bulk_s=$(cli_s set --where "id=1-$bulk" --meta-set bench.bulk=1 --yes)
    bulk_now=$(grep -c '"bulk": 1' "$root/known_hosts.json" || true)
    [ "$bulk_now" = "$bulk" ] || { say "bulk set changed $bulk_now hosts, not $bulk"; failed=1; }
    # the inventory: half of its rows existing hosts (by MAC), half new
    rows_n=$((size < 20000 ? size / 2 : 10000))
    awk -v n="$rows_n" 'BEGIN {
        print "mac,serial,hostname,metadata.rack"
        for (j = 1; j <= n; j++) {
            if (j % 2) { i = j; printf "0C:C4:7A:%02X:%02X:%02X,,inv%06d.example.net,R%02d\n", int(i / 65536) % 256, int(i / 256) % 256, i % 256, j, j % 40 }
            else printf "02:BE:00:%02X:%02X:%02X,INV%07d,inv%06d.example.net,R%02d\n", int(j / 65536) % 256, int(j / 256) % 256, j % 256, j, j, j % 40
        }
    }' >"$run/inventory.csv"
    import_s=$(cli_s import-inventory "$run/inventory.csv")
    imported=$(curl -s "$base/hosts" | tail -n +2 | grep -c . || true)
    [ "$imported" = $((size + storm + rows_n / 2)) ] ||
        { say "after the import /hosts lists $imported hosts, not $((size + storm + rows_n / 2))"; failed=1; }
    say "CLI: show by id ${show_id_s}s, by MAC ${show_mac_s}s, set --where of $bulk ${bulk_s}s, import of $rows_n rows ${import_s}s"

    rows+=("| $size | $static_rps | $noop_rps | $fin_rps_now | $(ratio "$fin_rps_now" "$noop_rps") | $(ratio "$fin_rps_now" "$static_rps") | $inst_rps | $storm_s s, $storm_ok/$storm, lost $storm_lost, dup $storm_dup, 503 $storm_503 | $ks_mbs / $plain_mbs MiB/s ($(ratio "$ks_bps" "$plain_bps")) | $ks_range / $plain_range ($(ratio "$ks_range" "$plain_range")) | $rss_idle / $rss / $hwm | $threads | $load_s s | $show_id_s / $show_mac_s s | $bulk_s s ($bulk) | $import_s s ($rows_n) |")
    cleanup
done

machine="$(nproc) cores, $(awk '/MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo), $(uname -r)"
{
    echo "# KIWIspray benchmark"
    echo
    echo "$(date -u +%Y-%m-%dT%H:%M:%SZ), $machine, ${seconds}s per wrk run,"
    echo "$conns connections (range: 16), storm of $storm at $storm_conns connections,"
    echo "image of $((image_size / 1048576)) MiB${smoke:+, smoke run}."
    echo
    echo "| hosts | static req/s | no-op FastCGI req/s | finished /bootstrap req/s | ratio to no-op | ratio to static | install /bootstrap req/s | registration storm | image download ks / plain (ratio) | range req/s ks / plain (ratio) | RSS MiB idle / after / peak | threads | first request (load) | CLI show by id / MAC | set --where | import-inventory |"
    echo "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    printf '%s\n' "${rows[@]}"
    echo
    prev=
    for size in "${sizes[@]}"; do
        if [ -n "$prev" ]; then
            echo "Finished /bootstrap from $prev to $size hosts: falls by $(ratio "${fin_rps[$prev]}" "${fin_rps[$size]}")x."
        fi
        prev=$size
    done
} >"$OUT/results.md"
cat "$OUT/results.md"
say "results in $OUT/results.md"
[ -z "$failed" ] || die "errors during the run (see above)"
