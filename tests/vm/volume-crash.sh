# kill -9 of the VMM while the guest writes and syncs: the overlay opens
# again, the volume holds a filesystem whose only damage is what ext4's
# journal replays, and the instance boots again.
. "$(dirname "$0")/lib.sh"

"$KILN" run vm-test:1.0.0 --name crash --cmdline 'kiln.entrypoint="/tests/volume.sh churn"' \
    < /dev/null > "$WORK/churn.txt" 2>&1 &
vmm=$!
waited=0
while ! grep -q churning "$WORK/churn.txt" && [ "$waited" -lt 300 ]; do
    sleep 1; waited=$((waited + 1))
done
expect_contains guest-was-writing "$WORK/churn.txt" "churning"
sleep 3
kill -9 "$vmm"
wait "$vmm"
expect_eq vmm-was-killed 137 "$?"

"$KILN" image flatten crash "$WORK/killed.ext4" > "$WORK/flatten.txt" 2>&1
expect_eq overlay-opens-after-the-kill 0 "$?"
e2fsck -E journal_only -y "$WORK/killed.ext4" > "$WORK/replay.txt" 2>&1
check clean-after-journal-replay e2fsck -fn "$WORK/killed.ext4"

"$KILN" run --name crash --cmdline 'kiln.entrypoint="/tests/volume.sh read"' < /dev/null > "$WORK/again.txt" 2>&1
expect_eq boots-again 0 "$?"
"$KILN" image flatten crash "$WORK/again.ext4" > /dev/null 2>&1
check clean-after-booting-again e2fsck -fn "$WORK/again.ext4"
