# QEMU's microvm machine on KVM boots the guest kernel with the hello image:
# guest-init runs the entrypoint, which prints a line and exits 3; the guest
# reboots and QEMU (-no-reboot) exits by itself.
. "$(dirname "$0")/lib.sh"

# The guest mounts its root read-write: boot a copy.
root=$WORK/hello.ext4
cp "$KILN_ASSETS/hello.ext4" "$root"
console=$WORK/console.txt
timeout 120 "$QEMU" -M microvm,x-option-roms=off,pit=off,pic=off,isa-serial=on,rtc=on,acpi=off \
    -enable-kvm -cpu host -m 256 -smp 1 -nodefaults -no-user-config -nographic -no-reboot \
    -serial stdio -kernel "$KILN_KERNEL" \
    -append "console=ttyS0 reboot=t panic=-1 root=/dev/vda rw" \
    -drive id=root,file="$root",format=raw,if=none \
    -device virtio-blk-device,drive=root > "$console" 2>&1
status=$?

expect_contains guest-init-ran "$console" "hello from kiln guest-init"
expect_contains entrypoint-status "$console" "entrypoint exited with status 3"
expect_eq qemu-exits-on-guest-reset 0 "$status"
