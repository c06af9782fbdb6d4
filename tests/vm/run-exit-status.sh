# The entrypoint's exit status is kiln run's; VMM errors are 125.
. "$(dirname "$0")/lib.sh"

out=$WORK/out.txt
"$KILN" run --kernel "$KILN_KERNEL" --disk "$KILN_ASSETS/hello.ext4" --read-only \
    --cmdline kiln.entrypoint=/tests/exit7.sh < /dev/null > "$out" 2>&1 &
run=$!
# The VM runs in a jailed VM process, a child of kiln run.
jail=$(vm_jail "$KILN_HOME/tmp/" "$run")
wait "$run"
expect_eq exit-7 7 "$?"
expect_contains entrypoint-output "$out" "exiting with 7"
expect_jailed vm-process-jailed "$jail"

# --no-jail runs the VM in kiln run's own process, with the same status.
"$KILN" --no-jail run --kernel "$KILN_KERNEL" --disk "$KILN_ASSETS/hello.ext4" --read-only \
    --cmdline kiln.entrypoint=/tests/exit7.sh < /dev/null > "$WORK/no-jail.txt" 2>&1
expect_eq no-jail-exit-7 7 "$?"
expect_contains no-jail-warns "$WORK/no-jail.txt" "WARNING: the jail is off"

# A stop sent to kiln run alone (as `timeout` sends it) reaches the VM
# process, which stops its guest (128 + SIGTERM: the guest reported no
# status); its jail and scratch files go with it.
"$KILN" run --kernel "$KILN_KERNEL" --disk "$KILN_ASSETS/hello.ext4" --read-only \
    --cmdline kiln.entrypoint=/tests/sleep.sh < /dev/null > "$WORK/stop.txt" 2>&1 &
run=$!
jail=$(vm_jail "$KILN_HOME/tmp/" "$run")
kill -TERM "$run"
wait "$run"
expect_eq stop-passed-on 143 "$?"
check stopped-vm-process-gone [ -z "$(vm_pid "$KILN_HOME/tmp/")" ]
check no-scratch-left [ -z "$(ls "$KILN_HOME/tmp")" ]

"$KILN" run --kernel "$KILN_KERNEL" --disk "$KILN_ASSETS/hello.ext4" --vcpus 99 < /dev/null > "$WORK/vcpus.txt" 2>&1
expect_eq too-many-vcpus-is-a-vmm-error 125 "$?"
expect_contains too-many-vcpus-message "$WORK/vcpus.txt" "vcpus 99: expected 1 to"

"$KILN" run --kernel "$KILN_KERNEL" --disk "$WORK/missing.img" < /dev/null > "$WORK/disk.txt" 2>&1
expect_eq missing-disk-is-a-vmm-error 125 "$?"
expect_contains missing-disk-named "$WORK/disk.txt" "missing.img"
