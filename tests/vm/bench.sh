# kiln bench: every scenario (cold boot, snapshot restore, function clone)
# and QEMU microvm as the cold peer, 3 timed runs each → exits 0 and prints
# the table with the ratio → the JSON report parses as the schema (unknown
# fields refused) and holds every scenario with sound numbers (xtask
# bench-check: 3 positive samples per series, percentiles and throughput
# computed from them, the ratio p50 over p50) → the SVG plot has a line per
# series → two restores at a time work too (the report checked by kiln
# bench itself) → nothing is left behind: no instance, no function, no
# scratch dir.
. "$(dirname "$0")/lib.sh"

json=$WORK/bench.json
svg=$WORK/bench.svg
"$KILN" bench all --runs 3 --peer qemu --json "$json" --plot "$svg" \
    > "$WORK/bench.txt" 2> "$WORK/bench.err"
status=$?
expect_eq exit-status 0 "$status"
[ "$status" -eq 0 ] || tail -c 2000 "$WORK/bench.err"
while read -r line; do echo "KILN-INFO $line"; done < "$WORK/bench.txt"

expect_contains table-has-every-series "$WORK/bench.txt" "^| clone | kiln | "
expect_contains table-has-the-peer "$WORK/bench.txt" "^| cold | qemu | "
expect_contains table-has-the-ratio "$WORK/bench.txt" "^cold: kiln / qemu p50 = "
"$XTASK" bench-check --peer "$json" > "$WORK/check.txt" 2>&1
expect_eq report-is-sound 0 "$?"
cat "$WORK/check.txt"
for scenario in cold restore clone; do
    expect_contains "json-has-$scenario" "$json" "\"scenario\": \"$scenario\""
done
expect_contains json-has-the-qemu-series "$json" '"vmm": "qemu"'
expect_contains json-says-the-timer-stops "$json" '"timer_stops": "its `boot-to-init:` line'

expect_contains svg-is-svg "$svg" "<svg"
for series in "cold (kiln)" "cold (qemu)" "restore (kiln)" "clone (kiln)"; do
    name=$(echo "$series" | tr -d '()' | tr ' ' '-')
    expect_contains "svg-has-$name" "$svg" "$series"
done

# Two at a time: each restore finds its own instance among the new ones.
"$KILN" bench restore --runs 2 --concurrency 2 --json "$WORK/two.json" \
    > "$WORK/two.txt" 2> "$WORK/two.err"
status=$?
expect_eq concurrent-exit-status 0 "$status"
[ "$status" -eq 0 ] || tail -c 2000 "$WORK/two.err"
expect_contains concurrent-report-says-2-at-a-time "$WORK/two.json" '"concurrency": 2'
expect_contains concurrent-restores-timed "$WORK/two.txt" "^| restore | kiln | "

"$KILN" ps -a > "$WORK/ps.txt" 2>&1
expect_eq no-instance-left 1 "$(wc -l < "$WORK/ps.txt")"
"$KILN" fn ls > "$WORK/fn.txt" 2>&1
expect_eq no-function-left 1 "$(wc -l < "$WORK/fn.txt")"
check no-scratch-left sh -c "! ls -d '$KILN_HOME'/bench 2>/dev/null"
