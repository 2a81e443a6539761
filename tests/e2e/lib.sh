# shellcheck shell=bash
# Helpers of the end-to-end test bed (sourced by run.sh): environment check,
# network namespaces, the serve.sh stack, QEMU guests, database queries and
# result bookkeeping. Everything network-facing lives inside namespaces
# named kse2e-<pid>-<bed>; nothing is started in the host's namespace.

E2E_REPO=${E2E_REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}
E2E_HERE=$E2E_REPO/tests/e2e
E2E_CACHE=${E2E_CACHE:-/var/cache/kiwispray-e2e}
SERVER_IP=10.77.0.1
SERVER_PORT=5000
SITE_IP=10.77.0.254     # the site's own DHCP server in the proxy-DHCP bed
DHCP_RANGE=10.77.0.100,10.77.0.199,255.255.255.0,1h
IPXE_ROM=/usr/lib/ipxe/qemu/efi-virtio.rom
OVMF_CODE=/usr/share/OVMF/OVMF_CODE_4M.fd
OVMF_VARS=/usr/share/OVMF/OVMF_VARS_4M.fd
# Secure Boot enforced: the SMM build with Microsoft's keys enrolled
OVMF_SB_CODE=/usr/share/OVMF/OVMF_CODE_4M.secboot.fd
OVMF_SB_VARS=/usr/share/OVMF/OVMF_VARS_4M.ms.fd
# ARM64 (qemu-efi-aarch64)
AAVMF_CODE=/usr/share/AAVMF/AAVMF_CODE.fd
AAVMF_VARS=/usr/share/AAVMF/AAVMF_VARS.fd

log() { printf '%s e2e: %s\n' "$(date +%T)" "$*" >&2; }

# Loud, never silent: exits non-zero unless E2E_ALLOW_SKIP=1.
e2e_skip() {
    {
        echo "################################################################"
        echo "E2E SKIPPED: $*"
        echo "################################################################"
        echo "e2e: 0 passed, 0 failed, 9 skipped"
    } >&2
    if [ "${E2E_ALLOW_SKIP:-0}" = 1 ]; then exit 0; fi
    exit 2
}

# --- environment -----------------------------------------------------------

env_missing() {
    local m=()
    local c
    for c in qemu-system-x86_64:qemu-system-x86 dnsmasq:dnsmasq nginx:nginx-light \
             xz:xz-utils cpio:cpio ip:iproute2 curl:curl as:binutils ld:binutils \
             python3:python3 gzip:gzip mmdebstrap:mmdebstrap sfdisk:fdisk mkfs.ext4:e2fsprogs \
             mkfs.vfat:dosfstools mcopy:mtools; do
        command -v "${c%%:*}" >/dev/null 2>&1 || m+=("${c#*:}")
    done
    # the kiwi sdist comes with pip download
    python3 -m pip --version >/dev/null 2>&1 || m+=(python3-pip)
    # ldd fails on a static binary
    [ -x /bin/busybox ] && ! ldd /bin/busybox >/dev/null 2>&1 || m+=(busybox-static)
    [ -e /usr/lib/ipxe/undionly.kpxe ] && [ -e /usr/lib/ipxe/snponly.efi ] || m+=(ipxe)
    [ -e "$IPXE_ROM" ] || m+=(ipxe-qemu)
    [ -e "$OVMF_CODE" ] && [ -e "$OVMF_VARS" ] || m+=(ovmf)
    command -v apt-get >/dev/null && ! dpkg -s seabios >/dev/null 2>&1 && m+=(seabios)
    printf '%s\n' "${m[@]}" | sort -u | grep . || true
}

env_check() {
    [ "$(id -u)" = 0 ] || e2e_skip "must run as root (network namespaces, tap devices)"
    local missing
    missing=$(env_missing)
    if [ -n "$missing" ]; then
        command -v apt-get >/dev/null || e2e_skip "missing packages and no apt-get: $(echo $missing)"
        log "installing: $(echo $missing)"
        if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null 2>&1; then
            apt-get update -qq >/dev/null 2>&1 || true
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null 2>&1 || true
        fi
        missing=$(env_missing)
        [ -z "$missing" ] || e2e_skip "could not install: $(echo $missing)"
    fi
    [ -c /dev/net/tun ] || e2e_skip "/dev/net/tun is missing (no tap devices)"
    local probe=kse2e-probe-$$
    ip netns add "$probe" 2>/dev/null || e2e_skip "cannot create a network namespace (ip netns add)"
    if ! ip -n "$probe" tuntap add dev tapprobe mode tap 2>/dev/null; then
        ip netns del "$probe"
        e2e_skip "cannot create a tap device inside a network namespace"
    fi
    ip netns del "$probe"
    [ -x "$E2E_REPO/nginx/serve.sh" ] || e2e_skip "nginx/serve.sh is missing"
    local b
    for b in kiwispray-fcgi kiwispray-hosts; do
        [ -x "$E2E_REPO/target/release/$b" ] || e2e_skip "target/release/$b is not built (make build)"
    done
}

# --- test beds: namespace + bridges + serve.sh (nginx, handler, dnsmasq) ----

# bed_up NAME [DISCOVER [DHCP]]: namespace kse2e-<pid>-NAME with br0 (DHCP,
# $SERVER_IP) and br1 (a dead network: no address, no DHCP), and the stack.
# DHCP=full (default): serve.sh runs dnsmasq with dnsmasq/kiwispray.conf.
# DHCP=proxy: serve.sh runs nginx and the handler only, and proxy_dhcp_up
# adds the site's DHCP server and KIWIspray's proxy (kiwispray-proxy.conf).
bed_up() {
    local name=$1 discover=${2:-0} dhcp=${3:-full}
    local ns=kse2e-$$-$name dir=$WORK/$name
    mkdir -p "$dir/root" "$dir/run"
    echo "$ns" >>"$WORK/namespaces"
    ip netns add "$ns"
    ip -n "$ns" link set lo up
    ip -n "$ns" link add br0 type bridge forward_delay 0
    ip -n "$ns" addr add "$SERVER_IP/24" dev br0
    ip -n "$ns" link set br0 up
    ip -n "$ns" link add br1 type bridge forward_delay 0
    ip -n "$ns" link set br1 up
    # Seed the root the way `make serve` would, then let the test add to it.
    seed_root "$dir/root"
    local envs=("PORT=$SERVER_PORT" "ROOT=$dir/root" "RUN_DIR=$dir/run")
    [ "$dhcp" = full ] && envs+=(DHCP_IFACE=br0 "DHCP_RANGE=$DHCP_RANGE" "SERVER_IP=$SERVER_IP")
    [ "$discover" = 1 ] && envs+=(DISCOVER=1)
    ip netns exec "$ns" env "${envs[@]}" "$E2E_REPO/nginx/serve.sh" \
        >"$dir/serve.log" 2>&1 </dev/null &
    echo $! >"$dir/serve.pid"
    [ "$dhcp" = proxy ] && { proxy_dhcp_up "$name" || return 1; }
    local i
    for i in $(seq 100); do
        if ip netns exec "$ns" curl -fsS -o /dev/null "http://$SERVER_IP:$SERVER_PORT/bootstrap.ipxe" 2>/dev/null \
           && [ -n "$(dnsmasq_pids "$ns")" ]; then
            log "bed $name up (namespace $ns, $dhcp DHCP)"
            return 0
        fi
        kill -0 "$(cat "$dir/serve.pid")" 2>/dev/null || break
        sleep 0.3
    done
    log "bed $name did not come up; serve.sh output:"
    sed 's/^/    /' "$dir/serve.log" >&2
    return 1
}

# proxy_dhcp_up NAME: the proxy-DHCP network of bed NAME. Two dnsmasq
# instances answer DHCP on br0:
#  - the site's own DHCP server, a plain dnsmasq with a config of its own
#    that hands out addresses and no boot information at all. It listens on
#    site0 ($SITE_IP), one end of a veth pair whose other end is a port of
#    br0, so on the wire it is a host of its own;
#  - KIWIspray's proxy: dnsmasq/kiwispray-proxy.conf, adapted only in the
#    interface (br0), the proxy dhcp-range (the network of br0) and the
#    server address ($SERVER_IP:$SERVER_PORT, and $SERVER_IP as the
#    next server of the bootstrap URL), as serve.sh adapts
#    kiwispray.conf. It gives PXE firmware iPXE over TFTP and iPXE the
#    bootstrap URL.
# Each binds port 67 to its own interface (bind-interfaces); the proxy alone
# serves port 4011 and TFTP. Configs, logs and leases are
# $WORK/NAME/run/dnsmasq-{site,proxy}.{conf,log,leases}.
proxy_dhcp_up() {
    local name=$1 ns=kse2e-$$-$1 run=$WORK/$1/run
    ip -n "$ns" link add site0 type veth peer name site0p
    ip -n "$ns" link set site0p master br0 up
    # no prefix route: the namespace reaches the guests through br0 only,
    # and each interface answers ARP for its own address only
    ip -n "$ns" addr add "$SITE_IP/24" dev site0 noprefixroute
    ip -n "$ns" link set site0 up
    ip netns exec "$ns" sh -c 'for i in site0 br0; do echo 1 >/proc/sys/net/ipv4/conf/$i/arp_ignore; done'
    cat >"$run/dnsmasq-site.conf" <<EOF
# the site's DHCP server: addresses only, no boot information
interface=site0
bind-interfaces
except-interface=lo
port=0
dhcp-range=$DHCP_RANGE
log-dhcp
EOF
    sed -e "s#^interface=.*#interface=br0#" \
        -e "s#^dhcp-range=.*,proxy\$#dhcp-range=${SERVER_IP%.*}.0,proxy#" \
        -e "s#192\.168\.100\.1:5000#$SERVER_IP:$SERVER_PORT#g" \
        -e "s#192\.168\.100\.1\\b#$SERVER_IP#g" \
        "$E2E_REPO/dnsmasq/kiwispray-proxy.conf" >"$run/dnsmasq-proxy.conf"
    local which
    for which in site proxy; do
        ip netns exec "$ns" dnsmasq --keep-in-foreground --conf-file="$run/dnsmasq-$which.conf" \
            --pid-file="$run/dnsmasq-$which.pid" --dhcp-leasefile="$run/dnsmasq-$which.leases" \
            --log-facility="$run/dnsmasq-$which.log" >"$run/dnsmasq-$which.out" 2>&1 </dev/null &
        echo $! >"$WORK/$name/dnsmasq-$which.ownpid"
    done
    local i
    for i in $(seq 50); do
        if [ "$(ip netns exec "$ns" ss -Hlun 'sport = :67' | wc -l)" -ge 2 ] \
           && ip netns exec "$ns" ss -Hlun 'sport = :4011' | grep -q .; then
            return 0
        fi
        for which in site proxy; do
            kill -0 "$(cat "$WORK/$name/dnsmasq-$which.ownpid")" 2>/dev/null && continue
            log "bed $name: the $which dnsmasq exited:"
            cat "$run/dnsmasq-$which.out" "$run/dnsmasq-$which.log" 2>/dev/null | sed 's/^/    /' >&2
            return 1
        done
        sleep 0.2
    done
    log "bed $name: the two dnsmasq instances do not listen on ports 67 and 4011"
    ip netns exec "$ns" ss -lun >&2
    return 1
}

dnsmasq_pids() {
    local ns=$1 p
    for p in $(ip netns pids "$ns" 2>/dev/null); do
        [ "$(cat /proc/$p/comm 2>/dev/null)" = dnsmasq ] && echo "$p"
    done
}

# Stops serve.sh (SIGTERM), then whatever is left inside the namespace
# (all of it started by this test), then deletes the namespace.
bed_down() {
    local name=$1 ns=kse2e-$$-$1 dir=$WORK/$1 pid p
    # serve.sh, and the dnsmasq instances proxy_dhcp_up started
    for pid in $(cat "$dir/serve.pid" "$dir"/dnsmasq-*.ownpid 2>/dev/null); do
        kill -0 "$pid" 2>/dev/null || continue
        kill -TERM "$pid" 2>/dev/null
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    done
    if ip netns list | grep -qw "$ns"; then
        for p in $(ip netns pids "$ns" 2>/dev/null); do
            log "bed $name: process $p ($(cat /proc/$p/comm 2>/dev/null)) left behind in $ns, killing it"
            kill -KILL "$p" 2>/dev/null || true
        done
        ip netns del "$ns" 2>/dev/null || true
    fi
}

# Starts a deployment root with the shipped templates and the test fixtures
# (serve.sh creates known_hosts.json).
seed_root() {
    local root=$1
    cp -r "$E2E_REPO/templates" "$root/templates"
    # E2E_TEMPLATES=DIR tries changed templates without touching templates/
    [ -n "${E2E_TEMPLATES:-}" ] && cp -r "$E2E_TEMPLATES"/. "$root/templates/"
    mkdir -p "$root/images"
    cp -r "$E2E_HERE"/fixtures/images/* "$root/images/"
    # the stand-in installer, for the wipe and discover stages
    local d
    [ -e "$WORK/installer/pxeboot.kernel" ] || return 0
    for d in wipe discover; do
        ln -f "$WORK/installer/pxeboot.kernel" "$root/images/$d/pxeboot.kernel"
        ln -f "$WORK/installer/pxeboot.initrd" "$root/images/$d/pxeboot.initrd"
    done
}

# --- guests ------------------------------------------------------------------

# guest_start MACHINE LABEL FIRMWARE DISK SERIAL UUID NIC... -> prints the pid
#   FIRMWARE: bios | uefi | uefi-sb (OVMF with Secure Boot enforced) |
#   aarch64 (qemu-system-aarch64, AAVMF); NIC: <bridge>:<mac>.  Each NIC gets a tap device
#   in the bed's namespace (bed name in $BED). Serial console goes to
#   $WORK/logs/MACHINE-LABEL.serial. The guest never reboots (-no-reboot).
guest_start() {
    local machine=$1 label=$2 fw=$3 disk=$4 serial=$5 uuid=$6
    shift 6
    local ns=kse2e-$$-$BED log=$WORK/logs/$machine-$label.serial
    local qemu=qemu-system-x86_64
    local args=(-accel tcg -smp 1 -nographic -monitor none -no-reboot
                -name "kse2e-$machine-$label" -serial "file:$log"
                -smbios "type=1,serial=${serial//,/,,},uuid=$uuid")
    if [ "$fw" = uefi ] || [ "$fw" = uefi-sb ]; then
        # no PXE over IPv6: PXEv4 -> iPXE, then straight on to the disk.
        # OVMF_FW_CFG (space-separated -fw_cfg values, may be empty)
        # replaces this, e.g. to drop the PXEv4 option for HTTP boot.
        local fwcfg
        for fwcfg in ${OVMF_FW_CFG-name=opt/org.tianocore/IPv6PXESupport,string=no}; do
            args+=(-fw_cfg "$fwcfg")
        done
        local code=$OVMF_CODE vars=$OVMF_VARS machine_opt=q35
        if [ "$fw" = uefi-sb ]; then
            code=$OVMF_SB_CODE vars=$OVMF_SB_VARS machine_opt=q35,smm=on
            args+=(-global "driver=cfi.pflash01,property=secure,value=on")
        fi
        [ -e "$WORK/$machine.vars" ] || cp "$vars" "$WORK/$machine.vars"
        args+=(-machine "$machine_opt" -m 1536
               -drive "if=pflash,format=raw,unit=0,readonly=on,file=$code"
               -drive "if=pflash,format=raw,unit=1,file=$WORK/$machine.vars")
    elif [ "$fw" = aarch64 ]; then
        qemu="qemu-system-aarch64"
        [ -e "$WORK/$machine.vars" ] || cp "$AAVMF_VARS" "$WORK/$machine.vars"
        args+=(-machine virt -cpu cortex-a57 -m 1536
               -drive "if=pflash,format=raw,unit=0,readonly=on,file=$AAVMF_CODE"
               -drive "if=pflash,format=raw,unit=1,file=$WORK/$machine.vars")
    else
        args+=(-machine pc -m 1536)
    fi
    local i=0 nic br mac tap rom
    for nic in "$@"; do
        br=${nic%%:*} mac=${nic#*:}
        tap=t${machine}$i
        ip -n "$ns" link del "$tap" 2>/dev/null || true
        ip -n "$ns" tuntap add dev "$tap" mode tap
        ip -n "$ns" link set "$tap" master "$br" up
        # BIOS: QEMU's default NIC ROM, which is iPXE from Debian's
        # ipxe-qemu (an explicit romfile= path is not loaded by this QEMU).
        # UEFI: no NIC ROM, so OVMF's own PXE client loads snponly.efi over
        # TFTP from dnsmasq.
        rom=
        [ "$fw" = bios ] || rom=,romfile=
        args+=(-netdev "tap,id=n$i,ifname=$tap,script=no,downscript=no"
               -device "virtio-net-pci,netdev=n$i,mac=$mac$rom,bootindex=$((i + 1))")
        i=$((i + 1))
    done
    args+=(-drive "if=none,id=d0,format=raw,file=$disk"
           -device "virtio-blk-pci,drive=d0,bootindex=$((i + 1))")
    : >"$log"
    echo "$qemu ${args[*]}" >"$WORK/logs/$machine-$label.cmd"
    ip netns exec "$ns" "$qemu" "${args[@]}" \
        >"$WORK/logs/$machine-$label.qemu" 2>&1 </dev/null &
    echo $!
}

# guest_wait PID TIMEOUT LOG CMD...: polls CMD every second until it
# succeeds (0), the guest exits (1: CMD is tried once more first), TIMEOUT
# seconds pass (2) or the serial LOG shows a fatal error (3: an HTTP error
# in iPXE, a failed installer, a kernel panic).
E2E_FATAL='HTTP [45]xx|KIWI-E2E: FAILED|Kernel panic|kiwispray-firstboot: FAILED|Entering emergency mode'
guest_wait() {
    local pid=$1 end=$(($(date +%s) + $2)) log=$3
    shift 3
    while [ "$(date +%s)" -lt "$end" ]; do
        "$@" && return 0
        if ! kill -0 "$pid" 2>/dev/null; then
            "$@" && return 0
            return 1
        fi
        serial_has "$log" "$E2E_FATAL" && return 3
        sleep 1
    done
    return 2
}

guest_stop() {
    local pid=$1
    kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
}

# serial_has LOG ERE: the serial log, without CRs and colour codes, matches.
# (grep reads to the end: with -q it would quit at the first match, sed
# would die of SIGPIPE, and pipefail would turn the match into a failure.)
serial_has() {
    tr -d '\r' <"$1" | sed 's/\x1b\[[0-9;?]*[a-zA-Z]//g' | grep -aE -- "$2" >/dev/null
}

# --- database ------------------------------------------------------------------

# db_host ROOT MAC [FIELD]: the host holding MAC as JSON (or one field of it,
# dotted paths into metadata allowed). Empty output: no such host.
db_host() {
    python3 - "$@" <<'PY'
import json, sys
root, mac = sys.argv[1], sys.argv[2].upper()
field = sys.argv[3] if len(sys.argv) > 3 else None
try:
    hosts = json.load(open(root + "/known_hosts.json"))
except Exception:
    sys.exit(0)
for h in hosts:
    if mac in (h.get("macs") or "").upper().split():
        v = h
        if field:
            for k in field.split("."):
                v = v.get(k) if isinstance(v, dict) else None
        print(v if isinstance(v, str) else json.dumps(v, sort_keys=True))
        break
PY
}

# db_count ROOT MAC: how many hosts hold MAC.
db_count() {
    python3 - "$1" "$2" <<'PY'
import json, sys
hosts = json.load(open(sys.argv[1] + "/known_hosts.json"))
print(sum(1 for h in hosts if sys.argv[2].upper() in (h.get("macs") or "").upper().split()))
PY
}

# host_set ROOT ID STATE [METADATA_JSON [HOSTNAME]]: the operator's edit.
host_set() {
    local a=(--root "$1" set "$2" --state "$3")
    [ -n "${4:-}" ] && a+=(--meta "$4")
    [ -n "${5:-}" ] && a+=(--hostname "$5")
    "$E2E_REPO/target/release/kiwispray-hosts" "${a[@]}"
}

file_stamp() { stat -c '%i %Y.%y %s' "$1"; sha256sum <"$1"; }

# --- results ---------------------------------------------------------------------

# pass N DESC / fail N DESC REASON: records scenario N's outcome.
pass() { echo "PASS $2" >"$WORK/results/$1"; log "scenario $1 PASSED: $2"; }
fail() {
    # the first failure of a scenario wins
    [ -e "$WORK/results/$1" ] && grep -q '^FAIL' "$WORK/results/$1" && return 0
    printf 'FAIL %s: %s\n' "$2" "$3" >"$WORK/results/$1"
    log "scenario $1 FAILED: $2: $3"
}
