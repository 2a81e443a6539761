#!/bin/bash
# `make demo`: the whole KIWIspray life cycle on one QEMU guest, narrated,
# without hardware. In a private network namespace (nothing leaves it, its
# DHCP server answers only there) it starts the stack (nginx/serve.sh with
# nginx, kiwispray-fcgi and dnsmasq), imports the demo image (the e2e test
# image: a real Debian system with kiwispray-firstboot), boots a BIOS guest
# that registers as `new`, sets it to the image, power-cycles it so that
# KIWI's real installer (kiwi-dump) installs it and kexecs into the
# installed system, whose first boot runs the post-install script and
# reports /finish, and power-cycles it once more so that it boots the
# installed system from its disk. The guest's serial console is shown as it
# runs. Everything it started is stopped at the end, also on Ctrl-C.
# Uses the caches of the e2e test (tests/e2e/README.md); run as root.
set -uo pipefail
export LC_ALL=C
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=lib.sh
. "$here/lib.sh"

START=$(date +%s)
say() { printf '\n\033[1;36m==> [%3ss] %s\033[0m\n' "$(($(date +%s) - START))" "$*"; }
die() { printf '\n\033[1;31mdemo failed: %s\033[0m\n' "$*" >&2; DEMO_OK=0; exit 1; }
hosts() { "$E2E_REPO/target/release/kiwispray-hosts" --root "$ROOT" "$@"; }

env_check
WORK=$(mktemp -d /tmp/kiwispray-demo.XXXXXX)
mkdir -p "$WORK/logs"
: >"$WORK/namespaces"
export WORK
ROOT=$WORK/demo/root
GUEST='' CONSOLE='' DEMO_OK=0

cleanup() {
    trap - EXIT INT TERM
    [ -n "$CONSOLE" ] && kill "$CONSOLE" 2>/dev/null
    [ -n "$GUEST" ] && guest_stop "$GUEST"
    bed_down demo
    if [ "$DEMO_OK" = 1 ]; then
        rm -rf "$WORK"
    else
        echo "logs kept in $WORK" >&2
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# console LOG: shows the guest's serial console as it grows, without
# colour codes and the installer's progress bars.
console() {
    tail -n +1 -F "$1" 2>/dev/null \
        | sed -u 's/\r//g; s/\x1b\[[0-9;?]*[a-zA-Z]//g; s/\x1b[()][0B]//g' \
        | grep --line-buffered -avE '^\s*$|qqqq' | sed -u 's/^/    | /' &
    CONSOLE=$!
}
console_off() { [ -n "$CONSOLE" ] && kill "$CONSOLE" 2>/dev/null; CONSOLE=; }

# power_on LABEL: boots the guest, showing its console (sets LOG, GUEST).
MAC=52:54:00:de:30:01 SERIAL=KS-DEMO-0001 UUID=de300000-0000-4000-8000-000000000001
DISK=$WORK/demo.disk
power_on() {
    LOG=$WORK/logs/demo-$1.serial
    GUEST=$(BED=demo guest_start demo "$1" bios "$DISK" "$SERIAL" "$UUID" "br0:$MAC")
    console "$LOG"
}
power_off() { console_off; guest_stop "$GUEST"; GUEST=; }
# wait_for SECONDS WHAT CMD...: until CMD succeeds, the guest stops or time runs out.
wait_for() {
    local t=$1 what=$2 rc
    shift 2
    guest_wait "$GUEST" "$t" "$LOG" "$@"
    rc=$?
    [ $rc = 0 ] && return 0
    sleep 1
    console_off
    case $rc in
        1) die "the guest stopped before $what" ;;
        2) die "no $what within ${t}s" ;;
        *) die "error on the console before $what" ;;
    esac
}

say "Preparing KIWI's installer and the demo image (built once, then cached in $E2E_CACHE)"
"$here/build-kiwi-installer.sh" "$WORK/kiwi-installer" || die "cannot build KIWI's installer"
P=$("$here/build-image.sh" "$WORK/build" "$WORK/image.raw" "$WORK/kiwi-installer") \
    || die "cannot build the demo image"

say "Starting the stack in network namespace kse2e-$$-demo: nginx, kiwispray-fcgi, dnsmasq on 10.77.0.1"
bed_up demo || die "the stack did not start"
say "Importing the KIWI build $P as image 'demo'"
hosts import-image demo "$WORK/build" || die "import-image failed"
truncate -s $(($(stat -c %s "$WORK/image.raw") + (64 << 20))) "$DISK"

say "Step 1: an unknown machine boots from the network (SeaBIOS, iPXE) and registers"
power_on 1-register
wait_for 240 "the registration" serial_has "$LOG" 'waits for an operator'
sleep 2
console_off
id=$(db_host "$ROOT" "$MAC" id)
[ -n "$id" ] || die "the machine is not in the database"
say "It is host $id, state new, and waits. The operator's view:"
hosts list

say "Step 2: the operator sets host $id to the image"
echo "    # kiwispray-hosts set $id --state demo --hostname demo-1 --meta '{\"demo\": {\"token\": \"hello\"}}'"
hosts set "$id" --state demo --hostname demo-1 --meta '{"demo": {"token": "hello"}}' || die "set failed"
hosts list

say "Step 3: power-cycle. iPXE boots KIWI's installer; it writes the image, kexecs into the installed system, whose first boot runs kiwispray-firstboot"
power_off
power_on 2-install
wait_for 900 "the installed system's first boot" \
    serial_has "$LOG" 'KIWISPRAY-E2E-INSTALLED-SYSTEM-BOOTED from=kexec'
sleep 1
console_off
say "The post-install script reported /finish; the host is finished:"
hosts list

say "Step 4: power-cycle. iPXE hears 'finished' and leaves; the BIOS boots the installed system from its disk"
power_off
power_on 3-disk
wait_for 480 "the boot from disk" serial_has "$LOG" 'KIWISPRAY-E2E-INSTALLED-SYSTEM-BOOTED from=disk'
sleep 1
power_off

say "Done: registered, installed with kiwi-dump, first boot, /finish, booted from disk. The event log:"
hosts history
DEMO_OK=1
say "Stopping everything"
