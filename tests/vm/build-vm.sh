# Build steps in a VM: a `[[build]]` step with `in = "vm"` runs as root
# inside a VM booted from the image being built, with the recipe's
# directory at /build, its console output streamed with the step's name,
# and what it writes is in the published image (its test reads it). The
# same recipe builds to the same digest.
# A failing step fails the build with its number and status, and
# publishes nothing. The build VM is jailed as an instance's VM process
# is, and its jail goes with it, the build failed or not.
. "$(dirname "$0")/lib.sh"

# A build publishes by renaming from $KILN_HOME/tmp into the store, so the
# store must be a directory on this home's filesystem; the harness's images
# are linked into it one by one and stay as they were built.
rm "$KILN_HOME/images" && mkdir "$KILN_HOME/images"
for image in "$KILN_IMAGES"/*; do ln -s "$image" "$KILN_HOME/images/"; done

# recipe DIR NAME RUN: a child of busybox named NAME with one VM step RUN,
# whose test checks /etc/built-in-vm, and a file `shipped` beside it.
recipe() {
    mkdir -p "$1"
    echo "shipped with the recipe" > "$1/shipped"
    cat > "$1/recipe.toml" <<RECIPE
base = "busybox:1.35.0"

[image]
name = "$2"
version = "1.0.0"

[[build]]
in = "vm"
run = '''
$3
'''
env = { GREETING = "built in a vm" }

[[test]]
run = "cat /etc/built-in-vm"
expect_stdout = "uid 0: built in a vm"

[[test]]
run = "cat /etc/shipped"
expect_stdout = "shipped with the recipe"
RECIPE
}

recipe "$WORK/vm" vmbuilt 'echo "step output reaches the build"
echo "kernel $(uname -r)" > /etc/built-in-vm
echo "uid $(id -u): $GREETING" >> /etc/built-in-vm
cp /build/shipped /etc/shipped'
out=$WORK/vm.txt
"$KILN" build "$WORK/vm" --init "$KILN_INIT" < /dev/null > "$out" 2>&1 &
build=$!
# The build VM's process, seen from the host while the step runs.
jail=$(vm_jail "$KILN_HOME/tmp/" "$build")
wait "$build"
expect_eq vm-step-build-exit-status 0 "$?"
expect_jailed build-vm-jailed "$jail"
expect_contains vm-step-output-streamed "$out" "^kiln: step 1 (echo \"step output reaches …) | step output reaches the build"
expect_contains vm-step-result-tested "$out" "test PASS cat /etc/built-in-vm"
expect_contains vm-step-read-the-recipe-dir "$out" "test PASS cat /etc/shipped"
expect_contains vm-step-build-published "$out" "^built vmbuilt:1.0.0 .*; 2 test(s) passed"
digest() { "$KILN" inspect vmbuilt:1.0.0 | sed -n 's/.*"digest": "\(sha256:[0-9a-f]*\)".*/\1/p'; }
first=$(digest)
check vm-step-digest-read [ -n "$first" ]

# Reproducible: built again from nothing, the same bytes.
"$KILN" rm vmbuilt:1.0.0 > /dev/null 2>&1
"$KILN" build "$WORK/vm" --init "$KILN_INIT" < /dev/null > "$WORK/again.txt" 2>&1
expect_eq rebuild-exit-status 0 "$?"
expect_eq rebuild-same-digest "$first" "$(digest)"

recipe "$WORK/fail" vmfailed 'echo "about to fail"
exit 3'
out=$WORK/fail.txt
"$KILN" build "$WORK/fail" --init "$KILN_INIT" < /dev/null > "$out" 2>&1
expect_eq failing-step-exit-status 1 "$?"
expect_contains failing-step-output-shown "$out" "| about to fail"
expect_contains failing-step-named "$out" "build step 1 (echo \"about to fail\" …) failed in the build VM: exit status 3"
check failing-step-nothing-published sh -c "! '$KILN' inspect vmfailed:1.0.0"
check failing-step-no-scratch-left [ -z "$(ls "$KILN_HOME/tmp")" ]
check no-jail-cgroup-left sh -c "! ls /sys/fs/cgroup/kiln 2>/dev/null | grep -q scratch-"
