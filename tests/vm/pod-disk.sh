# A pod's disks, the VMM and guest-init half (the containerd shim's pods
# use it; tests/vm/containerd.sh drives the whole): a container VM boots
# with two empty drives (the second read-only), `attachdisk` fills the
# first with a volume (the busybox image and an overlay, as the shim
# fills it with a container's root), the guest sees /dev/vdb grow, exec
# requests with root /dev/vdb run chrooted in it, sharing one mount; the
# read-only drive, filled with a raw image, is /dev/vdc, mounted read-only
# (kiln __pod-probe, test-only).
. "$(dirname "$0")/lib.sh"

image=$KILN_IMAGES/busybox/1.35.0
out=$WORK/probe.txt
"$KILN" __pod-probe --kernel "$KILN_KERNEL" --root "$KILN_ASSETS/hello.ext4" \
    --volume "$image/image.kiln" --dir "$WORK" > "$out" 2>&1
expect_eq probe-status 0 "$?"
expect_contains empty-drive-has-no-sectors "$out" '^empty: status=0 out="0"'
expect_contains attach-answers-ok "$out" '^attach: ok$'
expect_contains a-full-drive-is-refused "$out" '^attach-again: error "attachdisk: disk 1: the drive holds .*busybox/1.35.0/image.kiln: expected an empty drive"'
expect_contains an-index-past-the-disks-is-refused "$out" '^attach-past-the-disks: error "attachdisk: disk 5: the VM has 3 disk(s)'
expect_contains runs-chrooted-in-vdb "$out" '^in-root: status=0 out="ext4 /dev/vdb\\n/\\nproc"'
expect_contains later-requests-share-the-mount "$out" '^in-root-again: status=0 out="pod"'
expect_contains guest-sees-the-capacity "$out" "^guest-root: status=0 out=\"$(($(field "$image/manifest.json" raw_size) / 512))\\\\nvdb\\\\nno-marker\""
expect_contains a-terminal-of-the-roots-devpts "$out" '^terminal-in-root: status=0 out="/dev/pts/0"'
expect_contains a-missing-device-is-refused "$out" '^no-such-root: refused status=126 reason=".*root /dev/vdq: no such block device'
expect_contains a-pod-vm-is-not-snapshotted "$out" '^snapshot: error "snapshot: disk 1 is a drive slot'
expect_contains a-read-only-drive-is-filled "$out" '^attach-read-only: ok$'
expect_contains a-read-only-drive-is-mounted-read-only "$out" '^in-read-only-root: status=0 out="1\\ncannot-write"'
