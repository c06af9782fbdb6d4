# The entrypoint's exit status is kiln run's; VMM errors are 125.
. "$(dirname "$0")/lib.sh"

out=$WORK/out.txt
"$KILN" run --kernel "$KILN_KERNEL" --disk "$KILN_ASSETS/hello.ext4" --read-only \
    --cmdline kiln.entrypoint=/tests/exit7.sh < /dev/null > "$out" 2>&1
expect_eq exit-7 7 "$?"
expect_contains entrypoint-output "$out" "exiting with 7"

"$KILN" run --kernel "$KILN_KERNEL" --disk "$KILN_ASSETS/hello.ext4" --vcpus 99 < /dev/null > "$WORK/vcpus.txt" 2>&1
expect_eq too-many-vcpus-is-a-vmm-error 125 "$?"
expect_contains too-many-vcpus-message "$WORK/vcpus.txt" "vcpus 99: expected 1 to"

"$KILN" run --kernel "$KILN_KERNEL" --disk "$WORK/missing.img" < /dev/null > "$WORK/disk.txt" 2>&1
expect_eq missing-disk-is-a-vmm-error 125 "$?"
expect_contains missing-disk-named "$WORK/disk.txt" "missing.img"
