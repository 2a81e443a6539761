#!/bin/bash
# End-to-end tests of KIWIspray with real firmware, run by `make test` as
# root: QEMU (TCG) guests with SeaBIOS + iPXE or OVMF, the shipped dnsmasq
# config and `nginx/serve.sh` inside private network namespaces, KIWI's real
# network installer (kiwi-dump) and a real installed Debian system running
# kiwispray-firstboot; a busybox stand-in serves the wipe and discover
# states. Scenarios: see issues 4, 5 and 10 and the lane_* functions below.
# Prints "e2e: N passed, M failed[, K skipped]".
#
# Environment: E2E_ALLOW_SKIP=1 (an unusable environment exits 0, still
# loudly), E2E_JOBS (machines at once, default 4), E2E_KEEP=1 (keep the work
# dir), E2E_ONLY="1 2 3" (run only the lanes holding these scenarios),
# E2E_INSTALL_JOBS (install boots at once, default 1),
# E2E_CACHE (installer and image cache, default /var/cache/kiwispray-e2e),
# E2E_TEMPLATES=DIR (templates copied over the shipped ones in the test
# roots, to try a template change).
set -uo pipefail
export LC_ALL=C
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=lib.sh
. "$here/lib.sh"

E2E_START=$(date +%s)
env_check

WORK=$(mktemp -d /tmp/kiwispray-e2e.XXXXXX)
mkdir -p "$WORK/logs" "$WORK/results"
: >"$WORK/namespaces"
export WORK

cleanup() {
    local rc=$? pid ns
    trap - EXIT INT TERM
    for pid in $(cat "$WORK/lanes.pids" 2>/dev/null); do kill -TERM "$pid" 2>/dev/null; done
    for pid in $(cat "$WORK/qemu.pids" 2>/dev/null); do guest_stop "$pid"; done
    for ns in $(sort -u "$WORK/namespaces"); do bed_down "${ns#kse2e-$$-}"; done
    if [ "${E2E_KEEP:-0}" = 1 ] || [ "${E2E_FAILED:-1}" != 0 ]; then
        log "work directory kept: $WORK"
    else
        rm -rf "$WORK"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

IMAGE=kiwispray-e2e
SCENARIOS=(1 2 3 4 5 6 7 8 9 10)
declare -A TITLE=(
    [1]="unknown machine registered as new, serial intact"
    [2]="install with kiwi-dump, kexec, kiwispray-firstboot runs the post-install, finished"
    [3]="finished machine boots the installed system from its disk, database not rewritten"
    [4]="chained state wipe,$IMAGE runs both stages, ends finished"
    [5]="two NICs, DHCP on the second only: same host across boots"
    [6]="UEFI: install with kiwi-dump; finished leaves iPXE, OVMF boots the installed system"
    [7]="discover mode: /update stores MACs and metadata, ends new"
    [8]="proxy DHCP (BIOS, UEFI): address from the site's server, boot from kiwispray-proxy.conf"
    [9]="kiwispray-firstboot: nothing without razorurl=, curl and wget, once per install, /fail on failure"
    [10]="broken image: kiwi-dump fails its checksum and reboots; held (loop) after max_install_boots, no further install"
)
# which machines' serial logs a failed scenario prints
declare -A MACHINE=([1]=A [2]=A [3]=A [4]=B [5]=C [6]=D [7]=E [8]="F G" [9]=none [10]=L)
# the install lanes first: they queue for the install slot (see
# boot_install), the others use the remaining lane while they wait
LANES=(lane_d lane_a lane_b lane_l lane_h lane_e lane_c lane_f)
declare -A LANE_SCEN=([lane_a]="1 2 3" [lane_b]=4 [lane_c]=5 [lane_d]=6 [lane_e]=7 [lane_f]=8 [lane_h]=9 [lane_l]=10)
# beds whose logs a failure prints, and set-up steps of the lane files
BEDS=(main solo disc proxy)
SETUP=()

# --- checks ------------------------------------------------------------------

# ck N WHAT CMD...: runs CMD; when it fails, scenario N fails with WHAT and
# CMD's output as the reason.
ck() {
    local n=$1 what=$2 out
    shift 2
    if ! out=$("$@" 2>&1); then
        fail "$n" "$what" "${out:-check failed}"
        return 1
    fi
}
eq() { [ "$1" = "$2" ] || { echo "got '$1', want '$2'"; return 1; }; }
has() { serial_has "$1" "$2" || { echo "no /$2/ in $(basename "$1")"; return 1; }; }
lacks() { ! serial_has "$1" "$2" || { echo "/$2/ found in $(basename "$1")"; return 1; }; }
done_scenario() { [ -e "$WORK/results/$1" ] || pass "$1" "${TITLE[$1]}"; }
failed() { grep -q '^FAIL' "$WORK/results/$1" 2>/dev/null; }
# a MAC as an ERE matching any spelling: 52:54.., 52-54.., 52%3A54..
macre() { local m; m=$(echo "$1" | sed 's/[a-fA-F]/[\L&\U&]/g'); echo "${m//:/(:|-|%3[aA])}"; }
access_log() { cat "$WORK/$1/run/access.log" 2>/dev/null; }
# disk_head_is DISK RAW: the disk starts with the image, byte for byte, up
# to the root partition (MBR, GRUB, the EFI system partition); the root file
# system changed when the installed system booted.
disk_head_is() { cmp -n "$(($(cat "$2.root-offset-mib") << 20))" "$1" "$2"; }
# disk_record DISK: what the image's post-install wrote in the disk's last MiB.
disk_record() {
    dd if="$1" bs=1M skip=$(($(stat -c %s "$1") / 1048576 - 1)) count=1 status=none | tr -d '\0' | head -n1
}
# install_disk FILE: a disk for the image, with room for the record.
install_disk() { truncate -s $(($(stat -c %s "$WORK/image.raw") + (64 << 20))) "$1"; }
# booted LOG FROM: the installed system's marker, booted by kexec or from disk.
booted() { serial_has "$1" "KIWISPRAY-E2E-INSTALLED-SYSTEM-BOOTED from=$2 "; }
# fetched_image ROOT_RUN SINCE: kiwi-dump fetched the image's files (access
# log lines after line SINCE).
fetched_image() {
    local f missing=()
    for f in sha256 kernel initrd config.bootoptions xz; do
        tail -n +"$(($2 + 1))" "$WORK/$1/run/access.log" \
            | grep -E "\"GET /images/$IMAGE/$P\.$f HTTP/1\.1\" 200 " >/dev/null || missing+=("$f")
    done
    [ "${#missing[@]}" = 0 ] || { echo "not fetched: ${missing[*]}"; return 1; }
}
log_lines() { grep -c . "$WORK/$1/run/access.log" 2>/dev/null || echo 0; }

registered() { [ -n "$(db_host "$1" "$2" id)" ]; }
# new_shown ROOT MAC LOG TEXT: registered, and the console shows TEXT and
# the MAC (new.tmpl prints the host's data).
new_shown() {
    registered "$1" "$2" && serial_has "$3" "$4" && serial_has "$3" "$(macre "$2")"
}
powered_off() { serial_has "$1" 'KIWI-E2E: powering off'; }

# boot MACHINE LABEL FW DISK SERIAL UUID TIMEOUT COND... -- NIC...
# Boots a guest, waits for COND (see guest_wait; @LOG@ in COND is replaced by
# the serial log), stops the guest. Sets LOG, GUEST_ALIVE (the guest was
# still running when COND held) and BOOT_RESULT; returns guest_wait's status.
boot() {
    local m=$1 label=$2 fw=$3 disk=$4 serial=$5 uuid=$6 timeout=$7
    shift 7
    local cond=() nics=() pid rc
    while [ $# -gt 0 ] && [ "$1" != -- ]; do cond+=("$1"); shift; done
    shift
    nics=("$@")
    LOG=$WORK/logs/$m-$label.serial
    pid=$(guest_start "$m" "$label" "$fw" "$disk" "$serial" "$uuid" "${nics[@]}")
    echo "$pid" >>"$WORK/qemu.pids"
    log "guest $m boot $label started (pid $pid)"
    guest_wait "$pid" "$timeout" "$LOG" "${cond[@]//@LOG@/$LOG}"
    rc=$?
    GUEST_ALIVE=0
    kill -0 "$pid" 2>/dev/null && GUEST_ALIVE=1
    # a guest that powers off by itself gets a moment to do so
    for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    guest_stop "$pid"
    case $rc in
        0) BOOT_RESULT="outcome seen" ;;
        1) BOOT_RESULT="guest $m boot $label ended before its outcome was seen" ;;
        2) BOOT_RESULT="guest $m boot $label: no outcome within ${timeout}s" ;;
        *) BOOT_RESULT="guest $m boot $label: error on the console: $(tr -d '\r' <"$LOG" \
               | grep -aE -m1 "$E2E_FATAL" | cut -c1-160)" ;;
    esac
    log "guest $m boot $label done: $BOOT_RESULT"
    return $rc
}
# boot_install ARGS...: boot, for an install. Under TCG the installed
# system's first boot after kexec is slow (the new kernel clears pages the
# old one ran code from, and TCG invalidates its translations on each
# store), and with several of them at once on 2 cores they slow each other
# down to a crawl: at most E2E_INSTALL_JOBS (default 1) install boots run
# at a time; the other machines go on meanwhile.
boot_install() {
    local i fd=
    while [ -z "$fd" ]; do
        for i in $(seq "${E2E_INSTALL_JOBS:-1}"); do
            exec {fd}>"$WORK/install-slot.$i"
            flock -n "$fd" && break
            exec {fd}>&-
            fd=
        done
        [ -n "$fd" ] || sleep 1
    done
    boot "$@"
    local rc=$?
    exec {fd}>&-
    return $rc
}
# boot_ok: the last boot reached its outcome.
boot_ok() { [ "$BOOT_RESULT" = "outcome seen" ] || { echo "$BOOT_RESULT"; return 1; }; }

# --- lanes: one machine each, run in parallel ---------------------------------

# Machine A, BIOS: scenarios 1, 2, 3. It has a bed of its own, so that no
# other machine writes its database while scenario 3 checks that the
# finished path writes nothing.
lane_a() {
    BED=solo
    local root=$WORK/solo/root mac=52:54:00:e2:0a:01 serial='KS E2E#A1 x'
    local uuid=a0e2e2e2-0000-4000-8000-00000000000a disk=$WORK/A.disk id
    truncate -s 8M "$disk"

    # 1. unknown machine -> new; serial with a space and a # arrives intact
    boot A 1-new bios "$disk" "$serial" "$uuid" 240 new_shown "$root" "$mac" @LOG@ 'KS E2E#A1 x' -- "br0:$mac"
    ck 1 "console shows the host data" boot_ok || return
    ck 1 "machine waits (still running)" eq "$GUEST_ALIVE" 1
    id=$(db_host "$root" "$mac" id)
    ck 1 "registered as new" eq "$(db_host "$root" "$mac" state)" new
    ck 1 "serial stored intact" eq "$(db_host "$root" "$mac" serial)" "$serial"
    ck 1 "uuid stored" eq "$(db_host "$root" "$mac" uuid | tr A-F a-f)" "$uuid"
    ck 1 "MAC stored uppercase" eq "$(db_host "$root" "$mac" macs)" "${mac^^}"
    ck 1 "one host holds the MAC" eq "$(db_count "$root" "$mac")" 1
    ck 1 "serial URL-encoded in /bootstrap" grep -q 'GET /bootstrap?.*serial=KS%20E2E%23A1%20x' "$WORK/solo/run/access.log"
    ck 1 "console shows the id" has "$LOG" "(host|id)[ =:]*$id\b"
    done_scenario 1

    # 2. operator sets the image state; the next boot installs with
    # kiwi-dump, which kexecs into the installed system; its first boot runs
    # kiwispray-firstboot, which runs the post-install script (/finish).
    ck 2 "kiwispray-hosts set" host_set "$root" "$id" "$IMAGE" '{"e2e": {"token": "tok-A-4711"}}' e2e-a || return
    install_disk "$disk"
    local since
    since=$(log_lines solo)
    boot_install A 2-install bios "$disk" "$serial" "$uuid" "$INSTALL_TIMEOUT" booted @LOG@ kexec -- "br0:$mac"
    ck 2 "installed system booted by the installer (kexec)" boot_ok
    ck 2 "kiwi-dump fetched checksum, kernel, initrds, boot options and image" fetched_image solo "$since"
    ck 2 "disk equals the image up to the root file system" disk_head_is "$disk" "$WORK/image.raw"
    ck 2 "razorurl passed through kexec with its &" \
        grep -qE "GET /post-install\?id=$id&bootid=[0-9a-f]{32} HTTP/1\.1\" 200 " "$WORK/solo/run/access.log"
    ck 2 "kiwispray-firstboot fetched the post-install" has "$LOG" "kiwispray-firstboot: fetching the post-install script from http://.*/post-install\?id=$id&bootid=<hidden>"
    ck 2 "post-install ran with the host's data" has "$LOG" "E2E-POSTINSTALL: id=$id hostname=e2e-a token=tok-A-4711"
    ck 2 "post-install record on the disk" eq "$(disk_record "$disk")" \
        "E2E-POSTINSTALL id=$id hostname=e2e-a token=tok-A-4711 serial=$serial"
    ck 2 "/finish accepted (shipped post_install.tmpl)" has "$LOG" "KIWIspray: host $id reported finished"
    ck 2 "kiwispray-firstboot succeeded" has "$LOG" 'kiwispray-firstboot: the post-install script succeeded'
    ck 2 "no bootid on the console" lacks "$LOG" "bootid=[0-9a-f]{32}"
    ck 2 "installed system shows the post-install's work" \
        has "$LOG" "BOOTED from=kexec firmware=bios hostname=e2e-a firstboot=done token=tok-A-4711"
    ck 2 "state finished" eq "$(db_host "$root" "$mac" state)" finished
    ck 2 "event log records the change" grep -q '"finished"' "$root/events.jsonl"
    done_scenario 2
    failed 2 && return

    # 3. finished: the firmware boots the installed system from its disk,
    # the database file stays untouched, the first-boot agent does not run
    local before after
    before=$(file_stamp "$root/known_hosts.json")
    local nboot
    nboot=$(access_log solo | grep -cE "GET /bootstrap\?.*$(macre "$mac")")
    since=$(log_lines solo)
    boot A 3-local bios "$disk" "$serial" "$uuid" "$DISK_BOOT_TIMEOUT" booted @LOG@ disk -- "br0:$mac"
    ck 3 "installed system booted from its disk" boot_ok
    ck 3 "GRUB of the installed system ran" has "$LOG" 'KIWISPRAY-E2E: GRUB of the installed system'
    ck 3 "installed system keeps the first boot's work" \
        has "$LOG" "BOOTED from=disk firmware=bios hostname=e2e-a firstboot=done token=tok-A-4711"
    ck 3 "machine asked /bootstrap first" eq "$(access_log solo | grep -cE "GET /bootstrap\?.*$(macre "$mac")")" "$((nboot + 1))"
    after=$(file_stamp "$root/known_hosts.json")
    ck 3 "known_hosts.json not rewritten (inode, mtime, size, content)" eq "$after" "$before"
    ck 3 "still finished" eq "$(db_host "$root" "$mac" state)" finished
    ck 3 "no installer ran" eq "$(tail -n +"$((since + 1))" "$WORK/solo/run/access.log" | grep -c "/images/")" 0
    ck 3 "kiwispray-firstboot did not run (no razorurl=)" lacks "$LOG" 'kiwispray-firstboot:'
    done_scenario 3
}

# Machine B, BIOS: scenario 4, chained wipe,<image>.
lane_b() {
    BED=main
    local root=$WORK/main/root mac=52:54:00:e2:0b:01 serial=KS-E2E-B
    local uuid=b0e2e2e2-0000-4000-8000-00000000000b disk=$WORK/B.disk id
    head -c 8M /dev/urandom >"$disk"     # old contents, for the wipe to remove
    boot B 1-new bios "$disk" "$serial" "$uuid" 240 new_shown "$root" "$mac" @LOG@ "$serial" -- "br0:$mac"
    ck 4 "first boot" boot_ok || return
    ck 4 "registered as new" eq "$(db_host "$root" "$mac" state)" new || return
    id=$(db_host "$root" "$mac" id)
    ck 4 "kiwispray-hosts set wipe,$IMAGE" host_set "$root" "$id" "wipe,$IMAGE" '{"e2e": {"token": "tok-B"}}' e2e-b || return

    boot B 2-wipe bios "$disk" "$serial" "$uuid" 420 powered_off @LOG@ -- "br0:$mac"
    ck 4 "wipe boot" boot_ok
    ck 4 "wipe stage ran first" has "$LOG" 'KIWI-E2E: wipe done'
    ck 4 "wipe stage did not install" lacks "$LOG" 'KIWI-E2E: image '
    ck 4 "wipe zeroed the disk head" cmp -n 1048576 "$disk" /dev/zero
    ck 4 "the shipped post_install.tmpl reported /finish" has "$LOG" "KIWIspray: host $id reported finished"
    ck 4 "after wipe the state is $IMAGE" eq "$(db_host "$root" "$mac" state)" "$IMAGE" || return

    install_disk "$disk"
    local since
    since=$(log_lines main)
    boot_install B 3-install bios "$disk" "$serial" "$uuid" "$INSTALL_TIMEOUT" booted @LOG@ kexec -- "br0:$mac"
    ck 4 "install boot" boot_ok
    ck 4 "image stage installed with kiwi-dump" fetched_image main "$since"
    ck 4 "disk equals the image" disk_head_is "$disk" "$WORK/image.raw"
    ck 4 "post-install of the image stage" eq "$(disk_record "$disk")" \
        "E2E-POSTINSTALL id=$id hostname=e2e-b token=tok-B serial=$serial"
    ck 4 "installed system shows the post-install's work" \
        has "$LOG" "BOOTED from=kexec firmware=bios hostname=e2e-b firstboot=done token=tok-B"
    ck 4 "state finished" eq "$(db_host "$root" "$mac" state)" finished
    done_scenario 4
}

# Machine C, BIOS, two NICs: the first on a network without DHCP. Placeholder
# serial and all-zero UUID, so only the MACs can identify it.
lane_c() {
    BED=main
    local root=$WORK/main/root mac1=52:54:00:e2:0c:01 mac2=52:54:00:e2:0c:02
    local serial='To be filled by O.E.M.' uuid=00000000-0000-0000-0000-000000000000
    local disk=$WORK/C.disk id1 id2 nhosts
    truncate -s 8M "$disk"
    boot C 1-new bios "$disk" "$serial" "$uuid" 360 new_shown "$root" "$mac2" @LOG@ "$(macre "$mac2")" -- "br1:$mac1" "br0:$mac2"
    ck 5 "first boot registered" boot_ok || return
    id1=$(db_host "$root" "$mac2" id)
    ck 5 "both MACs on one host" eq "$(db_host "$root" "$mac1" id)" "$id1"
    ck 5 "DHCP came from the second NIC" grep -qE "GET /bootstrap\?.*dhcp_mac=$(macre "$mac2")" "$WORK/main/run/access.log"
    nhosts=$(python3 -c 'import json,sys; print(len(json.load(open(sys.argv[1]))))' "$root/known_hosts.json")

    boot C 2-again bios "$disk" "$serial" "$uuid" 360 serial_has @LOG@ "(host|id)[ =:]*$id1\b" -- "br1:$mac1" "br0:$mac2"
    ck 5 "second boot shows the same host" boot_ok
    id2=$(db_host "$root" "$mac2" id)
    ck 5 "same host id across boots" eq "$id2" "$id1"
    ck 5 "each MAC on exactly one host" eq "$(db_count "$root" "$mac1")/$(db_count "$root" "$mac2")" 1/1
    ck 5 "no host added by the second boot" eq "$(python3 -c 'import json,sys; print(len(json.load(open(sys.argv[1]))))' "$root/known_hosts.json")" "$nhosts"
    ck 5 "placeholder serial did not merge machines" eq "$(db_host "$root" "$mac2" state)" new
    done_scenario 5
}

# Machine D, UEFI (OVMF, iPXE as snponly.efi over TFTP): scenario 6.
lane_d() {
    BED=main
    local root=$WORK/main/root mac=52:54:00:e2:0d:01 serial=KS-E2E-D
    local uuid=d0e2e2e2-0000-4000-8000-00000000000d disk=$WORK/D.disk id
    truncate -s 8M "$disk"
    boot D 1-new uefi "$disk" "$serial" "$uuid" 360 new_shown "$root" "$mac" @LOG@ "$serial" -- "br0:$mac"
    ck 6 "UEFI first boot" boot_ok || return
    ck 6 "UEFI machine registered" eq "$(db_host "$root" "$mac" state)" new || return
    ck 6 "iPXE reported platform efi" grep -qE "GET /bootstrap\?.*platform=efi" "$WORK/main/run/access.log"
    id=$(db_host "$root" "$mac" id)
    ck 6 "kiwispray-hosts set" host_set "$root" "$id" "$IMAGE" '{"e2e": {"token": "tok-D"}}' e2e-d || return

    install_disk "$disk"
    local since
    since=$(log_lines main)
    boot_install D 2-install uefi "$disk" "$serial" "$uuid" "$INSTALL_TIMEOUT" booted @LOG@ kexec -- "br0:$mac"
    ck 6 "UEFI install boot" boot_ok
    ck 6 "UEFI install: kiwi-dump fetched the image" fetched_image main "$since"
    ck 6 "UEFI install: disk equals the image" disk_head_is "$disk" "$WORK/image.raw"
    ck 6 "UEFI install: post-install" eq "$(disk_record "$disk")" \
        "E2E-POSTINSTALL id=$id hostname=e2e-d token=tok-D serial=$serial"
    ck 6 "UEFI install: state finished" eq "$(db_host "$root" "$mac" state)" finished || return

    # finished: iPXE must leave with an error status, so that BdsDxe reports
    # the PXE option as failed and moves on to the next boot option (with
    # "exit 0" it would start UiApp, the setup menu, instead). OVMF's next
    # options are HTTP boot over the same NIC, then the disk (GRUB's
    # BOOTX64.EFI on the EFI system partition), then the shell.
    since=$(log_lines main)
    boot D 3-local uefi "$disk" "$serial" "$uuid" "$DISK_BOOT_TIMEOUT" booted @LOG@ disk -- "br0:$mac"
    ck 6 "OVMF booted the installed system from its disk" boot_ok
    ck 6 "OVMF went on to the next boot option" next_uefi_option "$LOG"
    ck 6 "iPXE left with a non-zero status" has "$LOG" 'BdsDxe: failed to start Boot[0-9A-F]+ "UEFI PXEv4'
    ck 6 "no boot manager menu" lacks "$LOG" 'UiApp|Boot Manager Menu|Select Language'
    ck 6 "installed system, booted by UEFI, keeps the first boot's work" \
        has "$LOG" "BOOTED from=disk firmware=efi hostname=e2e-d firstboot=done token=tok-D"
    ck 6 "no installer ran" lacks "$LOG" "/images/$IMAGE/pxeboot"
    done_scenario 6
}

# Machine L, BIOS: scenario 10, the loop breaker with the real installer.
# The image "broken" is the test image with a checksum that no longer
# matches (as after a bad upload): kiwi-dump writes the disk, its check
# fails, and it reboots into PXE. The main bed has max_install_boots 2.
lane_l() {
    BED=main
    local root=$WORK/main/root mac=52:54:00:e2:11:01 serial=KS-E2E-L
    local uuid=10e2e2e2-0000-4000-8000-00000000001a disk=$WORK/L.disk id n since
    truncate -s 8M "$disk"
    boot L 1-new bios "$disk" "$serial" "$uuid" 240 new_shown "$root" "$mac" @LOG@ "$serial" -- "br0:$mac"
    ck 10 "first boot registered" boot_ok || return
    id=$(db_host "$root" "$mac" id)
    ck 10 "a broken copy of the image" broken_image "$root" || return
    ck 10 "kiwispray-hosts set broken" host_set "$root" "$id" broken || return
    install_disk "$disk"
    for n in 1 2; do
        since=$(log_lines main)
        # kiwi-dump writes and verifies the disk, then reboots: the guest ends.
        boot L "$((n + 1))-fail-$n" bios "$disk" "$serial" "$uuid" "$INSTALL_TIMEOUT" kiwi_failed @LOG@ -- "br0:$mac"
        ck 10 "install $n: the installer failed and rebooted" install_failed_ok "$LOG" || return
        ck 10 "install $n: kiwi-dump fetched the broken image" \
            grep -qE '"GET /images/broken/[^ ]+\.xz HTTP/1\.1" 200 ' <(tail -n +"$((since + 1))" "$WORK/main/run/access.log")
        ck 10 "install $n: an attempt was started" eq "$(hosts_cli "$root" show "$id" --json | json_get host.runtime.attempts.-1.n)" "$n"
    done
    since=$(log_lines main)
    boot L 4-held bios "$disk" "$serial" "$uuid" 300 serial_has @LOG@ 'ON HOLD \(loop\)' -- "br0:$mac"
    ck 10 "third boot: held, and the console says why" boot_ok || return
    ck 10 "console: the reason" has "$LOG" '2 install boots of broken in a row without /finish \(max_install_boots 2\)'
    ck 10 "console: how to release" has "$LOG" "kiwispray-hosts release $id"
    ck 10 "no further install started" eq "$(tail -n +"$((since + 1))" "$WORK/main/run/access.log" | grep -c '/images/broken/')" 0
    ck 10 "held with cause loop" eq "$(hosts_cli "$root" show "$id" --json | json_get host.runtime.held.cause)" loop
    ck 10 "both attempts abandoned" eq "$(hosts_cli "$root" show "$id" --json | json_get host.runtime.attempts.*.outcome)" "abandoned abandoned"
    ck 10 "events: two install boots, then the hold" eq "$(events_of "$root" "$id")" "register cli install-boot install-boot hold"
    ck 10 "the handler logged the hold" grep -q "host $id: held (loop)" "$WORK/main/serve.log"
    ck 10 "check names the held host" check_names "$root" "host $id is held (loop)"
    done_scenario 10
}

# broken_image ROOT: images/broken, the test image whose checksum file no
# longer matches (hard links, but for the changed files), with a short
# dialog timeout so that kiwi-dump reboots soon after its check fails.
broken_image() {
    local src=$1/images/$IMAGE dst=$1/images/broken f sum
    cp -al "$src" "$dst" || return 1
    sed -e "s#/images/$IMAGE/#/images/broken/#g" -e 's#rd\.kiwi\.install\.pxe #rd.kiwi.install.pxe rd.kiwi.dialog.timeout=5 #g' \
        "$src/host.tmpl" >"$dst/host.tmpl.new" && mv "$dst/host.tmpl.new" "$dst/host.tmpl"
    f=$(ls "$dst"/*.sha256) || return 1
    sum=$(cat "$f")
    rm -f "$f"
    # another first hex digit: the digest no longer matches the disk
    case $sum in 0*) printf '1%s\n' "${sum:1}" ;; *) printf '0%s\n' "${sum:1}" ;; esac >"$f"
    grep -q "/images/broken/" "$dst/host.tmpl" && ! cmp -s "$f" "$src/$(basename "$f")"
}
# kiwi_failed LOG: kiwi-dump said its check failed (the guest then reboots,
# which ends it; see install_failed_ok).
kiwi_failed() { serial_has "$1" 'Image checksum test failed'; }
# install_failed_ok LOG: the failing install ended as it should: its check
# failed, or the guest rebooted (ended) before that showed on the console.
install_failed_ok() {
    [ "$BOOT_RESULT" = "outcome seen" ] || [[ "$BOOT_RESULT" == *"ended before its outcome was seen" ]] ||
        { echo "$BOOT_RESULT"; return 1; }
    ! booted "$1" kexec || { echo "the broken image booted"; return 1; }
}
hosts_cli() { "$E2E_REPO/target/release/kiwispray-hosts" --root "$@"; }
# json_get PATH: a value of the JSON on stdin (a.b.-1.c; * joins a list).
json_get() {
    python3 -c '
import json, sys
v = [json.load(sys.stdin)]
for k in sys.argv[1].split("."):
    if k == "*":
        v = [x for y in v for x in y]
    else:
        v = [y[int(k)] if isinstance(y, list) else y.get(k) for y in v]
print(" ".join("" if x is None else str(x) for x in v))' "$1"
}
# events_of ROOT ID: the causes of the host's events, in order.
events_of() {
    python3 -c '
import json, sys
print(" ".join(e["cause"] for e in map(json.loads, open(sys.argv[1] + "/events.jsonl")) if e["host"] == int(sys.argv[2])))' "$1" "$2"
}
# check_names ROOT TEXT: kiwispray-hosts check exits 1 and names TEXT.
check_names() {
    local out rc=0
    out=$(hosts_cli "$1" check 2>&1) || rc=$?
    [ "$rc" = 1 ] && grep -qF -- "$2" <<<"$out" || { echo "exit $rc: $out"; return 1; }
}

# next_uefi_option LOG: after the PXE option failed, OVMF starts another one.
next_uefi_option() {
    tr -d '\r' <"$1" | sed 's/\x1b\[[0-9;?]*[a-zA-Z]//g' \
        | sed -n '/BdsDxe: failed to start Boot[0-9A-F]* "UEFI PXEv4/,$p' \
        | grep -aE '>>Start (HTTP|PXE)|BdsDxe: (loading|failed to load) Boot[0-9A-F]+ "(UEFI|EFI) (HTTP|Misc|QEMU|Internal)' >/dev/null
}

# Machine E, BIOS, on its own bed with the handler in discover mode: scenario 7.
lane_e() {
    BED=disc
    local root=$WORK/disc/root mac=52:54:00:e2:0e:01 serial=KS-E2E-E
    local uuid=e0e2e2e2-0000-4000-8000-00000000000e disk=$WORK/E.disk
    truncate -s 8M "$disk"
    boot E 1-register bios "$disk" "$serial" "$uuid" 300 discover_step "$root" "$mac" @LOG@ "$serial" -- "br0:$mac"
    ck 7 "first boot" boot_ok || return
    ck 7 "registered in discover mode" registered "$root" "$mac" || return
    if ! serial_has "$LOG" 'KIWI-E2E: installer started'; then
        # registration answered with new.tmpl: the discovery runs next boot
        ck 7 "registered as discover,new" eq "$(db_host "$root" "$mac" state)" discover,new || return
        boot E 2-discover bios "$disk" "$serial" "$uuid" 300 powered_off @LOG@ -- "br0:$mac"
        ck 7 "discovery boot" boot_ok
    fi
    ck 7 "discover post-install POSTed /update" has "$LOG" 'E2E-DISCOVER: update ok'
    ck 7 "discover post-install called /finish" has "$LOG" 'E2E-DISCOVER: finish ok'
    ck 7 "state new after discovery" eq "$(db_host "$root" "$mac" state)" new
    ck 7 "MACs stored" eq "$(db_host "$root" "$mac" macs)" "${mac^^}"
    ck 7 "metadata stored" eq "$(db_host "$root" "$mac" metadata.discovered.nics)/$(db_host "$root" "$mac" metadata.discovered.disk_sectors)" "1/16384"
    ck 7 "/update in the access log" grep -qE 'POST /update\?id=[0-9]+&bootid=[0-9a-f]{32}.* 200 ' "$WORK/disc/run/access.log"
    done_scenario 7
}
# discover_step ROOT MAC LOG SERIAL: the installer powered off, or new.tmpl
# shows the host's data.
discover_step() { powered_off "$3" || new_shown "$@"; }

# Machines F (BIOS) and G (UEFI), one after the other on the proxy-DHCP bed:
# scenario 8. The site's DHCP server (site0, $SITE_IP) hands out the
# addresses; KIWIspray's proxy (br0, dnsmasq/kiwispray-proxy.conf) only the
# boot information: iPXE over TFTP for the firmware, then the bootstrap URL.
lane_f() {
    BED=proxy
    local root=$WORK/proxy/root run=$WORK/proxy/run mac=52:54:00:e2:0f:01 serial=KS-E2E-F
    local uuid=f0e2e2e2-0000-4000-8000-00000000000f disk=$WORK/F.disk ip
    truncate -s 8M "$disk"
    ck 8 "proxy config adapted only in interface, proxy range and server" \
        proxy_conf_adapted "$E2E_REPO/dnsmasq/kiwispray-proxy.conf" "$run/dnsmasq-proxy.conf" || return
    boot F 1-new bios "$disk" "$serial" "$uuid" 300 new_shown "$root" "$mac" @LOG@ "$serial" -- "br0:$mac"
    ck 8 "BIOS: console shows the host data" boot_ok || return
    # the address: from the site's server, and from it alone
    ip=$(lease_ip "$run/dnsmasq-site.leases" "$mac")
    ck 8 "BIOS: the site's server leased an address" test -n "$ip" || return
    ck 8 "BIOS: site server log shows the DHCPACK" \
        grep -qiE "DHCPACK\(site0\) ${ip//./\\.} $mac" "$run/dnsmasq-site.log"
    ck 8 "BIOS: the site's server sent no boot information" \
        lacks "$run/dnsmasq-site.log" 'bootfile name|bootstrap|sent size: *[0-9]+ option: *(43|60|66|67) |PXE\('
    ck 8 "BIOS: the proxy leased nothing" eq "$(grep -c . "$run/dnsmasq-proxy.leases")" 0
    ck 8 "BIOS: the proxy offered no address" lacks "$run/dnsmasq-proxy.log" 'DHCP(OFFER|ACK)\(br0\) [0-9]'
    # the boot file: from the proxy
    ck 8 "BIOS: the proxy answered the client as proxy" \
        grep -qiE "PXE\(br0\) $mac proxy\$" "$run/dnsmasq-proxy.log"
    ck 8 "BIOS: the proxy sent the bootstrap URL" \
        grep -qF "bootfile name: http://$SERVER_IP:$SERVER_PORT/bootstrap.ipxe" "$run/dnsmasq-proxy.log"
    # iPXE takes a ProxyDHCP offer with a boot file only beside a next server
    ck 8 "BIOS: the proxy named itself the next server" \
        grep -qF "next server: $SERVER_IP" "$run/dnsmasq-proxy.log"
    ck 8 "BIOS: iPXE took the boot file from the proxy" \
        has "$LOG" "^Filename: http://${SERVER_IP//./\\.}:$SERVER_PORT/bootstrap\.ipxe\$"
    ck 8 "BIOS: iPXE fetched bootstrap.ipxe over HTTP" \
        has "$LOG" "http://${SERVER_IP//./\\.}:$SERVER_PORT/bootstrap\.ipxe\.* ok"
    ck 8 "BIOS: bootstrap.ipxe fetched from the leased address" \
        grep -qE "^${ip//./\\.} .*\"GET /bootstrap\.ipxe HTTP/1\.1\" 200 " "$run/access.log"
    ck 8 "BIOS: registered as new" eq "$(db_host "$root" "$mac" state)" new
    ck 8 "BIOS: serial stored" eq "$(db_host "$root" "$mac" serial)" "$serial"
    ck 8 "BIOS: one host, holding the MAC" eq "$(db_hosts "$root")/$(db_count "$root" "$mac")" 1/1
    failed 8 && return

    # UEFI: OVMF's PXE client gets its address from the site's server and
    # snponly.efi from the proxy's pxe-service (boot server on port 4011,
    # TFTP); iPXE then asks DHCP again and takes the bootstrap URL.
    local gmac=52:54:00:e2:0f:02 gserial=KS-E2E-G gip
    local guuid=f0e2e2e2-0000-4000-8000-00000000001f gdisk=$WORK/G.disk
    truncate -s 8M "$gdisk"
    boot G 1-new uefi "$gdisk" "$gserial" "$guuid" 360 new_shown "$root" "$gmac" @LOG@ "$gserial" -- "br0:$gmac"
    ck 8 "UEFI: console shows the host data" boot_ok || return
    gip=$(lease_ip "$run/dnsmasq-site.leases" "$gmac")
    ck 8 "UEFI: the site's server leased an address" test -n "$gip" || return
    ck 8 "UEFI: site server log shows the DHCPACK" \
        grep -qiE "DHCPACK\(site0\) ${gip//./\\.} $gmac" "$run/dnsmasq-site.log"
    ck 8 "UEFI: the site's server sent no boot information" \
        lacks "$run/dnsmasq-site.log" 'bootfile name|bootstrap|sent size: *[0-9]+ option: *(43|60|66|67) |PXE\('
    ck 8 "UEFI: the proxy leased nothing" eq "$(grep -c . "$run/dnsmasq-proxy.leases")" 0
    ck 8 "UEFI: the proxy answered the firmware (arch 7)" \
        grep -qE "vendor class: PXEClient:Arch:00007" "$run/dnsmasq-proxy.log"
    ck 8 "UEFI: the proxy's boot service named snponly.efi" \
        grep -qE "bootfile name: snponly\.efi\$" "$run/dnsmasq-proxy.log"
    ck 8 "UEFI: snponly.efi sent over TFTP by the proxy" \
        grep -qE "dnsmasq-tftp\[[0-9]+\]: sent /usr/lib/ipxe/snponly\.efi to ${gip//./\\.}\$" "$run/dnsmasq-proxy.log"
    ck 8 "UEFI: iPXE fetched bootstrap.ipxe over HTTP" \
        has "$LOG" "http://${SERVER_IP//./\\.}:$SERVER_PORT/bootstrap\.ipxe\.* ok"
    ck 8 "UEFI: /bootstrap from the leased address, platform efi" \
        grep -qE "^${gip//./\\.} .*\"GET /bootstrap\?.*dhcp_mac=$(macre "$gmac").*platform=efi" "$run/access.log"
    ck 8 "UEFI: registered as new" eq "$(db_host "$root" "$gmac" state)" new
    ck 8 "UEFI: two hosts, one for each MAC" \
        eq "$(db_hosts "$root")/$(db_count "$root" "$mac")/$(db_count "$root" "$gmac")" 2/1/1
    done_scenario 8
}

# Scenario 9, no guest: kiwispray-firstboot against the proxy bed's stack.
# fb_run NAME CMDLINE [VAR=VALUE...]: runs the agent in the bed's namespace
# with the kernel command line CMDLINE; output in $WORK/logs/fb-NAME.out,
# exit status in FB_RC.
fb_run() {
    local name=$1 cmdline=$2
    shift 2
    printf '%s\n' "$cmdline" >"$WORK/fb/$name.cmdline"
    ip netns exec "kse2e-$$-proxy" env INVOCATION_ID=e2e KS_FIRSTBOOT_CMDLINE="$WORK/fb/$name.cmdline" \
        KS_FIRSTBOOT_STATE="$WORK/fb/state" KS_FIRSTBOOT_RUN="$WORK/fb/run-$name" \
        KS_FIRSTBOOT_TRIES=2 KS_FIRSTBOOT_DELAY=1 "$@" \
        sh "$E2E_REPO/firstboot/kiwispray-firstboot" >"$WORK/logs/fb-$name.out" 2>&1
    FB_RC=$?
}
lane_h() {
    local root=$WORK/proxy/root base="http://$SERVER_IP:$SERVER_PORT" n out
    local bootid=0123456789abcdef0123456789abcdef
    mkdir -p "$WORK/fb" "$root/images/e2e-firstboot"
    printf '#!/bin/sh\necho "E2E-FIRSTBOOT: script ran as $0"\n' >"$root/images/e2e-firstboot/ok.sh"
    printf '#!/bin/sh\necho "E2E-FIRSTBOOT: failing"\nexit 7\n' >"$root/images/e2e-firstboot/bad.sh"

    fb_run none "BOOT_IMAGE=/vmlinuz root=/dev/vda2 console=ttyS0"
    ck 9 "without razorurl=: exit 0" eq "$FB_RC" 0
    ck 9 "without razorurl=: no output" eq "$(cat "$WORK/logs/fb-none.out")" ""
    ck 9 "without razorurl=: no stamp" test ! -e "$WORK/fb/state"

    for fetcher in curl wget; do
        n=$(log_lines proxy)
        fb_run "ok-$fetcher" "quiet razorurl=$base/images/e2e-firstboot/ok.sh?id=1&bootid=$bootid console=ttyS0" \
            KS_FIRSTBOOT_FETCH=$fetcher
        out=$WORK/logs/fb-ok-$fetcher.out
        ck 9 "$fetcher: success exits 0" eq "$FB_RC" 0
        ck 9 "$fetcher: the script ran" grep -q '^kiwispray-firstboot: | E2E-FIRSTBOOT: script ran' "$out"
        ck 9 "$fetcher: fetched with the whole query" \
            grep -qE "GET /images/e2e-firstboot/ok\.sh\?id=1&bootid=$bootid HTTP/1\.1\" 200 " "$WORK/proxy/run/access.log"
        ck 9 "$fetcher: stamp written" test -e "$WORK/fb/state/done-$bootid"
        ck 9 "$fetcher: no bootid in the output" lacks "$out" "$bootid"
        # once per install: the stamp stops a second run
        fb_run "again-$fetcher" "quiet razorurl=$base/images/e2e-firstboot/ok.sh?id=1&bootid=$bootid" KS_FIRSTBOOT_FETCH=$fetcher
        ck 9 "$fetcher: second run exits 0" eq "$FB_RC" 0
        ck 9 "$fetcher: second run fetches nothing" eq "$(tail -n +"$((n + 1))" "$WORK/proxy/run/access.log" | grep -c ok.sh)" 1
        rm -rf "$WORK/fb/state"
    done

    # the script fails: /fail is called with the reason; a 404 from a
    # service without /fail is tolerated, the agent still exits non-zero
    fb_run bad "razorurl=$base/images/e2e-firstboot/bad.sh?id=42&bootid=$bootid"
    ck 9 "failing script: exit 1" eq "$FB_RC" 1
    ck 9 "failing script: failure logged" grep -q 'kiwispray-firstboot: FAILED: the post-install script exited with status 7' "$WORK/logs/fb-bad.out"
    # /fail is next to the script: the razorurl's directory is the service's base
    ck 9 "failing script: /fail called with id, bootid and the reason" \
        grep -qE "GET /images/e2e-firstboot/fail\?id=42&bootid=$bootid&reason=the%20post-install%20script%20exited%20with%20status%207%3A%20E2E-FIRSTBOOT%3A%20failing HTTP" "$WORK/proxy/run/access.log"
    ck 9 "failing script: no stamp" test ! -e "$WORK/fb/state/done-$bootid"
    # the service refuses the post-install (unknown host): retried, then /fail
    fb_run refused "razorurl=$base/post-install?id=999999&bootid=$bootid"
    ck 9 "refused post-install: exit 1" eq "$FB_RC" 1
    ck 9 "refused post-install: retried" grep -q 'attempt 1 failed' "$WORK/logs/fb-refused.out"
    ck 9 "refused post-install: /fail called" \
        grep -qE "GET /fail\?id=999999&bootid=$bootid&reason=cannot%20fetch%20the%20post-install%20script%20after%202%20attempts" "$WORK/proxy/run/access.log"
    ck 9 "refused post-install: no bootid in the output" lacks "$WORK/logs/fb-refused.out" "$bootid"
    done_scenario 9
}

# proxy_conf_adapted SHIPPED ADAPTED: the two differ only in the interface=,
# the `dhcp-range=...,proxy` line and the server address.
proxy_conf_adapted() {
    local ip=${SERVER_IP//./\\.}
    diff <(grep -vE '^(interface=|dhcp-range=.*,proxy$)' "$1" \
               | sed -e 's#192\.168\.100\.1:5000#@SERVER@#g' -e 's#192\.168\.100\.1\b#@IP@#g') \
         <(grep -vE '^(interface=|dhcp-range=.*,proxy$)' "$2" \
               | sed -e "s#$ip:$SERVER_PORT#@SERVER@#g" -e "s#$ip\\b#@IP@#g") \
        && eq "$(grep -cE '^(interface=br0|dhcp-range=10\.77\.0\.0,proxy)$' "$2")" 2 \
        && grep -qF "http://$SERVER_IP:$SERVER_PORT/bootstrap.ipxe" "$2"
}
# lease_ip LEASES MAC: the address dnsmasq leased to MAC.
lease_ip() { awk -v m="${2,,}" 'tolower($2) == m { print $3 }' "$1" 2>/dev/null; }
db_hosts() { python3 -c 'import json,sys; print(len(json.load(open(sys.argv[1]))))' "$1/known_hosts.json"; }

# wanted N...: E2E_ONLY is unset or holds one of the scenarios N.
wanted() {
    [ -z "${E2E_ONLY:-}" ] && return 0
    local s
    for s; do [[ " $E2E_ONLY " == *" $s "* ]] && return 0; done
    return 1
}

# --- lane files ----------------------------------------------------------------

# Each boot path beyond the ones above is a file of its own in lanes/: it
# defines its lane functions and adds to SCENARIOS, TITLE, MACHINE, LANES,
# LANE_SCEN, BEDS and SETUP (functions run once the main beds are up; one
# that fails fails its scenarios, not the stage; it returns early unless
# `wanted N...` says E2E_ONLY keeps one of its scenarios). Scenario numbers: 11-19
# power, 20-29 UEFI HTTP and IPv6, 30-39 GRUB, 40-49 edge servers.
for f in "$here"/lanes/*.sh; do
    [ -e "$f" ] || continue
    # shellcheck source=/dev/null
    . "$f"
done

# --- main --------------------------------------------------------------------

# Under TCG on 2 cores: iPXE loads the installer, kiwi-dump writes and
# verifies the disk, the installed system boots and runs its first boot.
INSTALL_TIMEOUT=${E2E_INSTALL_TIMEOUT:-900}
DISK_BOOT_TIMEOUT=${E2E_DISK_BOOT_TIMEOUT:-480}

log "building the installers and the test image (cached in $E2E_CACHE)"
if ! "$here/build-installer.sh" "$WORK/installer" 2>"$WORK/logs/build-installer.log"; then
    cat "$WORK/logs/build-installer.log" >&2
    e2e_skip "could not build the stand-in installer (kernel package from apt?)"
fi
if ! "$here/build-kiwi-installer.sh" "$WORK/kiwi-installer" 2>"$WORK/logs/build-kiwi-installer.log"; then
    cat "$WORK/logs/build-kiwi-installer.log" >&2
    e2e_skip "could not build KIWI's installer (mmdebstrap, apt sources, PyPI?)"
fi
if ! P=$("$here/build-image.sh" "$WORK/build" "$WORK/image.raw" "$WORK/kiwi-installer" 2>"$WORK/logs/build-image.log"); then
    cat "$WORK/logs/build-image.log" >&2
    E2E_FAILED=1
    exit 1
fi
cat "$WORK/logs/build-kiwi-installer.log" "$WORK/logs/build-image.log" | grep -E '^(kiwi-dump installer|test image)' >&2
log "test image $P: $(head -c 16 "$WORK/build/$P.sha256")..."

# The image goes in as an operator would put it; its post-install is the
# shipped post_install.tmpl with the test's own lines in front (see
# fixtures/post_install-image.tmpl).
import_image() {
    local root=$1
    "$E2E_REPO/target/release/kiwispray-hosts" --root "$root" import-image "$IMAGE" "$WORK/build" \
        >>"$WORK/logs/import.log" 2>&1 || { cat "$WORK/logs/import.log" >&2; return 1; }
    cat "$here/fixtures/post_install-image.tmpl" "$root/templates/post_install.tmpl" \
        >"$root/images/$IMAGE/post_install.tmpl"
}

# The main bed breaks install loops after two boots (scenario 10).
mkdir -p "$WORK/main/root"
echo '{"max_install_boots": 2}' >"$WORK/main/root/kiwispray.json"
for bed in main solo; do
    bed_up $bed || { E2E_FAILED=1; exit 1; }
    import_image "$WORK/$bed/root" || { E2E_FAILED=1; exit 1; }
done
bed_up disc 1 || { E2E_FAILED=1; exit 1; }
bed_up proxy 0 proxy || { E2E_FAILED=1; exit 1; }
for step in "${SETUP[@]}"; do
    "$step" || log "set-up step $step failed; its scenarios fail"
done

jobs_max=${E2E_JOBS:-4}
running=()
for lane in "${LANES[@]}"; do
    # shellcheck disable=SC2086
    wanted ${LANE_SCEN[$lane]} || continue
    while :; do
        alive=()
        for p in "${running[@]}"; do kill -0 "$p" 2>/dev/null && alive+=("$p"); done
        running=("${alive[@]}")
        [ "${#running[@]}" -lt "$jobs_max" ] && break
        sleep 1
    done
    ( "$lane" ) &
    running+=($!)
    echo $! >>"$WORK/lanes.pids"
done
for p in $(cat "$WORK/lanes.pids"); do wait "$p"; done

# --- report --------------------------------------------------------------------

npass=0 nfail=0 nskip=0
for s in "${SCENARIOS[@]}"; do
    r=$WORK/results/$s
    if [ -n "${E2E_ONLY:-}" ] && [[ " $E2E_ONLY " != *" $s "* ]] && [ ! -e "$r" ]; then
        nskip=$((nskip + 1)); echo "scenario $s: SKIPPED (E2E_ONLY)"; continue
    fi
    [ -e "$r" ] || echo "FAIL ${TITLE[$s]}: did not run (an earlier step of its machine failed)" >"$r"
    if grep -q '^PASS' "$r"; then npass=$((npass + 1)); else nfail=$((nfail + 1)); fi
    echo "scenario $s: $(cat "$r")"
done

E2E_FAILED=$nfail
if [ "$nfail" -gt 0 ]; then
    machines=$(for s in "${SCENARIOS[@]}"; do
        grep -qs '^FAIL' "$WORK/results/$s" && echo "${MACHINE[$s]}"; done | sort -u)
    for m in $machines; do
        for f in "$WORK/logs/$m"-*.serial; do
            [ -e "$f" ] || continue
            echo "======== serial log $(basename "$f") (last 80 lines)"
            tr -d '\r' <"$f" | sed 's/\x1b\[[0-9;?]*[a-zA-Z]//g' | grep -av '^\s*$' | tail -n 80
        done
    done
    for f in "$WORK/logs"/fb-*.out; do
        [ -e "$f" ] && grep -qs '^FAIL' "$WORK/results/9" || continue
        echo "======== kiwispray-firstboot run $(basename "$f" .out)"
        cat "$f"
    done
    for bed in "${BEDS[@]}"; do
        for f in "$WORK/$bed/serve.log" "$WORK/$bed/run/"*.log; do
            [ -e "$f" ] || continue
            echo "======== $bed: $(basename "$f") (last 100 lines)"
            tail -n 100 "$f"
        done
        echo "======== $bed: known_hosts.json"
        cat "$WORK/$bed/root/known_hosts.json"
    done
fi
elapsed=$(($(date +%s) - E2E_START))
echo "e2e: stage took ${elapsed}s"
summary="e2e: $npass passed, $nfail failed"
[ "$nskip" -gt 0 ] && summary+=", $nskip skipped"
echo "$summary"
[ "$nfail" -eq 0 ]
