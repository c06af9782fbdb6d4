# Every thread of a running VMM is under a seccomp filter (mode 2).
. "$(dirname "$0")/lib.sh"

out=$WORK/out.txt
"$KILN" run --kernel "$KILN_KERNEL" --disk "$KILN_ASSETS/hello.ext4" --read-only --vcpus 2 \
    --cmdline kiln.entrypoint=/tests/sleep.sh < /dev/null > "$out" 2>&1 &
pid=$!
# Wait until guest-init runs the entrypoint: by then every thread has
# installed its filter.
for _ in $(seq 600); do
    grep -q "kiln" /proc/$pid/task/*/comm 2>/dev/null && [ "$(ls /proc/$pid/task | wc -l)" -ge 3 ] && break
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
wait $pid
expect_eq exit-status 0 "$?"
