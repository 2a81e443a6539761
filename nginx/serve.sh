#!/bin/bash
# Runs the whole KIWIspray stack in the foreground: kiwispray-fcgi behind
# nginx (with nginx/kiwispray.conf, the same file operators install) or
# lighttpd (lighttpd/kiwispray.conf), and dnsmasq only when an interface is
# named. Ctrl-C or SIGTERM stops it all. The web server's own part is in
# <web server>/web.sh.
#
# Environment:
#   PORT=5000        port nginx listens on (all addresses)
#   ROOT=<checkout>  deployment root; filled from the shipped defaults when it
#                    lacks templates/, images/ or known_hosts.json
#   DISCOVER=1       register new machines in discover mode
#   RUN_DIR=<tmp>    where nginx.conf, logs, pid and the socket go
#   BIN_DIR=<dir>    where kiwispray-fcgi is (default target/release)
#   WEB=nginx        the web server: nginx or lighttpd
#   DHCP_IFACE=if    also run dnsmasq (dnsmasq/kiwispray.conf) on that
#                    interface; DHCP_RANGE=start,end,mask,lease and
#                    SERVER_IP (default: the interface's first IPv4 address)
#   DHCP_CONF=kiwispray-ipv6.conf  IPv6-only instead (DHCPv6, router
#                    advertisements): DHCP_RANGE=start,end[,slaac],64,lease
#                    is needed, SERVER_IP defaults to the interface's
#                    first global IPv6 address
#   TFTP=ADDR[:PORT] also run the TFTP front end (kiwispray-fcgi --tftp) on
#                    that address (port 69 unless given), with the web server
#                    named as ADDR:PORT for the templates
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
PORT=${PORT:-5000}
ROOT=${ROOT:-$here}
BIN_DIR=${BIN_DIR:-$here/target/release}
WEB=${WEB:-nginx}

say() { echo "kiwispray serve ($WEB): $*" >&2; }
die() { say "$*"; exit 1; }

[[ $PORT =~ ^[0-9]+$ ]] && (( PORT > 0 && PORT < 65536 )) || die "PORT=$PORT is not a port number"
[ -x "$BIN_DIR/kiwispray-fcgi" ] || die "$BIN_DIR/kiwispray-fcgi is missing; run make build"
case $WEB in
    nginx|lighttpd) ;;
    *) die "WEB=$WEB: the web server must be nginx or lighttpd" ;;
esac

# A new root is filled from the shipped defaults; existing files are kept.
mkdir -p "$ROOT"
ROOT=$(cd "$ROOT" && pwd)
if [ "$ROOT" != "$here" ]; then
    [ -d "$ROOT/templates" ] || { cp -a "$here/templates" "$ROOT/templates"; say "filled $ROOT/templates"; }
    [ -d "$ROOT/images" ] || { cp -a "$here/images" "$ROOT/images"; say "filled $ROOT/images"; }
    # iPXE for UEFI HTTP boot: links to the ipxe package's EFI binaries
    [ -d "$ROOT/boot" ] || { cp -a "$here/boot" "$ROOT/boot"; say "filled $ROOT/boot"; }
fi
[ -e "$ROOT/known_hosts.json" ] || { echo '[]' > "$ROOT/known_hosts.json"; say "created $ROOT/known_hosts.json"; }

own_run_dir=
if [ -z "${RUN_DIR:-}" ]; then
    RUN_DIR=$(mktemp -d "${TMPDIR:-/tmp}/kiwispray-serve.XXXXXX")
    own_run_dir=1
fi
mkdir -p "$RUN_DIR/tmp"
RUN_DIR=$(cd "$RUN_DIR" && pwd)
chmod 755 "$RUN_DIR"
sock="$RUN_DIR/fcgi.sock"

pids=()
stopping=
stop() {
    [ -n "$stopping" ] && return
    stopping=1
    for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
    rm -f "$sock"
    [ -n "$own_run_dir" ] && rm -rf "$RUN_DIR"
    say "stopped"
}
trap 'stop; exit 0' INT TERM
trap 'stop' EXIT

# The handler.
"$BIN_DIR/kiwispray-fcgi" --root "$ROOT" --bind "unix:$sock" --socket-mode 666 \
    ${DISCOVER:+--discover} &
pids+=($!)
for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.05; done
[ -S "$sock" ] || die "kiwispray-fcgi did not create $sock"

# The TFTP front end, only on an address named explicitly.
if [ -n "${TFTP:-}" ]; then
    case $TFTP in
        \[*\]*) tftp_host=${TFTP%%]*}]; ;;          # [v6] or [v6]:port
        *:*:*) tftp_host="[$TFTP]" ;;                  # bare v6
        *) tftp_host=${TFTP%%:*} ;;                    # v4 or v4:port
    esac
    "$BIN_DIR/kiwispray-fcgi" --root "$ROOT" --tftp "$TFTP" --http "$tftp_host:$PORT" \
        ${DISCOVER:+--discover} &
    pids+=($!)
    say "TFTP on $TFTP (web server $tftp_host:$PORT)"
fi

# The web server in front of it.
# shellcheck source=/dev/null
. "$here/$WEB/web.sh"

# dnsmasq, only on an interface named explicitly.
if [ -n "${DHCP_IFACE:-}" ]; then
    command -v dnsmasq >/dev/null || die "dnsmasq is not installed"
    ip link show "$DHCP_IFACE" >/dev/null 2>&1 || die "no interface $DHCP_IFACE"
    DHCP_CONF=${DHCP_CONF:-kiwispray.conf}
    conf="$RUN_DIR/dnsmasq.conf"
    case $DHCP_CONF in
        kiwispray.conf)
            if [ -z "${SERVER_IP:-}" ]; then
                SERVER_IP=$(ip -4 -o addr show dev "$DHCP_IFACE" | awk '{sub(/\/.*/, "", $4); print $4; exit}')
                [ -n "$SERVER_IP" ] || die "$DHCP_IFACE has no IPv4 address; set SERVER_IP"
            fi
            sed -e "s#^interface=.*#interface=$DHCP_IFACE#" \
                -e "s#192\.168\.100\.1:5000#$SERVER_IP:$PORT#g" \
                "$here/dnsmasq/kiwispray.conf" > "$conf"
            url=http://$SERVER_IP:$PORT/bootstrap.ipxe
            ;;
        kiwispray-ipv6.conf)
            [ -n "${DHCP_RANGE:-}" ] || die "DHCP_CONF=$DHCP_CONF needs DHCP_RANGE (start,end,slaac,64,lease in the interface's prefix)"
            if [ -z "${SERVER_IP:-}" ]; then
                SERVER_IP=$(ip -6 -o addr show dev "$DHCP_IFACE" scope global | awk '{sub(/\/.*/, "", $4); print $4; exit}')
                [ -n "$SERVER_IP" ] || die "$DHCP_IFACE has no global IPv6 address; set SERVER_IP"
            fi
            SERVER_IP=${SERVER_IP#[}
            SERVER_IP=${SERVER_IP%]}
            sed -e "s#^interface=.*#interface=$DHCP_IFACE#" \
                -e "s#\[fd00:100::1\]:5000/#[$SERVER_IP]:$PORT/#g" \
                -e "s#\[fd00:100::1\]#[$SERVER_IP]#g" \
                "$here/dnsmasq/kiwispray-ipv6.conf" > "$conf"
            url=http://[$SERVER_IP]:$PORT/bootstrap.ipxe
            ;;
        *) die "DHCP_CONF=$DHCP_CONF: the shipped config is kiwispray.conf or kiwispray-ipv6.conf" ;;
    esac
    [ -n "${DHCP_RANGE:-}" ] && sed -i "s#^dhcp-range=.*#dhcp-range=$DHCP_RANGE#" "$conf"
    dnsmasq --keep-in-foreground --conf-file="$conf" --pid-file="$RUN_DIR/dnsmasq.pid" \
        --dhcp-leasefile="$RUN_DIR/dnsmasq.leases" --log-facility="$RUN_DIR/dnsmasq.log" &
    pids+=($!)
    say "DHCP on $DHCP_IFACE ($DHCP_CONF), bootstrap URL $url"
fi

say "serving $ROOT on port $PORT (logs in $RUN_DIR); Ctrl-C stops"
# If any part dies, stop the rest.
set +e
wait -n "${pids[@]}"
status=$?
say "a component exited (status $status); stopping"
stop
exit "$status"
