# kiln run boots the guest kernel with the hello image: guest-init runs the
# entrypoint (prints a line, exits 3) and kiln run exits with that status.
. "$(dirname "$0")/lib.sh"

out=$WORK/out.txt
"$KILN" run --kernel "$KILN_KERNEL" --disk "$KILN_ASSETS/hello.ext4" --read-only --timing < /dev/null > "$out" 2>&1
status=$?
expect_contains guest-init-ran "$out" "hello from kiln guest-init"
expect_eq exit-status-is-the-entrypoints 3 "$status"
expect_contains boot-timer-reported "$out" "boot-to-init: [0-9][0-9]* us"
