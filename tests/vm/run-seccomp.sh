# Every thread of a running VMM is under a seccomp filter (mode 2), and a
# forbidden call is reported: the SIGSYS handler's line names the thread
# kind and the call in the output (console log), the process ends with
# 159 (128 + SIGSYS), and `kiln ps` gives that as the stop reason.
. "$(dirname "$0")/lib.sh"

# filtered_threads PID: sets $threads to PID's thread count and $filtered
# to how many of them run under a seccomp filter (mode 2).
filtered_threads() {
    threads=0 filtered=0
    for status in /proc/"$1"/task/*/status; do
        threads=$((threads + 1))
        grep -q "^Seccomp:[[:space:]]*2" "$status" && filtered=$((filtered + 1))
    done
}

# probe_detached KIND NAME: launches instance NAME with the test hook on
# the first KIND thread and waits until `kiln ps` shows it stopped; its
# `kiln ps -a` is left in $WORK/NAME-ps.txt, its console in
# $WORK/NAME-console.txt.
probe_detached() {
    KILN_SECCOMP_PROBE=$1 "$KILN" run vm-test:1.0.0 --detach --name "$2" \
        --cmdline 'kiln.entrypoint=/tests/sleep.sh' > "$WORK/$2-launch.txt" 2>&1
    for _ in $(seq 300); do
        "$KILN" ps -a > "$WORK/$2-ps.txt" 2>&1
        grep -q "$2 .*stopped" "$WORK/$2-ps.txt" && break
        sleep 0.2
    done
    "$KILN" logs "$2" > "$WORK/$2-console.txt" 2>&1
}

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
filtered_threads "$pid"
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
probe_detached VMM probe
expect_contains ps-shows-the-violation "$WORK/probe-ps.txt" "probe .*stopped .*forbidden system call"
expect_contains console-log-names-the-call "$WORK/probe-console.txt" "$report"
check terminate "$KILN" terminate probe

# A detached instance's VMM process (`kiln __vmm`): every thread is
# filtered (the main thread, API, actions) but its launcher, which starts
# the VM processes (a filter would pass on to them); a stop goes through
# the API and actions threads and ends the main thread's wait.
id=$("$KILN" run vm-test:1.0.0 --detach --name sup \
    --cmdline 'kiln.entrypoint=/tests/sleep.sh' 2> "$WORK/sup-launch.err")
sleep 1
vmm=$(field "$KILN_HOME/instances/$id/instance.json" vmm_pid)
filtered_threads "$vmm"
expect_eq supervisor-main-thread-filtered 2 "$(status_field "$vmm" Seccomp)"
expect_eq supervisor-only-the-launcher-unfiltered "1 of $threads" "$((threads - filtered)) of $threads"
check supervisor-stop "$KILN" stop sup
"$KILN" ps -a > "$WORK/sup-ps.txt" 2>&1
expect_contains supervisor-stopped-on-request "$WORK/sup-ps.txt" "sup .*stopped .*on request"
check supervisor-terminate "$KILN" terminate sup

# The supervisor's main thread, probed: its report reaches the console log.
report="seccomp: supervisor thread made forbidden syscall 41 (socket)"
probe_detached supervisor sprobe
expect_contains supervisor-violation-reported "$WORK/sprobe-console.txt" "$report"
check supervisor-probe-terminate "$KILN" terminate sprobe
