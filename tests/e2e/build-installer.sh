#!/bin/bash
# Builds the e2e test installer: the kernel of Debian's cloud-amd64 flavour
# (downloaded once with `apt-get download` into $E2E_CACHE and reused) and an
# initrd made of busybox-static, curl, the virtio modules and installer/init.
# Usage: build-installer.sh OUTDIR   -> OUTDIR/pxeboot.kernel, OUTDIR/pxeboot.initrd
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:?usage: build-installer.sh OUTDIR}
cache=${E2E_CACHE:-/var/cache/kiwispray-e2e}
mkdir -p "$cache" "$out"

# 1. The kernel package, fetched once.
deb=$(ls "$cache"/linux-image-*-cloud-amd64_*.deb 2>/dev/null | sort -V | tail -n1 || true)
if [ -z "$deb" ]; then
    pkg=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-/ {print $2; exit}')
    if [ -z "$pkg" ]; then
        apt-get update -qq >/dev/null
        pkg=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-/ {print $2; exit}')
    fi
    [ -n "$pkg" ] || { echo "cannot resolve linux-image-cloud-amd64" >&2; exit 1; }
    (cd "$cache" && apt-get download "$pkg" >&2)
    deb=$(ls "$cache"/linux-image-*-cloud-amd64_*.deb | sort -V | tail -n1)
fi
kdir=$cache/$(basename "$deb" .deb)
if [ ! -e "$kdir/.done" ]; then
    rm -rf "$kdir"
    mkdir -p "$kdir"
    dpkg-deb -x "$deb" "$kdir"
    touch "$kdir/.done"
fi
vmlinuz=$(ls "$kdir"/boot/vmlinuz-*)
moddir=$(ls -d "$kdir"/lib/modules/*)

# 2. The virtio modules and what they depend on, in load order.
declare -A seen=()
order=()
add_mod() {
    local name=$1 f dep
    name=${name//-/_}
    [ -n "${seen[$name]:-}" ] && return
    seen[$name]=1
    f=$(find "$moddir/kernel" -name "$name.ko" -o -name "${name//_/-}.ko" | head -n1)
    [ -n "$f" ] || return 0   # built into the kernel
    # the "depends=" entry of the module's .modinfo section
    for dep in $(tr '\0' '\n' <"$f" | sed -n 's/^depends=//p' | head -n1 | tr ',' ' '); do
        add_mod "$dep"
    done
    order+=("$f")
}
for m in virtio_pci virtio_net virtio_blk; do add_mod "$m"; done

# 3. The initrd tree.
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage"/{bin,sbin,dev,proc,sys,tmp,run,etc,modules,usr/bin,usr/local/bin}
cp /bin/busybox "$stage/bin/busybox"
! ldd /bin/busybox >/dev/null 2>&1 \
    || { echo "/bin/busybox is not static (install busybox-static)" >&2; exit 1; }
mknod -m 600 "$stage/dev/console" c 5 1
mknod -m 666 "$stage/dev/null" c 1 3
for f in "${order[@]}"; do
    cp "$f" "$stage/modules/"
    basename "$f" .ko >>"$stage/modules/order"
done
# curl and its libraries, as KIWI's installer has them.
cp /usr/bin/curl "$stage/usr/local/bin/curl"
for lib in $(ldd /usr/bin/curl | awk '/=> \// {print $3} /^\t\/lib/ {print $1}'); do
    mkdir -p "$stage$(dirname "$lib")"
    cp -L "$lib" "$stage$lib"
done
install -m 755 "$here/installer/init" "$stage/init"
install -m 755 "$here/installer/udhcpc.script" "$stage/udhcpc.script"

cp "$vmlinuz" "$out/pxeboot.kernel"
(cd "$stage" && find . | cpio -o -H newc --quiet | gzip -1) >"$out/pxeboot.initrd"
echo "installer: $(basename "$vmlinuz"), modules: $(tr '\n' ' ' <"$stage/modules/order")" >&2
