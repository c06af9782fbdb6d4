# A second virtio disk: what the guest writes there is in the file after
# the VM has ended.
. "$(dirname "$0")/lib.sh"

data=$WORK/data.img
dd if=/dev/zero of="$data" bs=1M count=4 2>/dev/null
out=$WORK/out.txt
"$KILN" run --kernel "$KILN_KERNEL" --disk "$KILN_ASSETS/hello.ext4,ro" --disk "$data" \
    --cmdline kiln.entrypoint=/tests/write-vdb.sh < /dev/null > "$out" 2>&1
expect_eq exit-status 0 "$?"
expect_contains guest-wrote "$out" "marker written"
expect_eq marker-on-the-host "kiln-marker-42" "$(head -c 14 "$data")"
