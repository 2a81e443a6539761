#!/bin/bash
# Builds KIWI's real network installer for the e2e test: the kiwi-dump
# dracut modules (55kiwi-dump, 59kiwi-dump-reboot, 59kiwi-lib) from the
# pinned kiwi sdist on PyPI, built into a dracut initrd in a Debian chroot
# made by mmdebstrap from this machine's apt sources, with the chroot's
# kernel. Built once and cached in $E2E_CACHE/kiwi-installer-<hash of the
# inputs>. The image's /.profile (which KIWI writes from the description)
# is appended to the initrd as a second cpio archive, so the two variants
# share one dracut run:
#   OUTDIR/pxeboot.kernel
#   OUTDIR/pxeboot.initrd            /.profile with kiwi_oemunattended='true'
#   OUTDIR/pxeboot.attended.initrd   /.profile without it (the installer asks)
# Usage: build-kiwi-installer.sh OUTDIR
set -euo pipefail
export LC_ALL=C
here=$(cd "$(dirname "$0")" && pwd)
out=${1:?usage: build-kiwi-installer.sh OUTDIR}
cache=${E2E_CACHE:-/var/cache/kiwispray-e2e}
KIWI_VERSION=11.1.6
KIWI_SDIST_SHA256=9898e3ba141d10ab9ad0e9881fbe096110dd54d758808a3f78de52d53abae5d7
# Debian's packages, as kiwi-dump needs them (isc-dhcp-client and procps: network-legacy)
PKGS=systemd,udev,iproute2,dmsetup,cryptsetup-bin,kexec-tools,curl,xz-utils
KERNEL=linux-image-cloud-amd64
PKGS+=,dialog,pv,gawk,fdisk,gdisk,kpartx,e2fsprogs,bc,isc-dhcp-client,procps,dracut,dracut-network
mkdir -p "$cache" "$out"

suite=$(. /etc/os-release && echo "$VERSION_CODENAME")
sources=()
for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
    [ -s "$f" ] && grep -qE '^[[:space:]]*(deb|Types:)' "$f" && sources+=("$f")
done
[ "${#sources[@]}" -gt 0 ] || { echo "no apt sources in /etc/apt" >&2; exit 1; }

key=$( { cat "$0"; echo "$KIWI_VERSION $suite $PKGS $KERNEL"; cat "${sources[@]}"; } | sha256sum | cut -c1-16)
dir=$cache/kiwi-installer-$key
if [ ! -e "$dir/.done" ]; then
    command -v mmdebstrap >/dev/null || { echo "mmdebstrap is missing (apt-get install mmdebstrap)" >&2; exit 1; }
    rm -rf "$dir" && mkdir -p "$dir"
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    sdist=$cache/kiwi-$KIWI_VERSION.tar.gz
    if [ ! -e "$sdist" ]; then
        (cd "$tmp" && python3 -m pip download -q --no-deps --no-binary :all: "kiwi==$KIWI_VERSION" >&2)
        mv "$tmp/kiwi-$KIWI_VERSION.tar.gz" "$sdist"
    fi
    echo "$KIWI_SDIST_SHA256  $sdist" | sha256sum -c --quiet >&2
    tar -xzf "$sdist" -C "$tmp" "kiwi-$KIWI_VERSION/dracut/modules.d"
    mkdir "$tmp/modules.d"
    for m in 55kiwi-dump 59kiwi-dump-reboot 59kiwi-lib; do
        cp -r "$tmp/kiwi-$KIWI_VERSION/dracut/modules.d/$m" "$tmp/modules.d/$m"
        rm -f "$tmp/modules.d/$m/Makefile"
    done
    # Without these, Debian's kernel postinst fails inside dracut (network
    # modules that need ifcfg or a network manager). The kernel is installed
    # last, once dracut-network is configured, and its postinst's initrd is
    # skipped: the installer's initrd is built explicitly below.
    conf='add_dracutmodules+=" network-legacy "\nomit_dracutmodules+=" ifcfg systemd-networkd network-manager connman "\n'
    log=$dir/build.log
    echo "building the kiwi-dump installer ($KIWI_VERSION, $suite) into $dir, log $log" >&2
    if ! mmdebstrap --variant=apt --include="$PKGS" \
        --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
        --dpkgopt='path-exclude=/usr/share/locale/*' \
        --essential-hook="mkdir -p \"\$1/etc/dracut.conf.d\" && printf '$conf' >\"\$1/etc/dracut.conf.d/90-kiwi-dump.conf\"" \
        --customize-hook="copy-in $tmp/modules.d/55kiwi-dump $tmp/modules.d/59kiwi-dump-reboot $tmp/modules.d/59kiwi-lib /usr/lib/dracut/modules.d" \
        --customize-hook='chmod -x "$1/etc/kernel/postinst.d/dracut" && chroot "$1" apt-get install -y -q --no-install-recommends '"$KERNEL"' && chmod +x "$1/etc/kernel/postinst.d/dracut"' \
        --customize-hook='kver=$(ls "$1/lib/modules" | sort -V | tail -n1) && chroot "$1" dracut --force --no-hostonly --add "kiwi-dump kiwi-dump-reboot network-legacy" --omit "plymouth multipath" /tmp/installer.initrd "$kver" && cp "$1/boot/vmlinuz-$kver" "$1/tmp/installer.kernel"' \
        --customize-hook="copy-out /tmp/installer.initrd /tmp/installer.kernel $dir" \
        "$suite" /dev/null "${sources[@]}" >"$log" 2>&1; then
        tail -n 40 "$log" >&2
        exit 1
    fi
    # The image's profile, as KIWI writes it into the pxeboot initrd.
    for v in unattended attended; do
        rm -rf "$tmp/p" && mkdir "$tmp/p"
        {
            echo "kiwi_iname='kiwispray-e2e'"
            [ $v = unattended ] && echo "kiwi_oemunattended='true'"
            echo "kiwi_oemsilentinstall='true'"
        } >"$tmp/p/.profile"
        (cd "$tmp/p" && echo ./.profile | cpio -o -H newc --quiet | gzip -1) >"$tmp/profile.cpio.gz"
        cat "$dir/installer.initrd" "$tmp/profile.cpio.gz" >"$dir/initrd.$v"
    done
    touch "$dir/.done"
fi
ln -f "$dir/installer.kernel" "$out/pxeboot.kernel" 2>/dev/null || cp "$dir/installer.kernel" "$out/pxeboot.kernel"
ln -f "$dir/initrd.unattended" "$out/pxeboot.initrd" 2>/dev/null || cp "$dir/initrd.unattended" "$out/pxeboot.initrd"
ln -f "$dir/initrd.attended" "$out/pxeboot.attended.initrd" 2>/dev/null || cp "$dir/initrd.attended" "$out/pxeboot.attended.initrd"
echo "kiwi-dump installer $KIWI_VERSION: $(du -h "$dir/initrd.unattended" | cut -f1) initrd ($dir)" >&2
