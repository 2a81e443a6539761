#!/bin/bash
# Builds the e2e test image as a KIWI oem PXE build would lay it out
# (current naming generation): a raw disk whose boot sector prints
# KIWISPRAY-E2E-LOCAL-DISK-BOOTED on COM1, compressed to <P>.xz, with
# <P>.sha256 ("<digest> <blocks> <blocksize>"), <P>.append,
# <P>.config.bootoptions, <P>.initrd and the installer as pxeboot.<P>.*.
# Usage: build-image.sh OUTDIR RAWFILE INSTALLER_DIR
#   OUTDIR gets the build, RAWFILE the uncompressed disk; prints <P>.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
usage="usage: build-image.sh OUTDIR RAWFILE INSTALLER_DIR"
out=${1:?$usage}
raw=${2:?$usage}
inst=${3:?$usage}
P=kiwispray-e2e.x86_64-1.0.0
blocksize=4096 blocks=512          # a 2 MiB disk
mkdir -p "$out"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

as --32 -o "$tmp/mbr.o" "$here/testimage/mbr.S"
ld -m elf_i386 -Ttext 0x7c00 --oformat binary -o "$tmp/mbr.bin" "$tmp/mbr.o"
[ "$(stat -c %s "$tmp/mbr.bin")" -le 440 ] || { echo "boot code too large" >&2; exit 1; }

# Random payload, so a byte-for-byte comparison means something.
head -c $((blocks * blocksize)) /dev/urandom >"$raw"
dd if="$tmp/mbr.bin" of="$raw" conv=notrunc status=none
printf '\x55\xaa' | dd of="$raw" bs=1 seek=510 conv=notrunc status=none
xz -T1 -3 -c "$raw" >"$out/$P.xz"
echo "$(sha256sum <"$raw" | cut -d' ' -f1) $blocks $blocksize" >"$out/$P.sha256"
echo "rd.kiwi.install.pxe rd.kiwi.install.image=http://example.com/image.xz console=ttyS0 loglevel=3 panic=-1" >"$out/$P.append"
echo "root=/dev/vda console=ttyS0" >"$out/$P.config.bootoptions"
echo "installed system initrd (unused by the test)" >"$out/$P.initrd"
cp "$inst/pxeboot.kernel" "$out/pxeboot.$P.kernel"
cp "$inst/pxeboot.initrd" "$out/pxeboot.$P.initrd"
ln -sf "pxeboot.$P.kernel" "$out/$P.kernel"
echo "$P"
