# Fault injection (issue 23): kill -9 at 20 seeded random points during
# `kiln stop --hibernate` of one instance, the victim taking turns: the
# kiln command, the VM process (which writes the hibernation) and the VMM
# process (its supervisor). After each kill: a failure says so in one
# line, `kiln ps` works, and `kiln start` brings the instance back
# counting (resumed from a whole hibernation, or booted when there is
# none), never from a half-written one. Points: random delays within the
# measured duration.
. "$(dirname "$0")/lib.sh"

POINTS=20
fault_seed

fault_victim victim
echo "KILN-INFO $SCENARIO supervisor pid $(pid_of "$VMM"), VM process pid $(pid_of "$VM")"

start=$(now_ms)
"$KILN" stop --hibernate victim > "$WORK/measured.txt" 2>&1
expect_eq measured-hibernate-exit-status 0 "$?"
FAULT_WINDOW=$(($(now_ms) - start))
echo "KILN-INFO $SCENARIO stop --hibernate takes ${FAULT_WINDOW} ms"
check resumes-from-measured-hibernation "$KILN" start victim

injected=0 survived=0 lost=0 i=0
while [ "$i" -lt "$POINTS" ]; do
    i=$((i + 1))
    POINT_LOST=0
    target=$(fault_target "$i")
    kill_during "$WORK/hib$i.txt" "$target" "$KILN" stop --hibernate victim
    injected=$((injected + LANDED))
    fault_said "hibernate-$i" "$WORK/hib$i.txt"
    [ "$POINT_LOST" -eq 0 ] || "$KILN" logs victim 2>&1 | grep -v '^\[' | tail -n 5 | sed 's/^/KILN-INFO console: /'
    settled "$target"
    point_settled "hibernate-$i"
done
fault_tally stop-hibernate "$injected" "$lost" "$survived"

"$KILN" terminate victim > /dev/null 2>&1
