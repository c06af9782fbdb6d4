# Fault injection (issue 23): kill -9 at 20 seeded random points during
# `kiln snapshot create` of one instance, the victim taking turns: the
# kiln command, the VM process (which writes the snapshot) and the VMM
# process (its supervisor). After each kill: a snapshot directory that
# exists restores, no staging directory is left (a killed command's, by
# the next snapshot beside it), a failure says so in one line, and the
# next command works (ps; start, when the instance died; the next
# snapshot). Points: random delays within the measured duration.
. "$(dirname "$0")/lib.sh"

POINTS=20
snaps=$WORK/snaps
mkdir -p "$snaps"
fault_seed

fault_victim victim
echo "KILN-INFO $SCENARIO supervisor pid $(pid_of "$VMM"), VM process pid $(pid_of "$VM")"

start=$(now_ms)
"$KILN" snapshot create victim "$snaps/measured" > "$WORK/measured.txt" 2>&1
expect_eq measured-snapshot-exit-status 0 "$?"
FAULT_WINDOW=$(($(now_ms) - start))
echo "KILN-INFO $SCENARIO snapshot create takes ${FAULT_WINDOW} ms: $(cat "$WORK/measured.txt")"

injected=0 survived=0 lost=0 i=0 leftovers='^$'
while [ "$i" -lt "$POINTS" ]; do
    i=$((i + 1))
    POINT_LOST=0
    target=$(fault_target "$i")
    kill_during "$WORK/snap$i.txt" "$target" "$KILN" snapshot create victim "$snaps/s$i"
    injected=$((injected + LANDED))
    settled "$target"
    fault_said "snapshot-$i" "$WORK/snap$i.txt"
    [ "$STATUS" -ne 0 ] || [ -d "$snaps/s$i" ] || { POINT_LOST=1; fail "snapshot-$i-kept" "reported but missing"; }
    # A killed command's staging stays until a later snapshot stages
    # beside it (removing the earlier ones). A command killed before it
    # staged, or refused because the instance had died, removes none: the
    # killed commands' staging may stay until a snapshot succeeds.
    [ "$target" != cli ] || [ "$STATUS" -eq 0 ] || leftovers="$leftovers|^\.s$i\.partial-"
    [ "$STATUS" -ne 0 ] || leftovers='^$'
    holds "snapshot-$i-no-staging-left" sh -c "! ls -A '$snaps' | grep partial | grep -Eqv '$leftovers'"
    if [ -d "$snaps/s$i" ]; then
        holds "snapshot-$i-restores" "$KILN" snapshot restore "$snaps/s$i" --name "r$i" --network none
        "$KILN" terminate "r$i" > /dev/null 2>&1
    fi
    point_settled "snapshot-$i"
done
fault_tally snapshot-create "$injected" "$lost" "$survived"

check final-snapshot "$KILN" snapshot create victim "$snaps/final"
check no-staging-left-at-all sh -c "! ls -A '$snaps' | grep -q partial"
check final-restore "$KILN" snapshot restore "$snaps/final" --name final --network none
for name in victim final; do "$KILN" terminate "$name" > /dev/null 2>&1; done
