# The example recipes' [[test]]s, run for real: the harness builds the
# recipes on the host with --skip-tests (the host may not boot VMs), so
# they are stored untested; `kiln image test` boots each image once per
# test here, where KVM works, and exits 0 only if all pass. Each test's
# VM process is jailed, as an instance's is.
. "$(dirname "$0")/lib.sh"

"$KILN" images > "$WORK/images.txt" 2>&1
expect_contains host-builds-are-untested "$WORK/images.txt" "^hello .* untested "
for image in hello:1.0.0 busybox:1.35.0 python:3.11.2 web:1.0.0; do
    name=${image%%:*}
    "$KILN" image test "$image" < /dev/null > "$WORK/$name.txt" 2>&1 &
    tests=$!
    jail=$(vm_jail "$KILN_HOME/tmp/" "$tests")
    wait "$tests"
    expect_eq "$name-exit-status" 0 "$?"
    expect_jailed "$name-test-vm-jailed" "$jail"
    expect_contains "$name-each-passes" "$WORK/$name.txt" "^PASS "
    expect_contains "$name-none-fails" "$WORK/$name.txt" "^$image: [1-9][0-9]* passed, 0 failed$"
done
check no-scratch-left [ -z "$(ls "$KILN_HOME/tmp")" ]
