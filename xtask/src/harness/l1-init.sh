#!/bin/busybox sh
# /init of the L1 guest: a Linux with nested SVM under QEMU TCG, whose
# /dev/kvm is real hardware-style KVM. Runs the scenarios, then powers off.
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
# Pseudo-terminals, for scenarios that test `-t` through `xtask pty`.
mkdir -p /dev/pts && mount -t devpts -o ptmxmode=0666 devpts /dev/pts
[ -e /dev/ptmx ] || ln -s pts/ptmx /dev/ptmx
# Loopback, for scenarios that serve on 127.0.0.1 (kiln fn serve).
ip link set lo up
# KVM, then tun, the bridge and nf_tables for instances' NICs, then L1's
# own NIC, then veth and TC for pods' networks (the order of MODULES in
# initramfs.rs).
for module in irqbypass kvm kvm-amd tun llc stp bridge libcrc32c nfnetlink nf_tables virtio_ring virtio \
    virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci failover net_failover virtio_net \
    veth sch_ingress cls_u32 act_mirred; do
    insmod "/lib/modules/$module.ko" || echo "KILN-TEST harness/insmod-$module FAIL insmod failed"
done
if [ -c /dev/kvm ]; then
    echo "KILN-HARNESS /dev/kvm ready"
else
    echo "KILN-TEST harness/dev-kvm FAIL no /dev/kvm after loading kvm-amd"
fi
export PATH=/kiln/bin:/usr/bin:/bin:/usr/sbin:/sbin
export KILN=/kiln/bin/kiln KILN_KERNEL=/kiln/vmlinux KILN_INIT=/kiln/guest-init
export KILN_ASSETS=/kiln/assets KILN_IMAGES=/kiln/images QEMU=/usr/bin/qemu-system-x86_64 WORK_ROOT=/tmp/work
export XTASK=/kiln/bin/xtask KILN_WORKSPACE=/kiln/workspace
# L1's NIC on QEMU's user-mode network (its fixed guest address), through
# which the harness reaches a scenario's server and answers its host
# steps (tests/vm/lib.sh's host_step, xtask/src/harness/host_steps.rs).
# Its address and the forwarded ports are the harness's (host-link.env).
set -a; . /kiln/host-link.env; set +a
ip link set eth0 up && ip addr add "$KILN_HOST_ADDRESS/24" dev eth0 ||
    echo "KILN-TEST harness/l1-nic FAIL no eth0 for host steps"
sh -c "$(cat /kiln/job)"
echo KILN-DONE
sync
poweroff -f
