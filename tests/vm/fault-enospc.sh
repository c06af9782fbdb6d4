# Fault injection (issue 23): ENOSPC from a small tmpfs Kiln home during a
# build, a snapshot, a guest's writes to its root volume and a commit.
# Each fails with one line naming what ran out and leaves nothing
# half-written (no scratch, no snapshot, no image); the guest sees EIO
# while the host keeps running its VM; and once space is back the next
# command works.
. "$(dirname "$0")/lib.sh"

# A home of its own on a small tmpfs; a ballast file there leaves each
# operation a few MiB, less than it needs.
home=$WORK/small
mkdir -p "$home"
mount -t tmpfs -o size=64m,mode=700 tmpfs "$home" || fail small-home "cannot mount a tmpfs"
export KILN_HOME=$home
mkdir "$KILN_HOME/images"
for image in "$KILN_IMAGES"/*; do ln -s "$image" "$KILN_HOME/images/"; done
injected=0 lost=0

# leave MIB: the ballast leaves MIB MiB free in the home.
leave() {
    rm -f "$home/ballast"
    free=$(df -k "$home" | awk 'NR == 2 { print $4 }')
    dd if=/dev/zero of="$home/ballast" bs=1k count=$((free - $1 * 1024)) 2> /dev/null
}

# ran_out OP FILE STATUS: OP failed (STATUS) with one line that says the
# device ran out of space, and left no scratch in the home's tmp.
ran_out() {
    injected=$((injected + 1))
    POINT_LOST=0
    [ "$3" -ne 0 ] || { POINT_LOST=1; fail "$1-fails" "it succeeded"; }
    sed "s/^/KILN-INFO $SCENARIO $1: /" "$2"
    if [ "$(wc -l < "$2")" -ne 1 ] || ! grep -q "No space left on device" "$2"; then
        POINT_LOST=1; fail "$1-one-line-naming-enospc" "$(tr '\n' '|' < "$2")"
    fi
    holds "$1-leaves-no-scratch" sh -c "[ -z \"\$(ls -A '$KILN_HOME/tmp' 2>/dev/null)\" ]"
    lost=$((lost + POINT_LOST))
}

# exec_ready NAME: guest-init in instance NAME takes `kiln exec` (60 s).
exec_ready() {
    waited=0
    while ! "$KILN" exec "$1" -- /bin/true > "$WORK/exec-ready.txt" 2>&1 && [ "$waited" -lt 60 ]; do
        sleep 1; waited=$((waited + 1))
    done
    [ "$waited" -lt 60 ]
}

# recipe MIB: a host-side build of MIB MiB of random bytes on busybox.
recipe() {
    mkdir -p "$WORK/recipe"
    cat > "$WORK/recipe/recipe.toml" <<RECIPE
base = "busybox:1.35.0"

[image]
name = "big"
version = "1.0.$1"

[[build]]
run = 'dd if=/dev/urandom of="\$DESTDIR/blob" bs=1M count=$1 2>/dev/null'
RECIPE
}

# The stage (busybox and the step's 3 MiB) fits; the image made of it
# does not.
recipe 3
leave 9
"$KILN" build "$WORK/recipe" --init "$KILN_INIT" --skip-tests > "$WORK/build.txt" 2>&1
ran_out build "$WORK/build.txt" "$?"
holds build-publishes-nothing sh -c "! '$KILN' images | grep -q '^big '"

rm -f "$home/ballast"
"$KILN" run vm-test:1.0.0 --detach --name filler --network none \
    --cmdline 'kiln.entrypoint="/bin/sleep 3600"' > /dev/null 2> "$WORK/launch.err"
expect_eq launch-exit-status 0 "$?"
check exec-ready exec_ready filler

# The guest fills its root volume past the home's room: its writes fail
# with EIO (the block layer says so), and its VM goes on.
leave 2
"$KILN" exec filler -- /bin/dd if=/dev/urandom of=/fill bs=1M count=8 conv=fsync \
    > "$WORK/fill.txt" 2>&1
status=$?
injected=$((injected + 1))
POINT_LOST=0
sed "s/^/KILN-INFO $SCENARIO overlay: guest dd: /" "$WORK/fill.txt"
[ "$status" -ne 0 ] || { POINT_LOST=1; fail overlay-write-fails "the guest's dd succeeded"; }
"$KILN" exec filler -- /bin/dmesg > "$WORK/dmesg.txt" 2>&1
grep -i "error" "$WORK/dmesg.txt" | tail -n 3 | sed "s/^/KILN-INFO $SCENARIO overlay: guest dmesg: /"
grep -q "I/O error" "$WORK/dmesg.txt" || { POINT_LOST=1; fail guest-sees-eio "no I/O error in the guest's dmesg"; }
holds guest-runs-after-enospc "$KILN" exec filler -- /bin/true
holds ps-says-running sh -c "'$KILN' ps | grep -q 'filler .*running'"
"$KILN" logs filler 2>/dev/null | grep -i "space" | tail -n 2 | sed "s/^/KILN-INFO $SCENARIO overlay: VMM: /"
lost=$((lost + POINT_LOST))

# The snapshot's memory file does not fit: refused, and the VM goes on.
leave 1
"$KILN" snapshot create filler "$KILN_HOME/snap" > "$WORK/snapshot.txt" 2>&1
ran_out snapshot "$WORK/snapshot.txt" "$?"
holds snapshot-leaves-nothing sh -c "[ -z \"\$(ls -A '$KILN_HOME' | grep snap)\" ]"
holds guest-runs-after-the-snapshot "$KILN" exec filler -- /bin/true

check stop "$KILN" stop filler
leave 1
"$KILN" commit filler filled:1.0.0 > "$WORK/commit.txt" 2>&1
ran_out commit "$WORK/commit.txt" "$?"
holds commit-publishes-nothing sh -c "! '$KILN' images | grep -q '^filled '"
fault_tally enospc "$injected" "$lost"

# Space back, the same commands work.
rm -f "$home/ballast"
check commit-works-with-space "$KILN" commit filler filled:1.0.0
check build-works-with-space "$KILN" build "$WORK/recipe" --init "$KILN_INIT" --skip-tests
"$KILN" images > "$WORK/images.txt" 2>&1
expect_contains built-image-listed "$WORK/images.txt" "^big  *1\.0\.3 "
check terminate "$KILN" terminate filler
umount "$home"
