# shellcheck shell=bash
# e2e lane file (sourced by run.sh): UEFI HTTP boot without TFTP, and
# IPv6-only provisioning networks, with Debian's OVMF and iPXE.
#  20. IPv4, HTTP boot only: OVMF without PXE boot options (fw_cfg) on a
#      bed whose dnsmasq (dnsmasq/kiwispray.conf) runs no TFTP server gets
#      snponly.efi over HTTP from the deployment root's boot/, registers,
#      installs (the stand-in installer, state wipe) and ends finished;
#  21. IPv6 only (no IPv4 address on the boot network), PXEv6: OVMF loads
#      snponly.efi over TFTP from dnsmasq/kiwispray-ipv6.conf, iPXE gets the
#      bootstrap URL by DHCPv6, registers, installs and ends finished;
#  22. the same network over HTTPv6: snponly.efi over HTTP, no PXE options.
# Beds: nbh4 (IPv4, no TFTP) and nb6 (IPv6 only), each with serve.sh for
# nginx and the handler and a dnsmasq of its own. The install is the busybox
# stand-in (tests/e2e/installer/init) in state wipe: the point is the boot
# path (firmware, iPXE, templates, post-install and /finish over the
# network), not KIWI's installer.

NB6_IP=fd00:77::1
NB_NO_PXE="name=opt/org.tianocore/IPv4PXESupport,string=no name=opt/org.tianocore/IPv6PXESupport,string=no"

SCENARIOS+=(20 21 22)
TITLE[20]="UEFI HTTP boot, no PXE option, no TFTP: snponly.efi over HTTP, registers, installs, finished"
TITLE[21]="IPv6 only, UEFI PXEv6: snponly.efi over TFTP, iPXE by DHCPv6, registers, installs, finished"
TITLE[22]="IPv6 only, UEFI HTTPv6: snponly.efi over HTTP, registers, installs, finished"
MACHINE[20]=NH4
MACHINE[21]=NP6
MACHINE[22]=NH6
LANES+=(nb_lane_http4 nb_lane_pxe6 nb_lane_http6)
LANE_SCEN[nb_lane_http4]=20
LANE_SCEN[nb_lane_pxe6]=21
LANE_SCEN[nb_lane_http6]=22
BEDS+=(nbh4 nb6)
SETUP+=(nb_setup)

nb_setup() {
    if wanted 20; then nb_bed_up nbh4 4 || return 1; fi
    if wanted 21 22; then nb_bed_up nb6 6 || return 1; fi
}

# nb_bed_up NAME 4|6: namespace kse2e-<pid>-NAME with br0 and the stack,
# and dnsmasq with the shipped config adapted only in interface, range and
# server address:
#  4: serve.sh without DHCP, and dnsmasq/kiwispray.conf on $SERVER_IP with
#     its TFTP lines removed, run here;
#  6: br0 with $NB6_IP/64 and no IPv4; serve.sh runs dnsmasq with
#     dnsmasq/kiwispray-ipv6.conf (DHCP_CONF), as `make serve` would.
# Config and log: $WORK/NAME/run/dnsmasq-nb.{conf,log}.
nb_bed_up() {
    local name=$1 fam=$2 ns=kse2e-$$-$1 dir=$WORK/$1
    local run=$dir/run base
    mkdir -p "$dir/root" "$run"
    echo "$ns" >>"$WORK/namespaces"
    ip netns add "$ns"
    ip -n "$ns" link set lo up
    # no multicast snooping: router solicitations, RAs and DHCPv6 are multicast
    ip -n "$ns" link add br0 type bridge forward_delay 0 mcast_snooping 0
    local envs=("PORT=$SERVER_PORT" "ROOT=$dir/root" "RUN_DIR=$run")
    if [ "$fam" = 6 ]; then
        ip -n "$ns" addr add "$NB6_IP/64" dev br0 nodad
        base="http://[$NB6_IP]:$SERVER_PORT"
        # serve.sh runs dnsmasq with kiwispray-ipv6.conf, as `make serve` does
        envs+=(DHCP_IFACE=br0 DHCP_CONF=kiwispray-ipv6.conf "SERVER_IP=$NB6_IP"
               "DHCP_RANGE=${NB6_IP%1}100,${NB6_IP%1}1ff,slaac,64,1h")
        ln -s dnsmasq.conf "$run/dnsmasq-nb.conf"
        ln -s dnsmasq.log "$run/dnsmasq-nb.log"
    else
        ip -n "$ns" addr add "$SERVER_IP/24" dev br0
        base="http://$SERVER_IP:$SERVER_PORT"
        sed -e "s#^interface=.*#interface=br0#" -e "s#^dhcp-range=.*#dhcp-range=$DHCP_RANGE#" \
            -e "s#192\.168\.100\.1:5000#$SERVER_IP:$SERVER_PORT#g" \
            -e '/^enable-tftp/d' -e '/^tftp-root=/d' \
            "$E2E_REPO/dnsmasq/kiwispray.conf" >"$run/dnsmasq-nb.conf"
    fi
    ip -n "$ns" link set br0 up
    seed_root "$dir/root"
    ip netns exec "$ns" env "${envs[@]}" \
        "$E2E_REPO/nginx/serve.sh" >"$dir/serve.log" 2>&1 </dev/null &
    echo $! >"$dir/serve.pid"
    if [ "$fam" = 4 ]; then
        ip netns exec "$ns" dnsmasq --keep-in-foreground --conf-file="$run/dnsmasq-nb.conf" \
            --pid-file="$run/dnsmasq-nb.pid" --dhcp-leasefile="$run/dnsmasq-nb.leases" \
            --log-facility="$run/dnsmasq-nb.log" >"$run/dnsmasq-nb.out" 2>&1 </dev/null &
        echo $! >"$dir/dnsmasq-nb.ownpid"
    fi
    local i
    for i in $(seq 100); do
        if ip netns exec "$ns" curl -gfsS -o /dev/null "$base/bootstrap.ipxe" 2>/dev/null \
           && ip netns exec "$ns" curl -gfsS -o /dev/null "$base/boot/snponly.efi" 2>/dev/null \
           && [ -n "$(dnsmasq_pids "$ns")" ]; then
            log "bed $name up (namespace $ns, IPv$fam)"
            return 0
        fi
        kill -0 "$(cat "$dir/serve.pid")" 2>/dev/null || break
        sleep 0.3
    done
    log "bed $name did not come up:"
    cat "$dir/serve.log" "$run/dnsmasq-nb.out" "$run/dnsmasq-nb.log" 2>/dev/null | sed 's/^/    /' >&2
    return 1
}

# nb_mark MARK LOG CMD...: CMD (a boot condition); besides, the time when
# LOG first shows iPXE starting and fetching bootstrap.ipxe goes to
# MARK.ipxe and MARK.bootstrap (epoch seconds, polled each second).
nb_mark() {
    local mark=$1 log=$2
    shift 2
    [ -e "$mark.ipxe" ] || ! serial_has "$log" 'iPXE initialising devices' || date +%s >"$mark.ipxe"
    [ -e "$mark.bootstrap" ] || ! serial_has "$log" 'bootstrap\.ipxe\.* ok' || date +%s >"$mark.bootstrap"
    "$@"
}
# nb_times WHAT MARK START: logs the seconds from START (epoch) to the
# marks and to now, and keeps them in $WORK/logs/netboot-times.
nb_times() {
    local line="$1:" k
    for k in ipxe bootstrap; do
        [ -e "$2.$k" ] && line+=" $k after $(($(cat "$2.$k") - $3))s,"
    done
    line+=" outcome after $(($(date +%s) - $3))s"
    log "netboot timing: $line"
    echo "$line" >>"$WORK/logs/netboot-times"
}

# nb_register_install N BED MACHINE MAC SERIAL UUID: the common part of
# the three scenarios once the firmware path is chosen (OVMF_FW_CFG): the
# first boot registers (new), `set wipe` and the second boot runs the
# stand-in installer, whose post-install reports /finish: finished.
# Sets NB_ID and LOG (of the install boot); NB_LOG1 is the first boot's.
nb_register_install() {
    local n=$1 bed=$2 m=$3 mac=$4 serial=$5 uuid=$6
    local root=$WORK/$2/root disk=$WORK/$3.disk start
    truncate -s 8M "$disk"
    start=$(date +%s)
    boot "$m" 1-new uefi "$disk" "$serial" "$uuid" 900 \
        nb_mark "$WORK/$m-1" @LOG@ new_shown "$root" "$mac" @LOG@ "$serial" -- "br0:$mac"
    NB_LOG1=$LOG
    nb_times "scenario $n, first boot (registered)" "$WORK/$m-1" "$start"
    ck "$n" "first boot: the console shows the host data" boot_ok || return 1
    ck "$n" "registered as new" eq "$(db_host "$root" "$mac" state)" new || return 1
    ck "$n" "iPXE reported platform efi" \
        grep -qE "GET /bootstrap\?.*dhcp_mac=$(macre "$mac").*platform=efi" "$WORK/$bed/run/access.log"
    NB_ID=$(db_host "$root" "$mac" id)
    ck "$n" "kiwispray-hosts set wipe" host_set "$root" "$NB_ID" wipe '{"e2e": {"token": "tok-nb"}}' "e2e-nb$n" || return 1
    dd if=/dev/urandom of="$disk" bs=1M count=1 conv=notrunc status=none
    start=$(date +%s)
    boot "$m" 2-install uefi "$disk" "$serial" "$uuid" 900 \
        nb_mark "$WORK/$m-2" @LOG@ powered_off @LOG@ -- "br0:$mac"
    nb_times "scenario $n, install boot (finished)" "$WORK/$m-2" "$start"
    ck "$n" "install boot: the installer ran and powered off" boot_ok || return 1
    ck "$n" "the installer wiped the disk" has "$LOG" 'KIWI-E2E: wipe done'
    ck "$n" "wipe zeroed the disk head" cmp -n 1048576 "$disk" /dev/zero
    ck "$n" "the shipped post_install.tmpl reported /finish" has "$LOG" "KIWIspray: host $NB_ID reported finished"
    ck "$n" "state finished" eq "$(db_host "$root" "$mac" state)" finished
    ck "$n" "event log: registered, set, install boot, finished" \
        eq "$(events_of "$root" "$NB_ID")" "register cli install-boot finish"
}

# Machine NH4: scenario 20, UEFI HTTP boot over IPv4 without TFTP.
nb_lane_http4() {
    BED=nbh4
    local OVMF_FW_CFG=$NB_NO_PXE run=$WORK/nbh4/run mac=52:54:00:e2:20:01
    local url="http://$SERVER_IP:$SERVER_PORT/boot/snponly.efi"
    ck 20 "the bed runs no TFTP server" nb_no_tftp nbh4 || return
    nb_register_install 20 nbh4 NH4 "$mac" KS-E2E-NH4 20e2e2e2-0000-4000-8000-000000000020 || return
    ck 20 "OVMF started HTTP boot over IPv4" has "$NB_LOG1" 'Start HTTP Boot over IPv4'
    ck 20 "OVMF tried no PXE" lacks "$NB_LOG1" 'Start PXE over'
    ck 20 "dnsmasq saw the HTTP boot client (arch 16)" \
        grep -qE 'vendor class: HTTPClient:Arch:00016' "$run/dnsmasq-nb.log"
    ck 20 "dnsmasq named the snponly.efi URL (option 67)" \
        grep -qE "option: *67 bootfile-name +${url//./\\.}\$" "$run/dnsmasq-nb.log"
    ck 20 "dnsmasq echoed option 60 HTTPClient" \
        grep -qE 'sent size: *10 option: *60 vendor-class +(HTTPClient|48:54:54:50:43:6c:69:65:6e:74)' "$run/dnsmasq-nb.log"
    # (OVMF may ask twice in one boot: the file's size first)
    ck 20 "the firmware fetched snponly.efi over HTTP in both boots" \
        nb_at_least 2 "$(grep -cE '^10\.77\.0\.[0-9]+ .*"GET /boot/snponly\.efi HTTP/1\.1" 200 .*UefiHttpBoot' "$run/access.log")"
    ck 20 "iPXE fetched bootstrap.ipxe" has "$NB_LOG1" "http://${SERVER_IP//./\\.}:$SERVER_PORT/bootstrap\.ipxe\.* ok"
    done_scenario 20
}

# Machine NP6: scenario 21, PXEv6 (TFTP) on the IPv6-only bed.
nb_lane_pxe6() {
    BED=nb6
    local OVMF_FW_CFG="name=opt/org.tianocore/IPv4PXESupport,string=no"
    local run=$WORK/nb6/run mac=52:54:00:e2:21:01
    ck 21 "the boot network has no IPv4 address" nb_no_ipv4 nb6 || return
    nb_register_install 21 nb6 NP6 "$mac" KS-E2E-NP6 21e2e2e2-0000-4000-8000-000000000021 || return
    ck 21 "OVMF started PXE over IPv6" has "$NB_LOG1" 'Start PXE over IPv6'
    ck 21 "dnsmasq gave the firmware the TFTP URL (option 59)" \
        grep -qF "tftp://[$NB6_IP]/snponly.efi" "$run/dnsmasq-nb.log"
    ck 21 "snponly.efi sent over TFTP (IPv6)" \
        grep -qE "dnsmasq-tftp\[[0-9]+\]: sent /usr/lib/ipxe/snponly\.efi to ${NB6_IP%1}" "$run/dnsmasq-nb.log"
    nb_v6_checks 21 "$mac"
    done_scenario 21
}

# Machine NH6: scenario 22, HTTPv6 on the IPv6-only bed. OVMF tries HTTP
# over IPv4 first (no answer: about a minute), then over IPv6.
nb_lane_http6() {
    BED=nb6
    # Both boots go through the HTTPv4 timeout first. HTTPv6 as the first
    # option (HTTPv4 dropped with -fw_cfg opt/org.tianocore/IPv4Support=no,
    # or put first in BootOrder) fails in this OVMF before any request
    # ("Unexpected network error"); after HTTPv4's minute it works.
    local OVMF_FW_CFG=$NB_NO_PXE run=$WORK/nb6/run mac=52:54:00:e2:22:01
    ck 22 "the boot network has no IPv4 address" nb_no_ipv4 nb6 || return
    nb_register_install 22 nb6 NH6 "$mac" KS-E2E-NH6 22e2e2e2-0000-4000-8000-000000000022 || return
    ck 22 "OVMF started HTTP boot over IPv6" has "$NB_LOG1" 'Start HTTP Boot over IPv6'
    ck 22 "OVMF tried no PXE" lacks "$NB_LOG1" 'Start PXE over'
    ck 22 "dnsmasq gave the firmware the HTTP URL (option 59)" \
        grep -qF "http://[$NB6_IP]:$SERVER_PORT/boot/snponly.efi" "$run/dnsmasq-nb.log"
    ck 22 "dnsmasq sent the vendor class HTTPClient (option 16)" \
        grep -qE 'option: *16 .*HTTPClient|option: *16 .*48:54:54:50:43:6c:69:65:6e:74' "$run/dnsmasq-nb.log"
    ck 22 "the firmware fetched snponly.efi over HTTP from an IPv6 address" \
        grep -qE "^${NB6_IP%1}[0-9a-f:]+ .*\"GET /boot/snponly\.efi HTTP/1\.1\" 200 " "$run/access.log"
    nb_v6_checks 22 "$mac"
    done_scenario 22
}

# nb_v6_checks N MAC: what IPv6 changes, for NB_ID: iPXE took the bootstrap
# URL from DHCPv6, the templates' URLs carry the bracketed address
# (@SERVER_IP@ from the Host header), the stand-in installer's requests
# came over IPv6, and nothing spoke DHCPv4.
nb_v6_checks() {
    local n=$1 mac=$2 run=$WORK/nb6/run v6re="${NB6_IP%1}[0-9a-f:]+"
    local url="http://\[$NB6_IP\]:$SERVER_PORT"
    ck "$n" "iPXE took the bootstrap URL from DHCPv6 and fetched it" \
        has "$NB_LOG1" "$url/bootstrap\.ipxe\.* ok"
    ck "$n" "bootstrap.ipxe saw the IPv6 address (no DHCPv4 attempt)" lacks "$NB_LOG1" 'KIWIspray: DHCP on net'
    ck "$n" "/bootstrap from an IPv6 address" \
        grep -qE "^$v6re .*\"GET /bootstrap\?.*dhcp_mac=$(macre "$mac")" "$run/access.log"
    ck "$n" "install boot: the kernel URL with the bracketed address" \
        has "$LOG" "$url/images/wipe/pxeboot\.kernel"
    ck "$n" "the installer's network came up over IPv6" has "$LOG" "KIWI-E2E: network up on .*$v6re"
    ck "$n" "post-install fetched over IPv6" \
        grep -qE "^$v6re .*\"GET /post-install\?id=$NB_ID&bootid=[0-9a-f]{32} HTTP/1\.1\" 200 " "$run/access.log"
    ck "$n" "/finish over IPv6" grep -qE "^$v6re .*\"GET /finish\?id=$NB_ID&bootid=" "$run/access.log"
    ck "$n" "no DHCPv4 server on the boot network" nb_no_dhcp4 nb6
}

nb_at_least() { [ "$2" -ge "$1" ] || { echo "got $2, want at least $1"; return 1; }; }
nb_no_tftp() {
    local ns=kse2e-$$-$1
    lacks "$WORK/$1/run/dnsmasq-nb.conf" '^(enable-tftp|tftp-root)' || return 1
    ! ip netns exec "$ns" ss -Hlun 'sport = :69' | grep -q . || { echo "something listens on UDP port 69"; return 1; }
}
nb_no_dhcp4() {
    local ns=kse2e-$$-$1
    ! ip netns exec "$ns" ss -Hlun 'sport = :67' | grep -q . || { echo "something listens on UDP port 67"; return 1; }
    lacks "$WORK/$1/run/dnsmasq-nb.log" 'DHCPOFFER|DHCPACK'
}
nb_no_ipv4() {
    local ns=kse2e-$$-$1 a
    a=$(ip -n "$ns" -4 -o addr show dev br0)
    [ -z "$a" ] || { echo "br0 has IPv4: $a"; return 1; }
}
