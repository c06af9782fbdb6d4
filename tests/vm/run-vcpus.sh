# --vcpus 2: the guest brings up two CPUs (found through the MP table).
. "$(dirname "$0")/lib.sh"

out=$WORK/out.txt
"$KILN" run --kernel "$KILN_KERNEL" --disk "$KILN_ASSETS/hello.ext4" --read-only --vcpus 2 \
    --cmdline kiln.entrypoint=/tests/cpus.sh < /dev/null > "$out" 2>&1
expect_eq exit-status 0 "$?"
expect_contains two-cpus-online "$out" "online=0-1 processors=2"
