# shellcheck shell=bash
# Edge servers (issue 17), scenarios 40-42, sourced by run.sh. Topology, all
# in namespaces of this test:
#   central (kse2e-<pid>-edgec): nginx/serve.sh, trusted_proxies = the edges
#     eka 10.78.10.1 --veth-- up0 10.78.10.2  rack A (kse2e-<pid>-edgea)
#     ekb 10.78.20.1 --veth-- up0 10.78.20.2  rack B (kse2e-<pid>-edgeb)
#   each rack: br0 (10.78.11.1 / 10.78.21.1) with its own dnsmasq
#   (dnsmasq/kiwispray-rack.conf, adapted only in its EDIT lines) and its
#   edge (nginx/serve-edge.sh with the shipped kiwispray-edge.conf).
# The machines only ever reach their edge. Rack A boots two machines at once
# in one install slot: EA1 installs with KIWI's real installer (kiwi-dump,
# kexec, kiwispray-firstboot), EA2 with the busybox stand-in installer
# (tests/e2e/installer), which streams the same image file through the same
# edge and verifies its checksum, without the slow kexec and first boot of
# a second installed system under TCG. Rack B's EB1 installs with kiwi-dump.
# The central nginx writes a second access log in a format of its own
# (edge-bytes.log: peer, request, status, body bytes, Range) to count what
# each edge fetched.

SCENARIOS+=(40 41 42)
TITLE[40]="two racks behind edge servers: EA1 (kiwi-dump) and EA2 (stand-in) at once in rack A, EB1 (kiwi-dump) in rack B; each file crosses the uplink at most once per rack; events name machine and edge"
TITLE[41]="edge cache: a re-imported image (new bytes, same name) comes new through a warm edge, its checksum matches; 4 clients at once cause one upstream fetch of the new version"
TITLE[42]="central server down: the edge still serves cached images and bootstrap.ipxe, /bootstrap fails with 502 as today"
MACHINE[40]="EA1 EA2 EB1"
MACHINE[41]=none
MACHINE[42]=none
LANES+=(lane_edge)
LANE_SCEN[lane_edge]="40 41 42"
BEDS+=(edgec edgea edgeb)
SETUP+=(edge_setup)

EDGE_CENTRAL_A=10.78.10.1 EDGE_A=10.78.10.2 EDGE_NET_A=10.78.11
EDGE_CENTRAL_B=10.78.20.1 EDGE_B=10.78.20.2 EDGE_NET_B=10.78.21
EDGE_STANDIN=e2e-edge-standin

# edge_ns NAME: the namespace of bed NAME.
edge_ns() { echo "kse2e-$$-$1"; }

# edge_wait SECONDS CMD...: polls CMD every 0.3 s.
edge_wait() {
    local end=$(($(date +%s) + $1))
    shift
    while [ "$(date +%s)" -lt "$end" ]; do "$@" >/dev/null 2>&1 && return 0; sleep 0.3; done
    return 1
}

# edge_rack_up RACK CENTRAL_IP EDGE_IP NET: rack RACK (a or b): namespace,
# veth pair to the central namespace, br0, dnsmasq, the edge.
edge_rack_up() {
    local rack=$1 cip=$2 eip=$3 net=$4 name=edge$1
    local ns c dir=$WORK/edge$1
    ns=$(edge_ns "$name") c=$(edge_ns edgec)
    mkdir -p "$dir/run"
    echo "$ns" >>"$WORK/namespaces"
    ip netns add "$ns" || return 1
    ip -n "$ns" link set lo up
    ip -n "$c" link add "ek$rack" type veth peer name up0 netns "$ns" || return 1
    ip -n "$c" addr add "$cip/24" dev "ek$rack"
    ip -n "$c" link set "ek$rack" up
    ip -n "$ns" addr add "$eip/24" dev up0
    ip -n "$ns" link set up0 up
    ip -n "$ns" link add br0 type bridge forward_delay 0
    ip -n "$ns" addr add "$net.1/24" dev br0
    ip -n "$ns" link set br0 up
    ip netns exec "$ns" env UPSTREAM="http://$cip:$SERVER_PORT" PORT="$SERVER_PORT" \
        RUN_DIR="$dir/run" CACHE="$dir/cache" "$E2E_REPO/nginx/serve-edge.sh" \
        >"$dir/serve.log" 2>&1 </dev/null &
    echo $! >"$dir/serve.pid"
    sed -e "s#^interface=.*#interface=br0#" \
        -e "s#^dhcp-range=.*#dhcp-range=$net.100,$net.199,255.255.255.0,1h#" \
        -e "s#10\.20\.0\.1:5000#$net.1:$SERVER_PORT#g" \
        "$E2E_REPO/dnsmasq/kiwispray-rack.conf" >"$dir/run/dnsmasq.conf"
    ip netns exec "$ns" dnsmasq --keep-in-foreground --conf-file="$dir/run/dnsmasq.conf" \
        --pid-file="$dir/run/dnsmasq.pid" --dhcp-leasefile="$dir/run/dnsmasq.leases" \
        --log-facility="$dir/run/dnsmasq.log" >"$dir/run/dnsmasq.out" 2>&1 </dev/null &
    echo $! >"$dir/dnsmasq-rack.ownpid"
    if ! edge_wait 30 ip netns exec "$ns" curl -fsS -o /dev/null "http://$net.1:$SERVER_PORT/bootstrap.ipxe"; then
        log "rack $rack: the edge does not serve bootstrap.ipxe"
        cat "$dir/serve.log" "$dir/run/error.log" >&2 2>/dev/null
        return 1
    fi
    edge_wait 15 sh -c "ip netns exec $ns ss -Hlun 'sport = :67' | grep -q ." \
        || { log "rack $rack: dnsmasq does not listen"; cat "$dir/run/dnsmasq.out" >&2; return 1; }
    log "rack $rack up (namespace $ns, edge $net.1:$SERVER_PORT -> $cip:$SERVER_PORT)"
}

# The central stack with the image, the stand-in's state and the second
# access log, then the two racks.
edge_setup() {
    wanted 40 41 42 || return 0
    local c dir=$WORK/edgec
    c=$(edge_ns edgec)
    mkdir -p "$dir/root" "$dir/run" "$WORK/edge"
    echo "$c" >>"$WORK/namespaces"
    ip netns add "$c" || return 1
    ip -n "$c" link set lo up
    seed_root "$dir/root"
    printf '{"trusted_proxies": ["%s", "%s"]}\n' "$EDGE_A" "$EDGE_B" >"$dir/root/kiwispray.json"
    import_image "$dir/root" || return 1
    mkdir -p "$dir/root/images/$EDGE_STANDIN"
    cat >"$dir/root/images/$EDGE_STANDIN/host.tmpl" <<EOF
#!ipxe
# e2e fixture: the stand-in installer streams the image of state $IMAGE
# (the same URL, so the same cache entries on the edge) onto the disk and
# verifies its checksum; the shipped post_install.tmpl reports /finish.
imgfree
kernel @BASE_URL@/images/wipe/pxeboot.kernel initrd=pxeboot.initrd console=ttyS0 loglevel=3 panic=-1 BOOTIF=01-\${mac:hexhyp} rd.kiwi.install.image=@BASE_URL@/images/$IMAGE/$P.xz razorurl=@BASE_URL@/post-install?id=@id@&bootid=@bootid@
initrd @BASE_URL@/images/wipe/pxeboot.initrd
boot
EOF
    ip netns exec "$c" env PORT="$SERVER_PORT" ROOT="$dir/root" RUN_DIR="$dir/run" \
        "$E2E_REPO/nginx/serve.sh" >"$dir/serve.log" 2>&1 </dev/null &
    echo $! >"$dir/serve.pid"
    edge_wait 30 ip netns exec "$c" curl -fsS -o /dev/null "http://127.0.0.1:$SERVER_PORT/bootstrap.ipxe" \
        || { log "edge: the central stack did not come up"; cat "$dir/serve.log" >&2; return 1; }
    # the dedicated log: every request with its peer, body bytes and Range
    sed -i -e '1i log_format kiwispray_edge_bytes '"'"'$remote_addr "$request" $status $body_bytes_sent range="$http_range"'"'"';' \
        -e "s#^\(\s*access_log $dir/run/access.log;\)#\1\n    access_log $dir/run/edge-bytes.log kiwispray_edge_bytes;#" \
        "$dir/run/kiwispray.conf"
    kill -HUP "$(cat "$dir/run/nginx.pid")"
    edge_wait 15 test -e "$dir/run/edge-bytes.log" || { log "edge: central nginx did not reload"; return 1; }
    edge_rack_up a "$EDGE_CENTRAL_A" "$EDGE_A" "$EDGE_NET_A" || return 1
    edge_rack_up b "$EDGE_CENTRAL_B" "$EDGE_B" "$EDGE_NET_B" || return 1
    touch "$WORK/edge/ready"
}

# edge_upstream_check EDGE [SINCE]: for every /images/ file the edge fetched
# from the central server (edge-bytes.log lines after SINCE), the body bytes
# sent to it add up to at most the file's size; the image itself came in
# full. The edge's version probes (Range bytes=0-0, one byte or a 304 per
# download) are counted apart. Prints what it counted.
edge_upstream_check() {
    python3 - "$WORK/edgec/run/edge-bytes.log" "$WORK/edgec/root" "$1" "${2:-0}" "/images/$IMAGE/$P.xz" <<'PY'
import os, re, sys
log, root, edge, since, image = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
got, probes = {}, {}
for n, line in enumerate(open(log)):
    if n < since:
        continue
    m = re.match(r'(\S+) "(\w+) (\S+) [^"]*" (\d+) (\d+) range="([^"]*)"', line)
    if not m or m.group(1) != edge or not m.group(3).startswith("/images/"):
        continue
    path = m.group(3).split("?")[0]
    if m.group(6) == "bytes=0-0":
        probes[path] = probes.get(path, 0) + 1
        continue
    got[path] = got.get(path, 0) + int(m.group(5))
bad = []
for path, sent in sorted(got.items()):
    size = os.path.getsize(root + path)
    print(f"{edge} {path}: {sent} bytes upstream, file {size}; {probes.get(path, 0)} version probes")
    if sent > size:
        bad.append(f"{path}: {sent} > {size}")
if got.get(image, 0) != os.path.getsize(root + image):
    bad.append(f"{image}: {got.get(image, 0)} bytes upstream, not the whole file once")
if bad:
    print("fetched more than once or not at all: " + "; ".join(bad))
    sys.exit(1)
PY
}

# edge_events_ok ROOT ID NET EDGE LEASES: the host's install-boot and finish
# events name a machine address of NET (its own, not the edge's) and EDGE
# as via; the install boot's is one the rack's dnsmasq leased to the
# machine's MAC (LEASES: one a line; iPXE, the installer and the installed
# system may each get one).
edge_events_ok() {
    python3 - "$1/events.jsonl" "$2" "$3" "$4" "$5" <<'PY'
import json, sys
path, hid, net, edge = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
leases = sys.argv[5].split()
ev = [json.loads(l) for l in open(path) if l.strip()]
ev = [e for e in ev if e["host"] == hid]
boots = [e for e in ev if e["cause"] == "install-boot"]
fins = [e for e in ev if e["cause"] == "finish"]
if not boots or not fins:
    sys.exit(f"host {hid}: install-boot {len(boots)}, finish {len(fins)} events")
for e in boots + fins:
    if e.get("via") != edge or not e["remote"].startswith(net + "."):
        sys.exit(f"host {hid}: {e['cause']} event remote={e['remote']!r} via={e.get('via')!r}, want {net}.x via {edge}")
if boots[-1]["remote"] not in leases:
    sys.exit(f"host {hid}: install-boot from {boots[-1]['remote']}, its leases are {leases}")
print(f"host {hid}: install-boot from {boots[-1]['remote']} via {edge}, finish from {fins[-1]['remote']} via {edge}")
PY
}

# edge_only_edges: the central server saw no machine directly: every peer in
# its access log is an edge (or its own loopback).
edge_only_edges() {
    local peers
    peers=$(awk '{print $1}' "$WORK/edgec/run/access.log" | sort -u | grep -vxE "$EDGE_A|$EDGE_B|127\.0\.0\.1")
    [ -z "$peers" ] || { echo "central saw: $peers"; return 1; }
}

edge_slot_take() {
    EDGE_SLOT=
    while [ -z "$EDGE_SLOT" ]; do
        local i fd
        for i in $(seq "${E2E_INSTALL_JOBS:-1}"); do
            exec {fd}>"$WORK/install-slot.$i"
            flock -n "$fd" && { EDGE_SLOT=$fd; break; }
            exec {fd}>&-
        done
        [ -n "$EDGE_SLOT" ] || sleep 1
    done
}

lane_edge() {
    if [ ! -e "$WORK/edge/ready" ]; then
        for s in 40 41 42; do fail "$s" "set-up" "the edge beds did not come up (see edgec/edgea/edgeb logs)"; done
        return
    fi
    local root=$WORK/edgec/root
    local m1=52:54:00:e2:40:01 m2=52:54:00:e2:40:02 m3=52:54:00:e2:40:03
    local u1=40e2e2e2-0000-4000-8000-000000000401 u2=40e2e2e2-0000-4000-8000-000000000402
    local u3=40e2e2e2-0000-4000-8000-000000000403
    local d1=$WORK/EA1.disk d2=$WORK/EA2.disk d3=$WORK/EB1.disk id1 id2 id3
    local hosts=$E2E_REPO/target/release/kiwispray-hosts
    for d in "$d1" "$d2" "$d3"; do install_disk "$d"; done
    # registered ahead, in their image states (registration is scenario 1's)
    ck 40 "kiwispray-hosts add" "$hosts" --root "$root" add --mac "$m1" --serial KS-E2E-EA1 --uuid "$u1" \
        --hostname e2e-ea1 --state "$IMAGE" --meta '{"e2e": {"token": "tok-EA1"}}' || return
    ck 40 "kiwispray-hosts add" "$hosts" --root "$root" add --mac "$m2" --serial KS-E2E-EA2 --uuid "$u2" \
        --hostname e2e-ea2 --state "$EDGE_STANDIN" || return
    ck 40 "kiwispray-hosts add" "$hosts" --root "$root" add --mac "$m3" --serial KS-E2E-EB1 --uuid "$u3" \
        --hostname e2e-eb1 --state "$IMAGE" --meta '{"e2e": {"token": "tok-EB1"}}' || return
    id1=$(db_host "$root" "$m1" id) id2=$(db_host "$root" "$m2" id) id3=$(db_host "$root" "$m3" id)

    # rack A: both machines at once, in one install slot
    BED=edgea
    edge_slot_take
    (
        boot EA2 install bios "$d2" KS-E2E-EA2 "$u2" 600 powered_off @LOG@ -- "br0:$m2"
        echo "$BOOT_RESULT" >"$WORK/edge/EA2.result"
    ) &
    local other=$!
    boot EA1 install bios "$d1" KS-E2E-EA1 "$u1" "$INSTALL_TIMEOUT" booted @LOG@ kexec -- "br0:$m1"
    local r1=$BOOT_RESULT log1=$LOG
    wait "$other"
    exec {EDGE_SLOT}>&-
    BED=edgeb
    boot_install EB1 install bios "$d3" KS-E2E-EB1 "$u3" "$INSTALL_TIMEOUT" booted @LOG@ kexec -- "br0:$m3"
    local r3=$BOOT_RESULT log3=$LOG log2=$WORK/logs/EA2-install.serial

    BOOT_RESULT=$r1 ck 40 "EA1 (kiwi-dump, rack A) installed and booted" boot_ok
    BOOT_RESULT=$(cat "$WORK/edge/EA2.result") ck 40 "EA2 (stand-in, rack A) installed" boot_ok
    BOOT_RESULT=$r3 ck 40 "EB1 (kiwi-dump, rack B) installed and booted" boot_ok
    ck 40 "EA1: iPXE loaded the installer from its edge" \
        has "$log1" "http://${EDGE_NET_A//./\\.}\.1:$SERVER_PORT/images/$IMAGE/pxeboot\."
    ck 40 "EB1: iPXE loaded the installer from its edge" \
        has "$log3" "http://${EDGE_NET_B//./\\.}\.1:$SERVER_PORT/images/$IMAGE/pxeboot\."
    ck 40 "EA1: disk equals the image" disk_head_is "$d1" "$WORK/image.raw"
    ck 40 "EB1: disk equals the image" disk_head_is "$d3" "$WORK/image.raw"
    ck 40 "EA2: the stand-in fetched the image from the edge and verified it" \
        has "$log2" "KIWI-E2E: checksum verified"
    ck 40 "EA2: disk equals the image" disk_head_is "$d2" "$WORK/image.raw"
    ck 40 "EA1: post-install ran with its data" has "$log1" "E2E-POSTINSTALL: id=$id1 hostname=e2e-ea1 token=tok-EA1"
    ck 40 "EA1, EA2, EB1 finished" eq "$(db_host "$root" "$m1" state)/$(db_host "$root" "$m2" state)/$(db_host "$root" "$m3" state)" \
        finished/finished/finished
    ck 40 "rack A's machines fetched the image through edge A" eq \
        "$(grep -E "^${EDGE_NET_A//./\\.}\.[0-9]+ .*\"GET /images/$IMAGE/$P\.xz HTTP/1\.1\" 200 " "$WORK/edgea/run/access.log" | awk '{print $1}' | sort -u | wc -l)" 2
    ck 40 "rack B's machine fetched the image through edge B" \
        grep -qE "^${EDGE_NET_B//./\\.}\.[0-9]+ .*\"GET /images/$IMAGE/$P\.xz HTTP/1\.1\" 200 " "$WORK/edgeb/run/access.log"
    ck 40 "edge A: each file from the central server at most once, the image in full" edge_upstream_check "$EDGE_A"
    ck 40 "edge B: each file from the central server at most once, the image in full" edge_upstream_check "$EDGE_B"
    edge_upstream_check "$EDGE_A" | sed 's/^/    /' >&2
    edge_upstream_check "$EDGE_B" | sed 's/^/    /' >&2
    ck 40 "the central server saw no machine directly" edge_only_edges
    ck 40 "EA1's events: its address, via edge A" edge_events_ok "$root" "$id1" "$EDGE_NET_A" "$EDGE_A" \
        "$(lease_ip "$WORK/edgea/run/dnsmasq.leases" "$m1")"
    ck 40 "EA2's events: its address, via edge A" edge_events_ok "$root" "$id2" "$EDGE_NET_A" "$EDGE_A" \
        "$(lease_ip "$WORK/edgea/run/dnsmasq.leases" "$m2")"
    ck 40 "EB1's events: its address, via edge B" edge_events_ok "$root" "$id3" "$EDGE_NET_B" "$EDGE_B" \
        "$(lease_ip "$WORK/edgeb/run/dnsmasq.leases" "$m3")"
    ck 40 "the handler's log names machine and edge" \
        grep -qE "host $id3: finished .* \(from ${EDGE_NET_B//./\\.}\.[0-9]+ via edge ${EDGE_B//./\\.}\)" "$WORK/edgec/serve.log"
    ck 40 "kiwispray-hosts events shows the edge" \
        sh -c "'$hosts' --root '$root' history $id1 | grep -q 'via edge $EDGE_A'"
    done_scenario 40

    edge_cache_scenarios
}

# Scenarios 41 and 42, without a guest: curl in the rack namespaces.
edge_cache_scenarios() {
    local root=$WORK/edgec/root nsa nsb url_a url_b since old new digest blocks bs
    nsa=$(edge_ns edgea) nsb=$(edge_ns edgeb)
    url_a=http://$EDGE_NET_A.1:$SERVER_PORT/images/$IMAGE/$P.xz
    url_b=http://$EDGE_NET_B.1:$SERVER_PORT/images/$IMAGE/$P.xz
    # warm both edges (scenario 40 did, unless only these run)
    ip netns exec "$nsa" curl -fsS -o /dev/null "$url_a"
    ip netns exec "$nsb" curl -fsS -o /dev/null "$url_b"
    old=$(sha256sum <"$root/images/$IMAGE/$P.xz" | cut -d' ' -f1)
    ck 41 "warm edge A serves the image as imported" \
        eq "$(ip netns exec "$nsa" curl -fsS "$url_a" | sha256sum | cut -d' ' -f1)" "$old" || return

    # the same image compressed anew: other bytes, the same disk and checksum
    rm -rf "$WORK/edge/build2"
    mkdir -p "$WORK/edge/build2"
    cp -al "$WORK/build"/. "$WORK/edge/build2/"
    rm -f "$WORK/edge/build2/$P.xz"
    xz -dc "$WORK/build/$P.xz" | xz -1 -T2 -c >"$WORK/edge/build2/$P.xz"
    ck 41 "kiwispray-hosts import-image --force" "$E2E_REPO/target/release/kiwispray-hosts" --root "$root" \
        import-image --force "$IMAGE" "$WORK/edge/build2" || return
    new=$(sha256sum <"$root/images/$IMAGE/$P.xz" | cut -d' ' -f1)
    ck 41 "the re-imported image has new bytes" test "$new" != "$old" || return
    sleep 2
    since=$(grep -c . "$WORK/edgec/run/edge-bytes.log")
    ck 41 "warm edge A serves the new bytes" \
        eq "$(ip netns exec "$nsa" curl -fsS "$url_a" | sha256sum | cut -d' ' -f1)" "$new"
    read -r digest blocks bs <"$root/images/$IMAGE/$P.sha256"
    ck 41 "the image through edge A matches its checksum file" \
        eq "$(ip netns exec "$nsa" curl -fsS "$url_a" | xz -dc | head -c $((blocks * bs)) | sha256sum | cut -d' ' -f1)" "$digest"
    ck 41 "a range through edge A is the new file's" \
        eq "$(ip netns exec "$nsa" curl -fsS -r 20000000-20000099 "$url_a" | sha256sum)" \
           "$(tail -c +20000001 "$root/images/$IMAGE/$P.xz" | head -c 100 | sha256sum)"
    ck 41 "edge A fetched the new image once" edge_upstream_check "$EDGE_A" "$since"
    # four clients at once on edge B, which holds the old version: the new
    # one is a new cache entry, so proxy_cache_lock makes it one fetch
    local i pids=()
    for i in 1 2 3 4; do
        ip netns exec "$nsb" bash -o pipefail -c "curl -fsS '$url_b' | sha256sum || echo curl-failed" >"$WORK/edge/b$i.sum" &
        pids+=($!)
    done
    wait "${pids[@]}"
    ck 41 "four clients at once on edge B got the new bytes, whole" \
        eq "$(cut -d' ' -f1 "$WORK/edge/b"?.sum | sort -u | tr '\n' ' ')" "$new "
    ck 41 "edge B fetched the new image once for the four" edge_upstream_check "$EDGE_B" "$since"
    ck 41 "edge B's error log has no slice of a mixed version" lacks "$WORK/edgeb/run/error.log" "etag mismatch"
    edge_upstream_check "$EDGE_B" "$since" | sed 's/^/    /' >&2
    done_scenario 41

    # 42: the central stack stops; the edges keep what they cached
    bed_down_central() {
        local pid
        pid=$(cat "$WORK/edgec/serve.pid")
        kill -TERM "$pid" 2>/dev/null
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    }
    bed_down_central
    ck 42 "central server stopped" sh -c "! ip netns exec $nsa curl -s -m 2 -o /dev/null http://$EDGE_CENTRAL_A:$SERVER_PORT/"
    ck 42 "the cached image still flows from edge A" \
        eq "$(ip netns exec "$nsa" curl -fsS "$url_a" | sha256sum | cut -d' ' -f1)" "$new"
    ck 42 "bootstrap.ipxe still comes from edge A" \
        sh -c "ip netns exec $nsa curl -fsS http://$EDGE_NET_A.1:$SERVER_PORT/bootstrap.ipxe | head -n1 | grep -qx '#!ipxe'"
    ck 42 "/bootstrap: 502 with the one-line reason" \
        eq "$(ip netns exec "$nsa" curl -s -w ' %{http_code}' "http://$EDGE_NET_A.1:$SERVER_PORT/bootstrap?net0=52-54-00-e2-40-09")" \
           "kiwispray: the boot service does not answer
 502"
    done_scenario 42
}
