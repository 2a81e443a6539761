#!/bin/bash
# Builds KIWI's real network installer for the e2e test: the kiwi-dump
# dracut modules (55kiwi-dump, 59kiwi-dump-reboot, 59kiwi-lib) from the
# pinned kiwi sdist on PyPI, built into a dracut initrd in a Debian chroot
# made by mmdebstrap from this machine's apt sources, with the chroot's
# kernel. Built once and cached in $E2E_CACHE/kiwi-installer-<hash of the
# inputs>. The image's /.profile (which KIWI writes from the description)
# is appended to the initrd as a second cpio archive on each call, so the
# two variants share one dracut run:
#   OUTDIR/pxeboot.kernel
#   OUTDIR/pxeboot.initrd            /.profile with kiwi_oemunattended='true'
#   OUTDIR/pxeboot.attended.initrd   /.profile without it (the installer asks)
# Usage: build-kiwi-installer.sh OUTDIR
set -euo pipefail
export LC_ALL=C
out=${1:?usage: build-kiwi-installer.sh OUTDIR}
cache=${E2E_CACHE:-/var/cache/kiwispray-e2e}
KIWI_VERSION=11.1.6
KIWI_SDIST_SHA256=9898e3ba141d10ab9ad0e9881fbe096110dd54d758808a3f78de52d53abae5d7
# Debian's packages, as kiwi-dump needs them (isc-dhcp-client and procps: network-legacy)
PKGS=systemd,systemd-sysv,udev,iproute2,dmsetup,cryptsetup-bin,kexec-tools,curl,xz-utils
KERNEL=linux-image-cloud-amd64
PKGS+=,dialog,pv,gawk,fdisk,gdisk,kpartx,e2fsprogs,bc,isc-dhcp-client,procps,dracut,dracut-network
mkdir -p "$cache" "$out"

suite=$(. /etc/os-release && echo "$VERSION_CODENAME")
sources=()
for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
    [ -s "$f" ] && grep -qE '^[[:space:]]*(deb|Types:)' "$f" && sources+=("$f")
done
[ "${#sources[@]}" -gt 0 ] || { echo "no apt sources in /etc/apt" >&2; exit 1; }

DRACUT_ARGS=(--force --no-hostonly --add "kiwi-dump kiwi-dump-reboot network-legacy"
             --omit "plymouth multipath" --install "reboot poweroff")
# bump RECIPE when the build steps below change
RECIPE=2
key=$( { echo "$RECIPE $KIWI_VERSION $KIWI_SDIST_SHA256 $suite $PKGS $KERNEL ${DRACUT_ARGS[*]}"; cat "${sources[@]}"; } \
       | sha256sum | cut -c1-16)
dir=$cache/kiwi-installer-$key
tmp='' p=''
trap 'rm -rf "$tmp" "$p"' EXIT
if [ ! -e "$dir/.done" ]; then
    command -v mmdebstrap >/dev/null || { echo "mmdebstrap is missing (apt-get install mmdebstrap)" >&2; exit 1; }
    rm -rf "$dir" && mkdir -p "$dir"
    tmp=$(mktemp -d)
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
    # the installer's error path calls reboot -f: dracut leaves it out
    # unless asked (--install)
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
        --customize-hook='kver=$(ls "$1/lib/modules" | sort -V | tail -n1) && chroot "$1" dracut '"${DRACUT_ARGS[*]@Q}"' /tmp/installer.initrd "$kver" && cp "$1/boot/vmlinuz-$kver" "$1/tmp/installer.kernel"' \
        --customize-hook="copy-out /tmp/installer.initrd /tmp/installer.kernel $dir" \
        "$suite" /dev/null "${sources[@]}" >"$log" 2>&1; then
        tail -n 40 "$log" >&2
        exit 1
    fi
    touch "$dir/.done"
fi

# The image's profile, as KIWI writes it into the pxeboot initrd of an oem
# build. kiwi_install_volid matters: kiwi-dump skips every disk whose name
# starts the list of devices with that label, and an empty one matches a
# blank disk (a q35 guest, without a CD-ROM drive, then has no disk at all).
p=$(mktemp -d)
for v in unattended attended; do
    {
        echo "kiwi_iname='kiwispray-e2e'"
        echo "kiwi_install_volid='INSTALL'"
        [ $v = unattended ] && echo "kiwi_oemunattended='true'"
        echo "kiwi_oemsilentinstall='true'"
    } >"$p/.profile"
    (cd "$p" && echo ./.profile | cpio -o -H newc --quiet | gzip -1) >"$p/profile.cpio.gz"
    cat "$dir/installer.initrd" "$p/profile.cpio.gz" >"$p/initrd.$v"
done
cp "$dir/installer.kernel" "$out/pxeboot.kernel"
mv "$p/initrd.unattended" "$out/pxeboot.initrd"
mv "$p/initrd.attended" "$out/pxeboot.attended.initrd"
echo "kiwi-dump installer $KIWI_VERSION: $(du -h "$out/pxeboot.initrd" | cut -f1) initrd ($dir)" >&2
