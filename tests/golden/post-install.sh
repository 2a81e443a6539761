#!/bin/sh
# KIWIspray post-install script for host 1 (web-1), image image1.
# The installed system fetches it once from the razorurl= kernel argument
# and runs it; it applies the host's settings and reports /finish, after
# which the machine boots its local disk for good. A step that fails reports
# /fail with the reason instead: the host is then held, and the operator
# sees why (kiwispray-hosts show 1).
# Files are written below $KS_ROOT (default: /), so the script can also run
# from an installer against the mounted target system.
set -u

KS_ROOT=${KS_ROOT:-}
KS_URL=http://127.0.0.1:5000
KS_ID=1
KS_BOOTID=@BOOTID@

ks_fetch() {
    if command -v curl >/dev/null 2>&1; then
        curl -fsS --retry 3 "$1"
    else
        wget -q -O - "$1"
    fi
}

# Reports the failure of a step to /fail (the host is held) and stops.
ks_fail() {
    echo "KIWIspray: post-install of host $KS_ID failed: $1" >&2
    # Percent-encoded for the query: letters, digits and ._~- as they are,
    # space, / and : escaped, anything else replaced by _.
    ks_reason=$(printf '%s' "post-install: $1" | head -c 180 | tr -c 'A-Za-z0-9._~ /:-' '_' |
        sed 's/ /%20/g; s#/#%2F#g; s/:/%3A/g')
    ks_fetch "$KS_URL/fail?id=$KS_ID&bootid=$KS_BOOTID&reason=$ks_reason" >/dev/null || true
    exit 1
}

# All metadata, as JSON, for the image's own first-boot tooling.
mkdir -p "$KS_ROOT/etc/kiwispray" || ks_fail "cannot create /etc/kiwispray"
printf '%s\n' '{"role":"it'\''s & <web>","ssh_key":"ssh-ed25519 AAAA test@x"}' > "$KS_ROOT/etc/kiwispray/metadata.json" ||
    ks_fail "cannot write /etc/kiwispray/metadata.json"

# The hostname, unless the operator has not set one.
ks_hostname='web-1'
if [ "$ks_hostname" != "not-set" ] && [ -n "$ks_hostname" ]; then
    echo "$ks_hostname" > "$KS_ROOT/etc/hostname" || ks_fail "cannot write /etc/hostname"
    [ -z "$KS_ROOT" ] && { hostname "$ks_hostname" 2>/dev/null || true; }
fi

# An optional SSH key from the metadata (kiwispray-hosts set ID --meta-set ssh_key=...).
# A placeholder without a value stays as written, so the test compares the
# URL-encoded value (safe inside single quotes) with the placeholder's text;
# only then is the value inserted, as one shell word.
if [ 'ssh-ed25519%20AAAA%20test%40x' != '@metadata.ssh_key|''url@' ]; then
    ks_ssh_key='ssh-ed25519 AAAA test@x'
    mkdir -p "$KS_ROOT/root/.ssh" && chmod 700 "$KS_ROOT/root/.ssh" ||
        ks_fail "cannot create /root/.ssh"
    printf '%s\n' "$ks_ssh_key" >> "$KS_ROOT/root/.ssh/authorized_keys" ||
        ks_fail "cannot write /root/.ssh/authorized_keys"
fi

# Report the install as finished; retry for a while if the server is busy.
for ks_try in 1 2 3 4 5 6; do
    if ks_fetch "$KS_URL/finish?id=$KS_ID&bootid=$KS_BOOTID" >/dev/null; then
        echo "KIWIspray: host $KS_ID reported finished"
        exit 0
    fi
    sleep $((ks_try * 5))
done
echo "KIWIspray: could not report /finish for host $KS_ID" >&2
exit 1
