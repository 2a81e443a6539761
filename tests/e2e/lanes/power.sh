# shellcheck shell=bash
# e2e lane file (sourced by run.sh): out-of-band power through a real IPMI
# BMC. The guest P has `-device ipmi-bmc-extern` with `isa-ipmi-kcs`,
# connected to OpenIPMI's ipmi_sim, whose LAN channel listens on the bed's
# address ($SERVER_IP, port 623) and whose chassis control (lan.conf
# `chassis_control`) is the only thing that starts and stops P's QEMU
# process: power on starts it, power off ends it, and a boot device of
# `pxe` (chassis bootdev pxe) makes the next power-on boot from the network
# first, once. kiwispray-hosts drives it with ipmitool -I lanplus.
#  11. power status / on / off through the BMC really start and stop the
#      machine, and status reports on and off as they are;
#  12. a finished machine booting its installed system from disk gets
#      `kiwispray-hosts reinstall 1 --state <image>`: the BMC is asked for
#      one PXE boot and power-cycles the guest (a new QEMU process), which
#      boots from the network, installs with kiwi-dump and reports /finish;
#  13. a later plain `power cycle` boots the installed system from its disk
#      without asking /bootstrap (the PXE flag was used up).
# Bed: power (namespace, serve.sh with dnsmasq, the image imported). The
# machine starts finished with a copy of the test image as its disk, so the
# lane installs once (scenario 12), in the shared install slot.

SCENARIOS+=(11 12 13)
TITLE[11]="IPMI (ipmi_sim, ipmitool lanplus): power on/off start and stop the guest, power status reports on and off"
TITLE[12]="reinstall 1 --state IMAGE of a finished machine: PXE once, power cycle, network boot, kiwi-dump install, /finish"
TITLE[13]="a later plain power cycle through the BMC boots the installed system from its disk, no /bootstrap"
MACHINE[11]=P
MACHINE[12]=P
MACHINE[13]=P
# an install lane: it goes with the other install lanes, which queue for
# the install slot first
pw_lanes=()
for l in "${LANES[@]}"; do
    pw_lanes+=("$l")
    [ "$l" = lane_l ] && pw_lanes+=(pw_lane)
done
[[ " ${pw_lanes[*]} " == *" pw_lane "* ]] || pw_lanes+=(pw_lane)
LANES=("${pw_lanes[@]}")
unset pw_lanes
LANE_SCEN[pw_lane]="11 12 13"
BEDS+=(power)
SETUP+=(pw_setup)

PW_MAC=52:54:00:e2:1b:01
PW_SERIAL=KS-E2E-P
PW_UUID=b1e2e2e2-0000-4000-8000-00000000001b
PW_VMPORT=9002
PW_PASSWORD=e2e-Ipmi-Pw-31

# pw_cli ARGS...: kiwispray-hosts on the power bed's root, inside its namespace.
pw_cli() {
    ip netns exec "kse2e-$$-power" "$E2E_REPO/target/release/kiwispray-hosts" --root "$WORK/power/root" "$@"
}

pw_setup() {
    wanted 11 12 13 || return 0
    command -v ipmi_sim >/dev/null && command -v ipmitool >/dev/null \
        || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openipmi ipmitool >/dev/null 2>&1
    command -v ipmi_sim >/dev/null || { log "power: ipmi_sim is missing (openipmi)"; return 1; }
    bed_up power || return 1
    import_image "$WORK/power/root" || return 1
    local ns=kse2e-$$-power d=$WORK/power/bmc root=$WORK/power/root
    mkdir -p "$d/state"
    # the machine's only NIC, on the bed's bridge
    ip -n "$ns" tuntap add dev tP0 mode tap
    ip -n "$ns" link set tP0 master br0 up
    # its disk: the installed test image, with room for the post-install record
    cp --sparse=always "$WORK/image.raw" "$WORK/P.disk"
    truncate -s $(($(stat -c %s "$WORK/image.raw") + (64 << 20))) "$WORK/P.disk"
    pw_chassis_script >"$d/chassis.sh"
    chmod 755 "$d/chassis.sh"
    cat >"$d/lan.conf" <<EOF
# the BMC of machine P: IPMI 2.0 over LAN on the bed's address
name "kse2e-p"
set_working_mc 0x20
  startlan 1
    addr $SERVER_IP 623
    priv_limit admin
    allowed_auths_callback md5
    allowed_auths_user md5
    allowed_auths_operator md5
    allowed_auths_admin md5
    guid 6b73653265707077720000000000001b
  endlan
  # power and boot device: this program starts and stops P's QEMU
  chassis_control "$d/chassis.sh 0x20"
  # the system interface (KCS) of the guest, QEMU's ipmi-bmc-extern
  serial 15 127.0.0.1 $PW_VMPORT codec VM
  user 2 true "admin" "$PW_PASSWORD" admin 10 md5
EOF
    cat >"$d/sim.emu" <<'EOF'
mc_setbmc 0x20
mc_add 0x20 0 no-device-sdrs 0x23 9 8 0x9f 0x1291 0xf02
mc_enable 0x20
EOF
    ip netns exec "$ns" ipmi_sim -c "$d/lan.conf" -f "$d/sim.emu" -s "$d/state" -n \
        >"$WORK/logs/ipmi_sim.log" 2>&1 </dev/null &
    echo $! >"$WORK/power/ipmi_sim.ownpid"
    # the credentials, as an operator writes them
    ( umask 077
      printf '{"default": {"user": "admin", "password": "%s", "cipher_suite": 3}}\n' "$PW_PASSWORD" \
          >"$root/bmc-credentials.json" )
    # machine P, installed and finished, with its BMC
    pw_cli add --mac "$PW_MAC" --serial "$PW_SERIAL" --uuid "$PW_UUID" --hostname e2e-p \
        --state finished --bmc "ipmi://$SERVER_IP" --meta '{"e2e": {"token": "tok-P"}}' \
        >>"$WORK/logs/power-cli.log" 2>&1 || return 1
    local i
    for i in $(seq 50); do
        ip netns exec "$ns" ss -Hlun "sport = :623" | grep -q . && return 0
        sleep 0.2
    done
    log "power: ipmi_sim does not listen on $SERVER_IP:623"
    cat "$WORK/logs/ipmi_sim.log" >&2
    return 1
}

# The chassis control program of ipmi_sim: `chassis.sh DEV get power|boot`
# prints power:1/0 and boot:VALUE; `chassis.sh DEV set power 1|0 boot V
# reset 1` acts. Each power-on starts a new QEMU process (serial log
# $WORK/logs/P-<n>-power-on.serial); with boot device pxe the NIC comes
# before the disk, for that power-on only.
pw_chassis_script() {
    cat <<EOF
#!/bin/bash
d=$WORK/power/bmc
work=$WORK
vmport=$PW_VMPORT
mac=$PW_MAC
serial=$PW_SERIAL
uuid=$PW_UUID
EOF
    cat <<'EOF'
echo "$(date +%T) $*" >>"$d/chassis.log"
running() {
    local pid
    pid=$(cat "$d/qemu.pid" 2>/dev/null) || return 1
    [ -e "/proc/$pid" ] && [ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" != Z ]
}
power_on() {
    running && return 0
    local n nic=2 disk=1 boot
    n=$(($(cat "$d/boots" 2>/dev/null || echo 0) + 1))
    echo "$n" >"$d/boots"
    boot=$(cat "$d/boot" 2>/dev/null || echo default)
    # a boot device is valid for the next boot only
    rm -f "$d/boot"
    [ "$boot" = pxe ] && nic=1 disk=2
    echo "$n $boot" >>"$d/power-ons"
    local log=$work/logs/P-$n-power-on.serial
    : >"$log"
    setsid qemu-system-x86_64 -accel tcg -smp 1 -nographic -monitor none -no-reboot \
        -name "kse2e-P-$n" -serial "file:$log" -machine pc -m 1536 \
        -smbios "type=1,serial=$serial,uuid=$uuid" \
        -netdev tap,id=n0,ifname=tP0,script=no,downscript=no \
        -device "virtio-net-pci,netdev=n0,mac=$mac,bootindex=$nic" \
        -drive "if=none,id=d0,format=raw,file=$work/P.disk" \
        -device "virtio-blk-pci,drive=d0,bootindex=$disk" \
        -chardev "socket,id=ipmi0,host=127.0.0.1,port=$vmport,reconnect=10" \
        -device ipmi-bmc-extern,chardev=ipmi0,id=bmc0 -device isa-ipmi-kcs,bmc=bmc0 \
        >"$work/logs/P-$n.qemu" 2>&1 </dev/null &
    echo $! >"$d/qemu.pid"
    echo $! >>"$work/qemu.pids"
}
power_off() {
    local pid i
    running || return 0
    pid=$(cat "$d/qemu.pid")
    kill -TERM "$pid"
    for i in $(seq 50); do running || return 0; sleep 0.1; done
    kill -KILL "$pid"
    for i in $(seq 50); do running || return 0; sleep 0.1; done
}
shift
op=$1
shift
case $op in
get)
    for p; do
        case $p in
            power) if running; then echo power:1; else echo power:0; fi ;;
            boot) echo "boot:$(cat "$d/boot" 2>/dev/null || echo default)" ;;
            *) echo "unknown parameter $p"; exit 1 ;;
        esac
    done ;;
set)
    while [ $# -gt 1 ]; do
        case $1 in
            power) if [ "$2" = 1 ]; then power_on; else power_off; fi ;;
            reset) power_off; power_on ;;
            boot) echo "$2" >"$d/boot" ;;
            *) ;;
        esac
        shift 2
    done ;;
*) echo "unknown operation $op"; exit 1 ;;
esac
exit 0
EOF
}

pw_pid() { cat "$WORK/power/bmc/qemu.pid" 2>/dev/null; }
# pw_gone PID N: boot N's QEMU process (PID) has exited: no live process
# runs as `-name kse2e-P-N` (a zombie has no command line, and a PID
# taken again by another process is not that guest); says what it found
# otherwise.
pw_gone() {
    local live
    live=$(pgrep -f -- "-name kse2e-P-$2 " | tr '\n' ' ')
    [ -z "$live" ] && return 0
    echo "boot $2's QEMU still runs: pid $live(recorded $1): $(ps -o pid=,stat=,etime= -p "${live%% *}" 2>&1)"
    return 1
}
pw_boots() { cat "$WORK/power/bmc/boots" 2>/dev/null || echo 0; }
pw_log() { echo "$WORK/logs/P-$1-power-on.serial"; }
# pw_status WANT: power status through the BMC reports WANT, in the table and in --json.
pw_status() {
    local t j
    t=$(pw_cli power 1 status) || { echo "power status failed: $t"; return 1; }
    echo "$t" | grep -qE "^1 +e2e-p +ipmi://${SERVER_IP//./\\.} +$1\$" || { echo "table: $t"; return 1; }
    j=$(pw_cli power 1 status --json) || return 1
    echo "$j" | python3 -c 'import json,sys; v=json.load(sys.stdin)[0]; sys.exit(0 if v["power"]==sys.argv[1] and v["ok"] else 1)' "$1" \
        || { echo "json: $j"; return 1; }
}
qemu_alive() { local p; p=$(pw_pid); [ -n "$p" ] && [ -e "/proc/$p" ] && [ "$(awk '{print $3}' "/proc/$p/stat")" != Z ]; }
qemu_gone() { ! qemu_alive || { echo "QEMU $(pw_pid) still runs"; return 1; }; }
# pw_wait N TIMEOUT COND...: waits for COND (@LOG@: boot N's serial log)
# while boot N's QEMU runs; sets BOOT_RESULT like boot().
pw_wait() {
    local n=$1 t=$2 log pid rc
    shift 2
    log=$(pw_log "$n")
    pid=$(pw_pid)
    guest_wait "$pid" "$t" "$log" "${@//@LOG@/$log}"
    rc=$?
    case $rc in
        0) BOOT_RESULT="outcome seen" ;;
        1) BOOT_RESULT="guest P boot $n ended before its outcome was seen" ;;
        2) BOOT_RESULT="guest P boot $n: no outcome within ${t}s" ;;
        *) BOOT_RESULT="guest P boot $n: error on the console: $(tr -d '\r' <"$log" | grep -aE -m1 "$E2E_FATAL" | cut -c1-160)" ;;
    esac
    log "guest P boot $n: $BOOT_RESULT"
    return $rc
}
bootstraps() { access_log power | grep -cE "GET /bootstrap\?.*$(macre "$PW_MAC")"; }
no_secret() {
    ! grep -rqF "$PW_PASSWORD" "$WORK/power/root/known_hosts.json" "$WORK/power/root/events.jsonl" \
        "$WORK/logs/power-cli.log" "$WORK/power/run/" 2>/dev/null || { echo "the BMC password leaked"; return 1; }
}

pw_lane() {
    BED=power
    local root=$WORK/power/root n since nboot pid1 pid2 out
    [ -e "$WORK/power/ipmi_sim.ownpid" ] || { fail 11 "set-up" "the power bed or ipmi_sim did not come up"; return; }

    # 11. power through the BMC: off, on (QEMU starts), status on
    ck 11 "power status reports off before the machine runs" pw_status off || return
    ck 11 "no QEMU process yet" qemu_gone
    ck 11 "kiwispray-hosts power 1 on" pw_cli power 1 on || return
    ck 11 "the BMC started the guest's QEMU" qemu_alive || return
    ck 11 "power status reports on" pw_status on
    ck 11 "ipmi_sim was asked through its chassis control" grep -q 'set power "1"\|set power 1' "$WORK/power/bmc/chassis.log"
    n=$(pw_boots)
    # the finished machine boots its installed system from its disk
    pw_wait "$n" "$DISK_BOOT_TIMEOUT" booted @LOG@ disk
    ck 11 "the finished machine boots its installed system from disk" boot_ok || return
    ck 11 "the guest's BMC device (ipmi-bmc-extern) is connected to ipmi_sim" \
        test -n "$(ip netns exec "kse2e-$$-power" ss -Htn state established "( sport = :$PW_VMPORT )")"
    ck 11 "events record the power actions" grep -q '"cause":"power".*"detail":"power on: powered on"' "$root/events.jsonl"
    done_scenario 11

    # 12. reinstall through the BMC, holding the install slot like boot_install
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
    pid1=$(pw_pid)
    boot1=$(pw_boots)
    since=$(log_lines power)
    nboot=$(bootstraps)
    out=$(pw_cli reinstall 1 --state "$IMAGE" 2>&1)
    local rc=$?
    echo "$out" >>"$WORK/logs/power-cli.log"
    ck 12 "kiwispray-hosts reinstall 1 --state $IMAGE" eq "$rc/$out" "0/$out" || { exec {fd}>&-; return; }
    ck 12 "the table says PXE once and power-cycled" grep -q 'network boot once (BIOS), power-cycled' <<<"$out"
    ck 12 "state set to $IMAGE" eq "$(db_host "$root" "$PW_MAC" state)" "$IMAGE"
    # the power cycle: a new QEMU process, started NIC first
    for _ in $(seq 60); do [ "$(pw_pid)" != "$pid1" ] && qemu_alive && break; sleep 0.5; done
    pid2=$(pw_pid)
    ck 12 "the guest was power-cycled (a new QEMU process)" test "$pid2" != "$pid1" -a -n "$pid2"
    # gone: exited (a zombie not yet reaped by its new parent counts, as in
    # the chassis control's own `running`)
    for _ in $(seq 60); do pw_gone "$pid1" "$boot1" >/dev/null && break; sleep 0.5; done
    ck 12 "the old QEMU process is gone" pw_gone "$pid1" "$boot1"
    ck 12 "the BMC was told: boot pxe, power off, power on" \
        python3 - "$WORK/power/bmc/chassis.log" <<'PY'
import re, sys
lines = [l.split(" ", 1)[1].strip() for l in open(sys.argv[1])]
want = ["0x20 set boot pxe", "0x20 set power 0", "0x20 set power 1"]
i = 0
for l in lines[-40:]:
    if i < len(want) and l.replace('"', '') == want[i]:
        i += 1
sys.exit(0 if i == len(want) else print(lines[-40:]) or 1)
PY
    n=$(pw_boots)
    ck 12 "this power-on boots from the network first" grep -q "^$n pxe\$" "$WORK/power/bmc/power-ons"
    pw_wait "$n" "$INSTALL_TIMEOUT" booted @LOG@ kexec
    exec {fd}>&-
    ck 12 "network boot, kiwi-dump install, kexec into the installed system" boot_ok
    ck 12 "the machine asked /bootstrap again" test "$(bootstraps)" -gt "$nboot"
    ck 12 "kiwi-dump fetched checksum, kernel, initrds, boot options and image" fetched_image power "$since"
    ck 12 "post-install record on the disk" eq "$(disk_record "$WORK/P.disk")" \
        "E2E-POSTINSTALL id=1 hostname=e2e-p token=tok-P serial=$PW_SERIAL"
    ck 12 "/finish accepted" has "$(pw_log "$n")" "KIWIspray: host 1 reported finished"
    ck 12 "state finished" eq "$(db_host "$root" "$PW_MAC" state)" finished
    ck 12 "events: reinstall, the BMC steps, finish" python3 - "$root/events.jsonl" "$IMAGE" <<'PY'
import json, sys
ev = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
causes = [(e["cause"], e.get("detail", "")) for e in ev]
ok = any(c == "reinstall" and e["to"] == sys.argv[2] for e, (c, _) in zip(ev, causes)) \
    and any(c == "power" and d.startswith("reinstall: network boot once") for c, d in causes) \
    and any(c == "finish" for c, _ in causes)
sys.exit(0 if ok else print(causes) or 1)
PY
    ck 12 "the BMC password is nowhere in the database, events, logs or output" no_secret
    done_scenario 12
    failed 12 && return

    # 13. a plain power cycle: the PXE flag was used up, the disk boots
    nboot=$(bootstraps)
    pid1=$(pw_pid)
    out=$(pw_cli power 1 cycle 2>&1)
    ck 13 "kiwispray-hosts power 1 cycle" grep -q 'power-cycled' <<<"$out" || return
    for _ in $(seq 60); do [ "$(pw_pid)" != "$pid1" ] && qemu_alive && break; sleep 0.5; done
    n=$(pw_boots)
    ck 13 "a new QEMU process" test "$(pw_pid)" != "$pid1"
    ck 13 "this power-on boots the disk first" grep -q "^$n default\$" "$WORK/power/bmc/power-ons"
    pw_wait "$n" "$DISK_BOOT_TIMEOUT" booted @LOG@ disk
    ck 13 "the installed system booted from its disk" boot_ok
    ck 13 "it keeps the reinstall's post-install work" \
        has "$(pw_log "$n")" "BOOTED from=disk firmware=bios hostname=e2e-p firstboot=done token=tok-P"
    ck 13 "no /bootstrap on this boot" eq "$(bootstraps)" "$nboot"
    ck 13 "power status reports on" pw_status on
    ck 13 "kiwispray-hosts power 1 off" pw_cli power 1 off
    ck 13 "the BMC stopped the guest's QEMU" qemu_gone
    ck 13 "power status reports off" pw_status off
    done_scenario 13
    # the BMC is no longer needed
    kill -TERM "$(cat "$WORK/power/ipmi_sim.ownpid")" 2>/dev/null
}
