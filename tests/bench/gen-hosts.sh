#!/bin/sh
# Writes a realistic host database of N hosts to stdout, for the benchmarks
# and the reliability tests: one or two MACs per host (Supermicro OUIs),
# serials and UUIDs (2% placeholder serials, 1% all-zero UUIDs, as real
# fleets have), hostnames, nested metadata, and a state mix of 80%
# finished, 10% waiting (new) and 10% installing image1.
#
# Everything is a function of the host id, so a load generator can compute
# which MACs, serial and UUID belong to host i (see bootstrap.lua):
#   MAC 1:  0c:c4:7a:<i as 3 bytes>        MAC 2 (even i): ac:1f:6b:<i>
#   serial: CZ<i as 7 digits>K             UUID: see below
#   state:  image1 when i % 10 == 0, new when i % 10 == 5, else finished
#
# Usage: gen-hosts.sh N > known_hosts.json
set -eu
n=${1:?usage: gen-hosts.sh N}
exec awk -v n="$n" '
function mac(oui, i) {
    return sprintf("%s:%02X:%02X:%02X", oui, int(i / 65536) % 256, int(i / 256) % 256, i % 256)
}
BEGIN {
    printf "[\n"
    for (i = 1; i <= n; i++) {
        macs = mac("0C:C4:7A", i)
        if (i % 2 == 0) macs = macs " " mac("AC:1F:6B", i)
        serial = (i % 50 == 0) ? "To be filled by O.E.M." : sprintf("CZ%07dK", i)
        if (i % 97 == 0)
            uuid = "00000000-0000-0000-0000-000000000000"
        else
            uuid = sprintf("%04x%04x-%04x-4%03x-8%03x-%012d", (i * 40503) % 65536, (i * 9973) % 65536, i % 65536, i % 4096, (i * 7) % 4096, i)
        if (i % 10 == 0) state = "image1"
        else if (i % 10 == 5) state = "new"
        else state = "finished"
        hostname = (state == "new") ? "not-set" : sprintf("node%05d.rack%02d.example.net", i, int(i / 40) % 100)
        printf "    {\n"
        printf "        \"hostname\": \"%s\",\n", hostname
        printf "        \"id\": %d,\n", i
        printf "        \"macs\": \"%s\",\n", macs
        printf "        \"metadata\": {\n"
        printf "            \"net\": {\n"
        printf "                \"gateway\": \"10.%d.%d.1\",\n", int(i / 256) % 256, i % 256
        printf "                \"vlan\": %d\n", 100 + i % 20
        printf "            },\n"
        printf "            \"rack\": \"R%02d\",\n", int(i / 40) % 100
        printf "            \"role\": \"%s\"\n", (i % 7 == 0) ? "storage" : "compute"
        printf "        },\n"
        printf "        \"serial\": \"%s\",\n", serial
        printf "        \"state\": \"%s\",\n", state
        printf "        \"uuid\": \"%s\"\n", uuid
        printf "    }%s\n", (i < n) ? "," : ""
    }
    printf "]\n"
}'
