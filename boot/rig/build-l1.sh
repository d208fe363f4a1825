#!/bin/sh
# Builds the L1 guest of the real-host rig: a Debian userspace with a kernel that has kvm_amd, QEMU (whose
# vmbus-bridge and hv-balloon devices are the VMBus host under test) and OVMF. See boot/rig/README.md.
#
# usage: build-l1.sh OUT_DIR SUITE MIRROR INIT_SCRIPT
#   OUT_DIR      created (must not exist); receives vmlinuz, initrd.img and root.img
#   SUITE        Debian suite for L1 (its QEMU must have vmbus-bridge and hv-balloon, so QEMU >= 8.2)
#   MIRROR       Debian mirror URL to debootstrap from (the host's own apt mirror)
#   INIT_SCRIPT  L1's PID 1 (boot/rig/l1-init.sh), installed as /sbin/rig-l1-init
# Needs root, debootstrap and mkfs.ext4 (with -d). boot/src/rig.rs runs this; it can also be run by hand.
set -eu

out=${1:?OUT_DIR}
suite=${2:?SUITE}
mirror=${3:?MIRROR}
init_script=${4:?INIT_SCRIPT}

if [ -e "$out" ]; then
    echo "build-l1: $out already exists" >&2
    exit 2
fi
mkdir -p "$out"
rootfs=$out/rootfs

say() { echo "build-l1: $*"; }

say "debootstrap $suite (minbase + kernel, QEMU, OVMF, kmod)"
debootstrap --variant=minbase --include=linux-image-amd64,qemu-system-x86,ovmf,kmod \
    "$suite" "$rootfs" "$mirror"

install -m 0755 "$init_script" "$rootfs/sbin/rig-l1-init"

# The root disk is virtio-blk with ext4: an initramfs with just those modules boots in a fraction of the time the
# default "most" initramfs takes under TCG.
say "slim initramfs"
sed -i 's/^MODULES=.*/MODULES=list/' "$rootfs/etc/initramfs-tools/initramfs.conf"
printf '%s\n' virtio_pci virtio_blk ext4 >>"$rootfs/etc/initramfs-tools/modules"
chroot "$rootfs" update-initramfs -u -k all

# Exactly one kernel is installed; copy it and its initramfs out of the tree.
set -- "$rootfs"/boot/vmlinuz-*
[ $# -eq 1 ] && [ -f "$1" ] || { echo "build-l1: expected one kernel in $rootfs/boot, found: $*" >&2; exit 1; }
cp "$1" "$out/vmlinuz"
set -- "$rootfs"/boot/initrd.img-*
[ $# -eq 1 ] && [ -f "$1" ] || { echo "build-l1: expected one initramfs in $rootfs/boot, found: $*" >&2; exit 1; }
cp "$1" "$out/initrd.img"

# Packages are not needed at run time; leave them out of the image.
rm -f "$rootfs"/var/cache/apt/archives/*.deb
rm -rf "$rootfs"/var/lib/apt/lists/*

say "root image"
mkfs.ext4 -q -F -L rig-l1-root -d "$rootfs" "$out/root.img" 1G
rm -rf "$rootfs"
say "done: $(du -sh "$out" | cut -f1) in $out"
