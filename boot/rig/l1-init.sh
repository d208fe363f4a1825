#!/bin/sh
# PID 1 of the real-host rig's L1 guest (installed as /sbin/rig-l1-init by build-l1.sh). See boot/rig/README.md.
#
# What the outer QEMU gives L1 (boot/src/rig.rs sets it up):
#   /dev/vda  L1's root (read-only)          /dev/ttyS0  L1's console: this script's log, read by the host
#   /dev/vdb  the L2 image (read-only)       /dev/ttyS1  L2's serial port, streamed live by the host
#   /dev/vdc  this run's L2 QEMU arguments,  /dev/ttyS2  L2's QMP monitor, when the run asks for one
#             one per line, newline-padded
#   isa-debug-exit at 0xf4: how L1 ends the outer QEMU
#
# The host reads the lines starting with "rig-l1: " on the console; these two are its protocol:
#   "rig-l1: fail: <reason>"   L1 could not start L2 (the run is an L1 failure, with that reason)
#   "rig-l1: l2-exit=<n>"      L2's QEMU exited with status n
export PATH=/usr/sbin:/usr/bin:/sbin:/bin

uptime_s() { cut -d' ' -f1 /proc/uptime; }
say() { echo "rig-l1: $* (at $(uptime_s)s)"; }

# Ends the outer QEMU through isa-debug-exit: its exit status becomes (value << 1) | 1.
outer_exit() {
    printf "$(printf '\\%03o' "$1")" | dd of=/dev/port bs=1 seek=244 count=1 2>/dev/null
    # Only reached if the port write did not stop the machine.
    echo o >/proc/sysrq-trigger
    sleep 30
}

fail() {
    echo "rig-l1: fail: $*"
    outer_exit 127
}

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -t tmpfs tmpfs /tmp

say "init started; cpu: $(grep -m1 '^flags' /proc/cpuinfo | tr ' ' '\n' | grep -x -E 'svm|npt|vgif|nrip_save' | tr '\n' ' ')"

# Nested paging on: without it L2 triple-faults on some outer QEMU versions.
modprobe kvm_amd npt=1 || fail "modprobe kvm_amd failed"
dmesg | grep -i -E 'kvm|svm' | sed 's/^/rig-l1: dmesg: /'
[ -c /dev/kvm ] || fail "no /dev/kvm after loading kvm_amd"
say "kvm ready"

# L2 may write to its disk; give it a private copy. OVMF needs a writable variable store.
cp /dev/vdb /tmp/l2.img || fail "cannot copy the L2 image from /dev/vdb"
cp /usr/share/OVMF/OVMF_VARS_4M.fd /tmp/l2-vars.fd || fail "cannot copy OVMF_VARS_4M.fd"

# The run's L2 arguments: one per line; blank lines (the padding) are skipped.
set --
while IFS= read -r arg; do
    [ -n "$arg" ] && set -- "$@" "$arg"
done </dev/vdc
[ $# -gt 0 ] || fail "no L2 arguments on /dev/vdc"
echo "rig-l1: L2 arguments: $*"

say "starting L2"
qemu-system-x86_64 "$@"
status=$?
say "L2 exited"
echo "rig-l1: l2-exit=$status"

# Make the outer QEMU's own status match L2's when L2 left through isa-debug-exit (an odd status);
# anything else maps to 255. The console line above is what the host trusts.
if [ $((status % 2)) -eq 1 ]; then
    outer_exit $(((status - 1) / 2))
else
    outer_exit 127
fi
