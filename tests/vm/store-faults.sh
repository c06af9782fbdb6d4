# The store's fault injection (issue 23), shared by fault-build.sh,
# fault-import.sh and fault-commit.sh (one operation each, so that each
# has a scenario's time): kill -9 of the kiln command, where the work is,
# at 20 seeded random points during the operation. After each kill: an
# image `kiln images` lists opens whole (flattens), a command that said it
# published did, the store still lists, a failure says so in one line,
# and the next command works; once it has, none of the killed commands'
# scratch is left in $KILN_HOME/tmp (each command removes the scratch
# directories no live command holds, see kiln_vmm::durable::scratch_dir).
# Points: random delays within the measured duration.
# Sourced after lib.sh.

POINTS=20
# Publishing renames from $KILN_HOME/tmp into the store: the store is a
# directory on this home's filesystem, the harness's images linked in.
rm "$KILN_HOME/images" && mkdir "$KILN_HOME/images"
for image in "$KILN_IMAGES"/*; do ln -s "$image" "$KILN_HOME/images/"; done
fault_seed

# listed REF: `kiln images` lists NAME:VERSION REF.
listed() {
    "$KILN" images | grep -q "^${1%%:*}  *${1#*:} "
}

# inject OP: 20 kill points of OP, then its figures. OP is a function of
# the point's number that execs the kiln command (so that killing the
# background job kills kiln itself), and `reference OP POINT` names the
# image it publishes.
inject() {
    op=$1
    start=$(now_ms)
    ("$op" 0) > "$WORK/$op-measured.txt" 2>&1
    expect_eq "$op-measured-exit-status" 0 "$?"
    FAULT_WINDOW=$(($(now_ms) - start))
    echo "KILN-INFO $SCENARIO $op takes $FAULT_WINDOW ms: $(tail -n 1 "$WORK/$op-measured.txt")"
    injected=0 survived=0 lost=0 i=0
    while [ "$i" -lt "$POINTS" ]; do
        i=$((i + 1))
        POINT_LOST=0
        kill_during "$WORK/$op$i.txt" cli "$op" "$i"
        injected=$((injected + LANDED))
        ref=$(reference "$op" "$i")
        fault_said "$op-$i" "$WORK/$op$i.txt"
        [ "$STATUS" -ne 0 ] || listed "$ref" || { POINT_LOST=1; fail "$op-$i-published" "$ref said published, not listed"; }
        holds "$op-$i-images" "$KILN" images
        if listed "$ref"; then
            holds "$op-$i-opens" "$KILN" image flatten "$ref" "$WORK/flat.ext4"
            rm -f "$WORK/flat.ext4"
        fi
        lost=$((lost + POINT_LOST))
        survived=$((survived + LANDED * (1 - POINT_LOST)))
    done
    echo "KILN-INFO $SCENARIO $op: after the kills $KILN_HOME/tmp holds: $(ls -A "$KILN_HOME/tmp" | tr '\n' ' ')"
    ("$op" 99) > "$WORK/$op-final.txt" 2>&1
    expect_eq "$op-works-after-the-kills" 0 "$?"
    # The final command, the only one left, removed what the killed ones
    # left in the store's tmp (their scratch, unlocked once they died).
    expect_eq "$op-no-scratch-left" "" "$(ls -A "$KILN_HOME/tmp" | tr '\n' ' ')"
    fault_tally "$op" "$injected" "$lost" "$survived"
}

# reference OP POINT: the image OP's point POINT publishes.
reference() {
    case $1 in
        commit) echo "committed:1.0.$2" ;;
        build) echo "faulty:1.0.0" ;;
        import) echo "imported:1.0.$2" ;;
    esac
}
