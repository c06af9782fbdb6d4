# Every thread of a running VMM is under a seccomp filter (mode 2), and a
# forbidden call is reported: the SIGSYS handler's line names the thread
# kind and the call in the output (console log), the process ends with
# 159 (128 + SIGSYS), and `kiln ps` gives that as the stop reason.
. "$(dirname "$0")/lib.sh"

out=$WORK/out.txt
"$KILN" run --kernel "$KILN_KERNEL" --disk "$KILN_ASSETS/hello.ext4" --read-only --vcpus 2 \
    --cmdline kiln.entrypoint=/tests/sleep.sh < /dev/null > "$out" 2>&1 &
run=$!
# Wait until guest-init runs the entrypoint: by then every thread of the
# VM process (kiln run's jailed child) has installed its filter.
for _ in $(seq 600); do
    pid=$(vm_pid "$KILN_HOME/tmp/")
    [ -n "$pid" ] && [ "$(ls /proc/$pid/task | wc -l)" -ge 3 ] && break
    sleep 0.1
done
sleep 1
threads=0 filtered=0
for status in /proc/$pid/task/*/status; do
    threads=$((threads + 1))
    grep -q "^Seccomp:[[:space:]]*2" "$status" && filtered=$((filtered + 1))
done
expect_eq three-threads "3" "$threads"
expect_eq every-thread-filtered "$threads" "$filtered"
wait $run
expect_eq exit-status 0 "$?"

# The test hook (KILN_SECCOMP_PROBE) makes the VMM thread call socket(2)
# once its filter is on.
report="seccomp: VMM thread made forbidden syscall 41 (socket)"
KILN_SECCOMP_PROBE=VMM "$KILN" run --kernel "$KILN_KERNEL" --disk "$KILN_ASSETS/hello.ext4" \
    --read-only --cmdline kiln.entrypoint=/tests/sleep.sh < /dev/null > "$WORK/probe.txt" 2>&1
expect_eq violation-exit-status 159 "$?"
expect_contains violation-reported "$WORK/probe.txt" "$report"

# The same from a detached instance: its console log and its record.
KILN_SECCOMP_PROBE=VMM "$KILN" run vm-test:1.0.0 --detach --name probe \
    --cmdline 'kiln.entrypoint=/tests/sleep.sh' > "$WORK/launch.txt" 2>&1
for _ in $(seq 300); do
    "$KILN" ps -a > "$WORK/ps.txt" 2>&1
    grep -q "probe .*stopped" "$WORK/ps.txt" && break
    sleep 0.2
done
expect_contains ps-shows-the-violation "$WORK/ps.txt" "probe .*stopped .*forbidden system call"
"$KILN" logs probe > "$WORK/console.txt" 2>&1
expect_contains console-log-names-the-call "$WORK/console.txt" "$report"
check terminate "$KILN" terminate probe
