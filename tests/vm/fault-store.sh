# Fault injection (issue 23): kill -9 of the kiln command, where the work
# is, at 20 seeded random points each during `kiln commit`, `kiln build`
# (host-side steps) and `kiln image import` (a published container
# image). After each kill: an image `kiln images` lists opens whole
# (flattens), a command that said it published did, the store still
# lists, no scratch is left that a later command trips over, a failure
# says so in one line, and the next command works. Each build replaces
# the same NAME:VERSION, so kills also land in the store's replacement of
# a published image. Points: random delays within the measured duration.
. "$(dirname "$0")/lib.sh"

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
    echo "KILN-INFO $SCENARIO $op: after the kills $KILN_HOME/tmp holds: $(ls "$KILN_HOME/tmp" | tr '\n' ' ')"
    ("$op" 99) > "$WORK/$op-final.txt" 2>&1
    expect_eq "$op-works-after-the-kills" 0 "$?"
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

# A host-side build on busybox: 2 MiB of random bytes and the point's
# number, so that each point builds anew and replaces the last.
mkdir -p "$WORK/recipe"
build() {
    cat > "$WORK/recipe/recipe.toml" <<RECIPE
base = "busybox:1.35.0"

[image]
name = "faulty"
version = "1.0.0"

[[build]]
run = 'dd if=/dev/urandom of="\$DESTDIR/blob" bs=1M count=2 2>/dev/null && echo $1 > "\$DESTDIR/point"'
RECIPE
    exec "$KILN" build "$WORK/recipe" --init "$KILN_INIT" --skip-tests
}
inject build

# A docker-save archive of busybox and 2 MiB of random bytes.
mkdir -p "$WORK/root/bin" "$WORK/archive/l1"
cp /bin/busybox "$WORK/root/bin/busybox"
dd if=/dev/urandom of="$WORK/root/blob" bs=1M count=2 2>/dev/null
(cd "$WORK/root" && tar -cf "$WORK/archive/l1/layer.tar" bin blob)
diff_id=$(sha256sum "$WORK/archive/l1/layer.tar" | cut -d' ' -f1)
echo "{\"rootfs\": {\"type\": \"layers\", \"diff_ids\": [\"sha256:$diff_id\"]}, \"config\": {\"Cmd\": [\"/bin/busybox\", \"true\"]}}" \
    > "$WORK/archive/config.json"
printf '[{"Config": "config.json", "RepoTags": ["imported:1.0"], "Layers": ["l1/layer.tar"]}]' \
    > "$WORK/archive/manifest.json"
(cd "$WORK/archive" && tar -cf "$WORK/image.tar" manifest.json config.json l1)
rm -rf "$WORK/root" "$WORK/archive"
import() { exec "$KILN" image import "$WORK/image.tar" "$(reference import "$1")" --init "$KILN_INIT"; }
inject import

"$KILN" run vm-test:1.0.0 --detach --name src --cmdline 'kiln.entrypoint="/tests/commit.sh write"' \
    > /dev/null 2> "$WORK/launch.err"
wait_console src "commit: written" guest-wrote
check stop "$KILN" stop src
commit() { exec "$KILN" commit src "$(reference commit "$1")"; }
inject commit

"$KILN" terminate src > /dev/null 2>&1
