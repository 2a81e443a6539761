# shellcheck shell=bash
# e2e lane file (sourced by run.sh): the GRUB flavour (issue 15) with
# Debian's own firmware and signed binaries, over KIWIspray's TFTP front end.
#  30. Secure Boot x86-64: OVMF with Secure Boot enforced (Microsoft's keys)
#      -> shimx64.efi -> grubx64.efi -> /grub/grub.cfg (bootstrap.grub) ->
#      /ks/bootstrap over TFTP: registered as new (new.grub); set to the
#      image, the next boot runs host.grub, which boots KIWI's installer
#      (Debian-signed kernel) over TFTP; kiwi-dump installs and kexecs into
#      the installed system under lockdown; it reports /finish: finished.
#  31. the finished machine's next boot: finished.grub, and the firmware
#      boots the installed system from its disk (shim and signed GRUB on
#      the ESP), with Secure Boot on.
#  32. Secure Boot refuses unsigned binaries in the same setup: the firmware
#      refuses an unsigned shim (shim-unsigned) and an unsigned network GRUB
#      (grub-efi-amd64-bin's monolithic grubnetx64.efi) as the boot file;
#      neither machine reaches /bootstrap. (A signed shim in front of an
#      unsigned GRUB cannot be set up beside scenario 30: shim 16.1 fetches
#      grubx64.efi from the TFTP root, not from its boot file's directory.)
#  33. ARM64: qemu-system-aarch64 with AAVMF -> grubaa64.efi -> the same
#      bootstrap.grub: registered with platform efi and buildarch arm64
#      (new.grub); set finished, the next boot gets finished.grub.
# Bed: grub. serve.sh runs nginx, the handler and the TFTP front end
# (TFTP=$SERVER_IP); dnsmasq runs dnsmasq/kiwispray-grub.conf (DHCP only),
# changed only in interface, range and server address, plus the test's
# dhcp-host lines that tag its machines.

GR_MAC_S=52:54:00:e2:30:01      # Secure Boot, scenarios 30 and 31
GR_MAC_U1=52:54:00:e2:32:01     # unsigned shim
GR_MAC_U2=52:54:00:e2:32:02     # unsigned GRUB
GR_MAC_R=52:54:00:e2:33:01      # ARM64
GR_ARM64_EFI=$E2E_CACHE/grub-efi-arm64-signed/usr/lib/grub/arm64-efi-signed/grubnetaa64.efi.signed
GR_UNSIGNED_SHIM=/usr/lib/shim/shimx64.efi
GR_UNSIGNED_GRUB=/usr/lib/grub/x86_64-efi/monolithic/grubnetx64.efi

SCENARIOS+=(30 31 32 33)
TITLE[30]="Secure Boot: shim, GRUB, /ks/bootstrap over TFTP, registers; installs with the signed kernel over host.grub, kexec under lockdown, finished"
TITLE[31]="Secure Boot, finished: finished.grub, then the firmware boots the installed system from its disk"
TITLE[32]="Secure Boot: the firmware refuses an unsigned shim and an unsigned GRUB; no /bootstrap"
TITLE[33]="ARM64 (AAVMF, grubaa64.efi): registers with platform efi and buildarch arm64; finished gets finished.grub"
MACHINE[30]=S
MACHINE[31]=S
MACHINE[32]="U1 U2"
MACHINE[33]=R
# the install lane early, so that its install boot queues for the install
# slot while the other lanes still register
LANES=("${LANES[@]:0:4}" gr_lane_sb "${LANES[@]:4}" gr_lane_unsigned gr_lane_arm)
LANE_SCEN[gr_lane_sb]="30 31"
LANE_SCEN[gr_lane_unsigned]=32
LANE_SCEN[gr_lane_arm]=33
BEDS+=(grub)
SETUP+=(gr_setup)

gr_setup() {
    wanted 30 31 32 33 || return 0
    gr_bed_up || return 1
    if wanted 30 31; then import_image "$WORK/grub/root" || return 1; fi
}

# gr_bed_up: namespace kse2e-<pid>-grub with br0 ($SERVER_IP), serve.sh
# with the TFTP front end, and dnsmasq with dnsmasq/kiwispray-grub.conf
# ($WORK/grub/run/dnsmasq-grub.{conf,log}). The root's boot/ is the
# checkout's, plus grubaa64.efi (from the e2e cache) and unsigned/ with
# the unsigned binaries of scenario 32.
gr_bed_up() {
    local ns=kse2e-$$-grub dir=$WORK/grub run=$WORK/grub/run b
    mkdir -p "$dir/root" "$run"
    echo "$ns" >>"$WORK/namespaces"
    ip netns add "$ns"
    ip -n "$ns" link set lo up
    ip -n "$ns" link add br0 type bridge forward_delay 0
    ip -n "$ns" addr add "$SERVER_IP/24" dev br0
    ip -n "$ns" link set br0 up
    seed_root "$dir/root"
    cp -a "$E2E_REPO/boot" "$dir/root/boot"
    b=$dir/root/boot
    [ -e "$GR_ARM64_EFI" ] && ln -s "$GR_ARM64_EFI" "$b/grubaa64.efi"
    mkdir -p "$b/unsigned"
    ln -s "$GR_UNSIGNED_SHIM" "$b/unsigned/shimx64.efi"
    ln -s "$GR_UNSIGNED_GRUB" "$b/unsigned/grubx64.efi"
    {
        sed -e "s#^interface=.*#interface=br0#" -e "s#^dhcp-range=.*#dhcp-range=$DHCP_RANGE#" \
            -e "s#192\.168\.100\.1:5000#$SERVER_IP:$SERVER_PORT#g" \
            -e "s#192\.168\.100\.1\\b#$SERVER_IP#g" \
            "$E2E_REPO/dnsmasq/kiwispray-grub.conf"
        cat <<EOF
# --- e2e: the machines of the GRUB lane, tagged per host
dhcp-host=$GR_MAC_S,set:grub
# (scenario 32: boot files of their own; untagged, they would get iPXE,
# but a later dhcp-boot line wins)
dhcp-host=$GR_MAC_U1,set:unsignedshim
dhcp-host=$GR_MAC_U2,set:unsignedgrub
dhcp-boot=tag:unsignedshim,unsigned/shimx64.efi,,$SERVER_IP
dhcp-boot=tag:unsignedgrub,unsigned/grubx64.efi,,$SERVER_IP
EOF
    } >"$run/dnsmasq-grub.conf"
    ip netns exec "$ns" env "PORT=$SERVER_PORT" "ROOT=$dir/root" "RUN_DIR=$run" "TFTP=$SERVER_IP" \
        "$E2E_REPO/nginx/serve.sh" >"$dir/serve.log" 2>&1 </dev/null &
    echo $! >"$dir/serve.pid"
    ip netns exec "$ns" dnsmasq --keep-in-foreground --conf-file="$run/dnsmasq-grub.conf" \
        --pid-file="$run/dnsmasq-grub.pid" --dhcp-leasefile="$run/dnsmasq-grub.leases" \
        --log-facility="$run/dnsmasq-grub.log" >"$run/dnsmasq-grub.out" 2>&1 </dev/null &
    echo $! >"$dir/dnsmasq-grub.ownpid"
    local i
    for i in $(seq 100); do
        if ip netns exec "$ns" curl -fsS -o /dev/null "http://$SERVER_IP:$SERVER_PORT/bootstrap.ipxe" 2>/dev/null \
           && ip netns exec "$ns" ss -Hlun 'sport = :69' | grep -q . \
           && ip netns exec "$ns" ss -Hlun 'sport = :67' | grep -q .; then
            log "bed grub up (namespace $ns, TFTP front end, kiwispray-grub.conf)"
            return 0
        fi
        kill -0 "$(cat "$dir/serve.pid")" 2>/dev/null || break
        kill -0 "$(cat "$dir/dnsmasq-grub.ownpid")" 2>/dev/null || break
        sleep 0.3
    done
    log "bed grub did not come up:"
    cat "$dir/serve.log" "$run/dnsmasq-grub.out" "$run/dnsmasq-grub.log" 2>/dev/null | sed 's/^/    /' >&2
    return 1
}

# gr_tftp RE: the TFTP front end's log (serve.log) has a line matching RE.
gr_tftp() { grep -qE -- "$1" "$WORK/grub/serve.log" || { echo "no /$1/ in the TFTP log"; return 1; }; }
gr_tftp_lines() { grep -c 'kiwispray: tftp ' "$WORK/grub/serve.log" 2>/dev/null || echo 0; }
# gr_tftp_since N RE: a line matching RE after the first N TFTP log lines.
gr_tftp_since() {
    grep 'kiwispray: tftp ' "$WORK/grub/serve.log" | tail -n +"$(($1 + 1))" | grep -qE -- "$2" \
        || { echo "no /$2/ in the TFTP log since line $1"; return 1; }
}
# gr_ip MAC: the address dnsmasq leased to MAC (TFTP log lines name it).
gr_ip() { lease_ip "$WORK/grub/run/dnsmasq-grub.leases" "$1"; }
gr_dnsmasq() { grep -qE -- "$1" "$WORK/grub/run/dnsmasq-grub.log" || { echo "no /$1/ in the dnsmasq log"; return 1; }; }
gr_no_tftp_in_dnsmasq() {
    lacks "$WORK/grub/run/dnsmasq-grub.conf" '^(enable-tftp|tftp-root)' \
        && lacks "$WORK/grub/run/dnsmasq-grub.log" 'dnsmasq-tftp'
}
# gr_chain LOG IP BOOTFILE: the firmware took BOOTFILE from the TFTP front
# end, shim loaded grubx64.efi beside it and GRUB read /grub/grub.cfg.
gr_chain() {
    local log=$1 ip=${2//./\\.} dir
    dir=$(dirname "$3")
    [ "$dir" = . ] && dir= || dir=$dir/
    has "$log" "NBP filename is $3\$" \
        && gr_tftp "tftp $ip:[0-9]+ \"/?$3\" [0-9]+ bytes .*: sent" \
        && gr_tftp "tftp $ip:[0-9]+ \"/?${dir}grubx64\.efi\" [0-9]+ bytes .*: sent" \
        && gr_tftp "tftp $ip:[0-9]+ \"/?grub/grub\.cfg\" [0-9]+ bytes .*: sent"
}
# gr_secure_boot_on LOG: the EFI stub and the kernel log say so.
gr_secure_boot_on() { has "$1" 'EFI stub: UEFI Secure Boot is enabled'; }

# Machine S, OVMF with Secure Boot enforced: scenarios 30 and 31.
gr_lane_sb() {
    BED=grub
    local root=$WORK/grub/root mac=$GR_MAC_S serial='KS E2E#S30' run=$WORK/grub/run
    local uuid=30e2e2e2-0000-4000-8000-000000000030 disk=$WORK/S.disk id ip n start t
    truncate -s 8M "$disk"
    ck 30 "dnsmasq runs no TFTP server" gr_no_tftp_in_dnsmasq || return
    start=$(date +%s)
    boot S 1-new uefi-sb "$disk" "$serial" "$uuid" 600 serial_has @LOG@ "KIWIspray: this machine is registered as host [0-9]+ and waits" -- "br0:$mac"
    t=$(($(date +%s) - start))
    ck 30 "first boot: new.grub on the console" boot_ok || return
    ip=$(gr_ip "$mac")
    id=$(db_host "$root" "$mac" id)
    ck 30 "registered as new" eq "$(db_host "$root" "$mac" state)" new || return
    ck 30 "console names the host" has "$LOG" "KIWIspray: this machine is registered as host $id and waits for an operator\."
    ck 30 "DHCP named shimx64.efi" \
        gr_dnsmasq "option: *67 bootfile-name +shimx64\.efi\$"
    ck 30 "DHCP named the TFTP front end as next server" gr_dnsmasq "next server: ${SERVER_IP//./\\.}\$"
    ck 30 "firmware -> shim -> grubx64.efi -> /grub/grub.cfg over the TFTP front end" gr_chain "$LOG" "$ip" shimx64.efi
    ck 30 "GRUB asked /ks/bootstrap over TFTP with loader=grub" \
        gr_tftp "tftp ${ip//./\\.}:[0-9]+ \"/?ks/bootstrap\?.*dhcp_mac=$(macre "$mac").*platform=efi&buildarch=x86_64.*loader=grub\" [0-9]+ bytes .*: sent"
    ck 30 "MAC stored" eq "$(db_host "$root" "$mac" macs)" "${mac^^}"
    ck 30 "SMBIOS serial stored intact" eq "$(db_host "$root" "$mac" serial)" "$serial"
    ck 30 "SMBIOS uuid stored" eq "$(db_host "$root" "$mac" uuid | tr A-F a-f)" "$uuid"
    ck 30 "platform efi (last seen)" eq "$(hosts_cli "$root" show "$id" --json | json_get host.runtime.last_seen.platform)" efi
    ck 30 "no nginx request: the machine reached the service over TFTP only" \
        lacks "$run/access.log" "^${ip//./\\.} "
    log "grub timing: Secure Boot, first boot to new.grub ${t}s"
    echo "Secure Boot x86-64, power-on to new.grub: ${t}s" >>"$WORK/logs/grub-times"

    ck 30 "kiwispray-hosts set" host_set "$root" "$id" "$IMAGE" '{"e2e": {"token": "tok-S-30"}}' e2e-s || return
    install_disk "$disk"
    n=$(gr_tftp_lines)
    start=$(date +%s)
    boot_install S 2-install uefi-sb "$disk" "$serial" "$uuid" "$INSTALL_TIMEOUT" booted @LOG@ kexec -- "br0:$mac"
    t=$(($(date +%s) - start))
    ck 30 "installed system booted by the installer (kexec)" boot_ok
    ck 30 "host.grub on the console" has "$LOG" "KIWIspray: booting image $IMAGE on host $id \(e2e-s\)"
    ck 30 "kernel and initrd over TFTP from the image directory" \
        gr_tftp_since "$n" "\"/?images/$IMAGE/pxeboot\.$P\.kernel\" [0-9]+ bytes .*: sent"
    ck 30 "initrd over TFTP" gr_tftp_since "$n" "\"/?images/$IMAGE/pxeboot\.$P\.initrd\" [0-9]+ bytes .*: sent"
    ck 30 "the installer kernel's EFI stub: Secure Boot on" gr_secure_boot_on "$LOG"
    ck 30 "kiwi-dump fetched the image" fetched_image grub "0"
    ck 30 "disk equals the image up to the root file system" disk_head_is "$disk" "$WORK/image.raw"
    ck 30 "installed system (kexec'd) kernel log: Secure boot enabled, lockdown integrity" \
        has "$LOG" 'KIWISPRAY-E2E-KERNEL: secureboot: Secure boot enabled; lockdown: .*\[integrity\]'
    ck 30 "/finish accepted" has "$LOG" "KIWIspray: host $id reported finished"
    ck 30 "installed system shows the post-install's work" \
        has "$LOG" "BOOTED from=kexec firmware=efi hostname=e2e-s firstboot=done token=tok-S-30"
    ck 30 "no bootid on the console" lacks "$LOG" "bootid=[0-9a-f]{32}"
    ck 30 "state finished" eq "$(db_host "$root" "$mac" state)" finished
    gr_initrd_time
    log "grub timing: Secure Boot, install boot to the installed system's marker ${t}s"
    echo "Secure Boot x86-64, install boot (TFTP, kiwi-dump, kexec, first boot): ${t}s" >>"$WORK/logs/grub-times"
    done_scenario 30
    failed 30 && return

    # 31. finished: finished.grub, then the firmware boots the disk
    n=$(gr_tftp_lines)
    boot S 3-local uefi-sb "$disk" "$serial" "$uuid" "$DISK_BOOT_TIMEOUT" gr_local_outcome @LOG@ -- "br0:$mac"
    ck 31 "finished.grub on the console" \
        has "$LOG" "KIWIspray: host $id \(e2e-s\) is installed; booting from the local disk\."
    ck 31 "GRUB asked /ks/bootstrap again" gr_tftp_since "$n" "\"/?ks/bootstrap\?.*loader=grub\" [0-9]+ bytes .*: sent"
    ck 31 "no installer fetched" eq "$(grep 'kiwispray: tftp ' "$WORK/grub/serve.log" | tail -n +"$((n + 1))" | grep -c '/images/')" 0
    ck 31 "firmware went on to the disk, not to its setup menu (UiApp)" gr_not_uiapp "$LOG"
    ck 31 "installed system booted from its disk" boot_ok
    ck 31 "its GRUB (signed, from the ESP) ran" has "$LOG" 'KIWISPRAY-E2E: GRUB of the installed system'
    ck 31 "Secure Boot on for the disk boot" has "$LOG" 'KIWISPRAY-E2E-KERNEL: secureboot: Secure boot enabled'
    ck 31 "installed system keeps the first boot's work" \
        has "$LOG" "BOOTED from=disk firmware=efi hostname=e2e-s firstboot=done token=tok-S-30"
    ck 31 "still finished" eq "$(db_host "$root" "$mac" state)" finished
    done_scenario 31
}
# gr_local_outcome LOG: the installed system booted from its disk, or the
# firmware gave up on booting (its setup menu).
gr_local_outcome() { booted "$1" disk || serial_has "$1" 'BdsDxe: starting Boot[0-9A-F]+ "UiApp"'; }
gr_not_uiapp() {
    ! serial_has "$1" 'BdsDxe: starting Boot[0-9A-F]+ "UiApp"' && return 0
    local why
    why=$(tr -d '\r' <"$1" | grep -aE -m1 'Failed to load image .*grubx64|start_image\(\) returned')
    if [ -n "$why" ]; then
        echo "OVMF started UiApp, its setup menu: the disk's boot loader that finished.grub chainloaded failed ($why; GRUB gave it the device path of the network it came from, not the disk's)"
    else
        echo "OVMF started UiApp, its setup menu, after finished.grub: GRUB 2.06 leaves with EFI_SUCCESS whatever status exit is given, so the firmware does not try its next boot option"
    fi
    return 1
}
# gr_initrd_time: the TFTP front end's time for the installer's initrd,
# into the timings.
gr_initrd_time() {
    local l
    l=$(grep -E "\"/?images/$IMAGE/pxeboot\.$P\.initrd\" [0-9]+ bytes" "$WORK/grub/serve.log" | tail -n1)
    [ -n "$l" ] || return 0
    l=$(sed -E 's/.*" ([0-9]+) bytes ([0-9.]+) s.*/\1 bytes in \2 s/' <<<"$l")
    log "grub timing: installer initrd over TFTP from GRUB: $l"
    echo "installer initrd over TFTP (GRUB, Secure Boot, TCG): $l" >>"$WORK/logs/grub-times"
}

# Machines U1 (unsigned shim) and U2 (unsigned GRUB), OVMF with
# Secure Boot enforced: scenario 32.
gr_lane_unsigned() {
    BED=grub
    local root=$WORK/grub/root disk=$WORK/U.disk ip
    truncate -s 8M "$disk"
    boot U1 1-refused uefi-sb "$disk" KS-E2E-U1 32e2e2e2-0000-4000-8000-000000000321 240 \
        serial_has @LOG@ 'Access Denied' -- "br0:$GR_MAC_U1"
    ip=$(gr_ip "$GR_MAC_U1")
    ck 32 "unsigned shim: the firmware refused it (Access Denied)" boot_ok
    ck 32 "unsigned shim: it was the boot file, sent by the TFTP front end" \
        gr_tftp "tftp ${ip//./\\.}:[0-9]+ \"/?unsigned/shimx64\.efi\" [0-9]+ bytes .*: sent"
    ck 32 "unsigned shim: the firmware's refusal of the PXE boot option" \
        has "$LOG" 'BdsDxe: failed to load Boot[0-9A-F]+ "UEFI PXEv4.*Access Denied'
    ck 32 "unsigned shim: no GRUB" lacks "$LOG" 'Welcome to GRUB'
    ck 32 "unsigned shim: no /bootstrap" gr_no_bootstrap "$ip" "$GR_MAC_U1"

    boot U2 1-refused uefi-sb "$disk" KS-E2E-U2 32e2e2e2-0000-4000-8000-000000000322 240 \
        serial_has @LOG@ 'Access Denied' -- "br0:$GR_MAC_U2"
    ip=$(gr_ip "$GR_MAC_U2")
    ck 32 "unsigned GRUB: the firmware refused it (Access Denied)" boot_ok
    ck 32 "unsigned GRUB: the firmware's refusal of the PXE boot option" \
        has "$LOG" 'BdsDxe: failed to load Boot[0-9A-F]+ "UEFI PXEv4.*Access Denied'
    ck 32 "unsigned GRUB: it was the boot file, sent by the TFTP front end" \
        gr_tftp "tftp ${ip//./\\.}:[0-9]+ \"/?unsigned/grubx64\.efi\" [0-9]+ bytes .*: sent"
    ck 32 "unsigned GRUB: it did not run" lacks "$LOG" 'Welcome to GRUB'
    ck 32 "unsigned GRUB: no /bootstrap" gr_no_bootstrap "$ip" "$GR_MAC_U2"
    ck 32 "no host registered" eq "$(db_count "$root" "$GR_MAC_U1")/$(db_count "$root" "$GR_MAC_U2")" 0/0
    done_scenario 32
}
gr_no_bootstrap() {
    [ -n "$1" ] || { echo "no lease for $2"; return 1; }
    ! grep -E "tftp ${1//./\\.}:[0-9]+ \"/?(grub/grub\.cfg|ks/)" "$WORK/grub/serve.log" \
        || { echo "the machine fetched grub.cfg or asked the service"; return 1; }
    ! grep -qE "^${1//./\\.} " "$WORK/grub/run/access.log" || { echo "the machine asked nginx"; return 1; }
}

# Machine R, ARM64 (qemu-system-aarch64, TCG, AAVMF): scenario 33.
gr_lane_arm() {
    BED=grub
    local root=$WORK/grub/root mac=$GR_MAC_R serial=KS-E2E-R33 ip id start t
    local uuid=33e2e2e2-0000-4000-8000-000000000033 disk=$WORK/R.disk
    ck 33 "grubaa64.efi in the e2e cache (make deps-test extracts grub-efi-arm64-signed)" test -e "$GR_ARM64_EFI" || return
    truncate -s 8M "$disk"
    start=$(date +%s)
    boot R 1-new aarch64 "$disk" "$serial" "$uuid" 600 serial_has @LOG@ "KIWIspray: this machine is registered as host [0-9]+ and waits" -- "br0:$mac"
    t=$(($(date +%s) - start))
    ck 33 "first boot: new.grub on the console" boot_ok || return
    ip=$(gr_ip "$mac")
    id=$(db_host "$root" "$mac" id)
    ck 33 "registered as new" eq "$(db_host "$root" "$mac" state)" new || return
    ck 33 "console names the host" has "$LOG" "KIWIspray: this machine is registered as host $id and waits for an operator\."
    ck 33 "DHCP saw an ARM64 client (arch 11) and named grubaa64.efi" \
        gr_dnsmasq "vendor class: PXEClient:Arch:00011"
    ck 33 "bootfile grubaa64.efi" gr_dnsmasq "option: *67 bootfile-name +grubaa64\.efi\$"
    ck 33 "firmware -> grubaa64.efi -> /grub/grub.cfg over the TFTP front end" \
        gr_tftp "tftp ${ip//./\\.}:[0-9]+ \"/?grubaa64\.efi\" [0-9]+ bytes .*: sent"
    ck 33 "GRUB read /grub/grub.cfg" gr_tftp "tftp ${ip//./\\.}:[0-9]+ \"/?grub/grub\.cfg\" [0-9]+ bytes .*: sent"
    ck 33 "/ks/bootstrap with platform efi, buildarch arm64, loader grub" \
        gr_tftp "tftp ${ip//./\\.}:[0-9]+ \"/?ks/bootstrap\?.*dhcp_mac=$(macre "$mac").*platform=efi&buildarch=arm64.*loader=grub\" [0-9]+ bytes .*: sent"
    ck 33 "platform efi (last seen)" eq "$(hosts_cli "$root" show "$id" --json | json_get host.runtime.last_seen.platform)" efi
    # a serial with '-' in it: bootstrap.grub's encoder must not take the
    # rest of the value for an option of regexp
    ck 33 "serial with '-' stored intact" eq "$(db_host "$root" "$mac" serial)" "$serial"
    ck 33 "uuid stored" eq "$(db_host "$root" "$mac" uuid | tr A-F a-f)" "$uuid"
    log "grub timing: ARM64 (TCG), power-on to new.grub ${t}s"
    echo "ARM64 (TCG), power-on to new.grub: ${t}s" >>"$WORK/logs/grub-times"

    ck 33 "kiwispray-hosts set --state finished" host_set "$root" "$id" finished '' e2e-r || return
    boot R 2-finished aarch64 "$disk" "$serial" "$uuid" 600 \
        serial_has @LOG@ "KIWIspray: host $id \(e2e-r\) is installed; booting from the local disk\." -- "br0:$mac"
    ck 33 "finished.grub on the console" boot_ok
    ck 33 "still finished, same host" eq "$(db_host "$root" "$mac" state)/$(db_count "$root" "$mac")" finished/1
    done_scenario 33
}
