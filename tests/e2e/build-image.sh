#!/bin/bash
# Builds the e2e test image: a real minimal Debian system (systemd, the
# cloud kernel, GRUB for BIOS and UEFI, systemd-networkd with DHCP) with
# kiwispray-firstboot installed from the firstboot/ files and enabled, and
# the overlay in testimage/root (a unit printing
# KIWISPRAY-E2E-INSTALLED-SYSTEM-BOOTED on ttyS0). The root tree is made by
# mmdebstrap from this machine's apt sources; the disk is an MBR disk with
# an EFI system partition and an ext4 root, GRUB's BIOS boot code in the
# MBR and the gap after it. The EFI system partition boots under Secure
# Boot: EFI/BOOT/BOOTX64.EFI is Debian's shim (signed by Microsoft's UEFI
# CA), EFI/BOOT/grubx64.efi beside it Debian's signed monolithic GRUB,
# whose built-in config reads EFI/BOOT/grub.cfg ($cmdpath/grub.cfg; there
# is no /EFI/debian), which goes on to the root's /boot/grub/grub.cfg; it
# boots the image's kernel, which Debian signed too. Without Secure Boot
# the same chain runs unchecked. It is laid out as a current
# KIWI oem PXE build (<P>.xz, <P>.sha256 "<digest> <blocks> <blocksize>",
# <P>.append, <P>.config.bootoptions, <P>.kernel, <P>.initrd) with the
# installer as pxeboot.<P>.kernel and pxeboot.<P>.initrd. Built once and
# cached in $E2E_CACHE/image-<hash of the inputs>. KIWI itself is not used:
# see tests/e2e/README.md for why.
# Usage: build-image.sh OUTDIR RAWFILE INSTALLER_DIR
#   OUTDIR gets the build, RAWFILE the uncompressed disk; prints <P>.
set -euo pipefail
export LC_ALL=C
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
usage="usage: build-image.sh OUTDIR RAWFILE INSTALLER_DIR"
out=${1:?$usage}
raw=${2:?$usage}
inst=${3:?$usage}
cache=${E2E_CACHE:-/var/cache/kiwispray-e2e}
P=kiwispray-e2e.x86_64-1.0.0
blocksize=4096
esp_mib=16
PKGS=systemd,systemd-sysv,udev,e2fsprogs,linux-image-cloud-amd64,initramfs-tools,grub-pc-bin,grub-efi-amd64-bin,curl
# the signed UEFI chain for the EFI system partition
PKGS+=,shim-signed,grub-efi-amd64-signed
mkdir -p "$cache" "$out"

suite=$(. /etc/os-release && echo "$VERSION_CODENAME")
sources=()
for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
    [ -s "$f" ] && grep -qE '^[[:space:]]*(deb|Types:)' "$f" && sources+=("$f")
done
[ "${#sources[@]}" -gt 0 ] || { echo "no apt sources in /etc/apt" >&2; exit 1; }

# bump RECIPE when the build steps below change (the kernel command lines
# are written on each call, outside the cache)
RECIPE=2
key=$( { echo "$RECIPE $suite $PKGS"; cat "${sources[@]}";
         (cd "$repo" && find firstboot tests/e2e/testimage/root -type f | sort | xargs sha256sum); } \
       | sha256sum | cut -c1-16)
dir=$cache/image-$key

build() {
    command -v mmdebstrap >/dev/null || { echo "mmdebstrap is missing" >&2; return 1; }
    local uuid root log
    tmp=$(mktemp -d /var/tmp/kiwispray-e2e-image.XXXXXX)
    mkdir "$tmp/out"
    uuid=$(python3 -c 'import uuid; print(uuid.uuid4())')
    root=$tmp/root
    log=$dir/build.log
    echo "building the test image ($suite) into $dir, log $log" >&2
    # the first boot's system tree, as a KIWI config.sh would finish it
    cat >"$tmp/customize.sh" <<EOF
#!/bin/sh
set -e
r=\$1
cp -a "$here/testimage/root/." "\$r/"
install -D -m 755 "$repo/firstboot/kiwispray-firstboot" "\$r/usr/libexec/kiwispray-firstboot"
install -D -m 644 "$repo/firstboot/kiwispray-firstboot.service" "\$r/usr/lib/systemd/system/kiwispray-firstboot.service"
chroot "\$r" systemctl enable systemd-networkd.service kiwispray-firstboot.service kiwispray-e2e-marker.service
# no dbus: this would start gettys on tty2-6 after a 10 s wait
ln -sf /dev/null "\$r/etc/systemd/system/getty-static.service"
echo "UUID=$uuid / ext4 defaults,errors=remount-ro 0 1" >"\$r/etc/fstab"
echo kiwispray-e2e >"\$r/etc/hostname"
: >"\$r/etc/machine-id"
kver=\$(ls "\$r/lib/modules" | sort -V | tail -n1)
echo "\$kver" >"$tmp/out/kver"
# GRUB for BIOS: a core image that finds the root by its UUID
mkdir -p "\$r/boot/grub"
printf 'search --no-floppy --fs-uuid --set=root %s\nset prefix=(\$root)/boot/grub\n' "$uuid" >"\$r/var/tmp/early.cfg"
cat >"\$r/boot/grub/grub.cfg" <<CFG
serial --unit=0 --speed=115200
terminal_input serial console
terminal_output serial console
set timeout=0
echo "KIWISPRAY-E2E: GRUB of the installed system"
linux /boot/vmlinuz-\$kver root=UUID=$uuid ro console=tty0 console=ttyS0,115200 ks.from=disk
initrd /boot/initrd.img-\$kver
boot
CFG
mods="part_msdos ext2 fat search search_fs_uuid normal linux echo serial terminal configfile test"
chroot "\$r" grub-mkimage -O i386-pc -o /var/tmp/core.img -c /var/tmp/early.cfg -p /boot/grub biosdisk \$mods
mv "\$r/var/tmp/core.img" "$tmp/out/"
# UEFI: the signed chain, shim -> GRUB -> the root's grub.cfg (the same as
# the early config above, which the signed GRUB cannot take built in)
cp "\$r/usr/lib/shim/shimx64.efi.signed" "$tmp/out/BOOTX64.EFI"
cp "\$r/usr/lib/grub/x86_64-efi-signed/grubx64.efi.signed" "$tmp/out/grubx64.efi"
{ cat "\$r/var/tmp/early.cfg"; echo 'configfile \$prefix/grub.cfg'; } >"$tmp/out/esp-grub.cfg"
rm "\$r/var/tmp/early.cfg"
cp "\$r/usr/lib/grub/i386-pc/boot.img" "$tmp/out/boot.img"
EOF
    chmod +x "$tmp/customize.sh"
    mkdir "$root"
    if ! mmdebstrap --variant=apt --include="$PKGS" \
        --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
        --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-exclude=/usr/share/info/*' \
        --customize-hook="$tmp/customize.sh" \
        "$suite" "$root" "${sources[@]}" >"$log" 2>&1; then
        tail -n 40 "$log" >&2
        return 1
    fi
    local kver
    kver=$(cat "$tmp/out/kver")
    mv "$tmp/out/"* "$tmp/"
    cp "$root/boot/vmlinuz-$kver" "$dir/$P.kernel"
    cp "$root/boot/initrd.img-$kver" "$dir/$P.initrd"
    rm -rf "$root/var/cache/apt/"*.bin "$root/var/lib/apt/lists/"* "$root/var/log/"*.log

    # the root file system, with a tenth of its size and 32 MiB free
    local used mib
    used=$(du -sm "$root" | cut -f1)
    mib=$((used * 11 / 10 + 32))
    mkfs.ext4 -q -F -L ROOT -U "$uuid" -E root_owner=0:0 -d "$root" "$tmp/root.ext4" "${mib}M"
    # the EFI system partition
    mkfs.vfat -n EFI -C "$tmp/esp.vfat" $((esp_mib * 1024)) >/dev/null
    mmd -i "$tmp/esp.vfat" ::/EFI ::/EFI/BOOT
    mcopy -i "$tmp/esp.vfat" "$tmp/BOOTX64.EFI" ::/EFI/BOOT/BOOTX64.EFI
    mcopy -i "$tmp/esp.vfat" "$tmp/grubx64.efi" ::/EFI/BOOT/grubx64.efi
    mcopy -i "$tmp/esp.vfat" "$tmp/esp-grub.cfg" ::/EFI/BOOT/grub.cfg
    # the disk: 1 MiB for the MBR and GRUB's core, the ESP, the root
    local disk=$tmp/disk.raw total
    total=$((1 + esp_mib + mib))
    truncate -s "${total}M" "$disk"
    printf 'label: dos\nstart=1MiB, size=%sMiB, type=ef\nstart=%sMiB, type=83, bootable\n' \
        "$esp_mib" "$((1 + esp_mib))" | sfdisk -q "$disk"
    dd if="$tmp/esp.vfat" of="$disk" bs=1M seek=1 conv=notrunc status=none
    dd if="$tmp/root.ext4" of="$disk" bs=1M seek=$((1 + esp_mib)) conv=notrunc status=none
    # GRUB's BIOS boot code: boot.img in the MBR (before the partition
    # table), core.img from sector 1; boot.img's kernel sector (0x5c) is 1
    # already, diskboot.img's block list (0x1f4) gets the rest of core.img.
    local core_sectors
    core_sectors=$(( ($(stat -c %s "$tmp/core.img") + 511) / 512 ))
    [ "$core_sectors" -lt 2047 ] || { echo "GRUB core.img too large" >&2; return 1; }
    dd if="$tmp/boot.img" of="$disk" bs=440 count=1 conv=notrunc status=none
    dd if="$tmp/core.img" of="$disk" bs=512 seek=1 conv=notrunc status=none
    python3 - "$disk" "$core_sectors" <<'PY'
import struct, sys
disk, n = sys.argv[1], int(sys.argv[2])
with open(disk, "r+b") as f:
    f.seek(512 + 0x1f4)
    f.write(struct.pack("<QHH", 2, n - 1, 0x820))
    f.seek(0x5c)
    f.write(struct.pack("<Q", 1))
PY
    local bytes blocks
    bytes=$(stat -c %s "$disk")
    blocks=$((bytes / blocksize))
    xz -T0 -3 -c "$disk" >"$dir/$P.xz"
    echo "$(sha256sum <"$disk" | cut -d' ' -f1) $blocks $blocksize" >"$dir/$P.sha256"
    mv "$disk" "$dir/disk.raw"
    echo "$uuid" >"$dir/root-uuid"
    echo "$((1 + esp_mib))" >"$dir/root-offset-mib"
}

tmp=
if [ ! -e "$dir/.done" ]; then
    rm -rf "$dir" && mkdir -p "$dir"
    # shellcheck disable=SC2064
    trap 'rm -rf "$tmp"; [ -e "$dir/.done" ] || rm -rf "$dir"' EXIT
    build >&2
    touch "$dir/.done"
fi
# The build's kernelcmdline (the installer's arguments, passed on to the
# installed system's first boot by rd.kiwi.install.pass.bootparam) and the
# installed system's boot options. For TCG on busy cores: no_timer_check
# (else the kernel may panic "IO-APIC + timer doesn't work!" when the
# host is slow), init_on_alloc=0 (clearing every page on allocation is what
# makes the kexec'd first boot crawl under TCG).
echo "rd.kiwi.install.pxe rd.kiwi.install.image=http://example.com/image.xz console=ttyS0 loglevel=3 panic=-1 no_timer_check init_on_alloc=0" >"$out/$P.append"
echo "root=UUID=$(cat "$dir/root-uuid") ro console=ttyS0,115200" >"$out/$P.config.bootoptions"
for f in "$P.xz" "$P.sha256" "$P.initrd"; do
    ln -f "$dir/$f" "$out/$f" 2>/dev/null || cp "$dir/$f" "$out/$f"
done
ln -f "$dir/disk.raw" "$raw" 2>/dev/null || cp "$dir/disk.raw" "$raw"
cp "$dir/root-offset-mib" "$raw.root-offset-mib"
# As in a KIWI build, the installer boots the image's own kernel (<P>.kernel
# is made a symlink to it by import-image): both come from the same apt
# sources, so they are the same kernel, unless one cache is older.
if ! cmp -s "$inst/pxeboot.kernel" "$dir/$P.kernel"; then
    echo "the installer's kernel differs from the image's: remove $cache to rebuild both" >&2
    exit 1
fi
cp "$inst/pxeboot.kernel" "$out/pxeboot.$P.kernel"
cp "$inst/pxeboot.initrd" "$out/pxeboot.$P.initrd"
echo "test image: $(du -h "$dir/disk.raw" | cut -f1) disk, $(du -h "$dir/$P.xz" | cut -f1) xz ($dir)" >&2
echo "$P"
