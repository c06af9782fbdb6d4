# An instance-store disk: attached empty at the size asked for, erased
# when the VM ends.
. "$(dirname "$0")/lib.sh"

"$KILN" run vm-test:1.0.0 --scratch 16 --cmdline 'kiln.entrypoint="/tests/volume.sh scratch"' \
    < /dev/null > "$WORK/out.txt" 2>&1
expect_eq exit-status 0 "$?"
expect_contains scratch-has-the-size "$WORK/out.txt" "scratch bytes: 16777216"
expect_contains scratch-starts-empty "$WORK/out.txt" "scratch nonzero: 0"
check scratch-is-erased-at-exit [ -z "$(ls "$KILN_HOME/tmp")" ]
