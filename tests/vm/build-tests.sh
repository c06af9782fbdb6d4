# Tests gate publishing: `kiln build` boots the built image once per
# [[test]] and publishes it only if all pass. A passing build records each
# test's result and duration (`kiln inspect`, `kiln images`); a failing
# one names each failed test with its status and the end of its output,
# and publishes nothing; `kiln image test` reruns a stored image's tests.
. "$(dirname "$0")/lib.sh"

# A build publishes by renaming from $KILN_HOME/tmp into the store, so the
# store must be a directory on this home's filesystem; the harness's images
# are linked into it one by one and stay as they were built.
rm "$KILN_HOME/images" && mkdir "$KILN_HOME/images"
for image in "$KILN_IMAGES"/*; do ln -s "$image" "$KILN_HOME/images/"; done

# recipe DIR NAME TESTS: a child of busybox named NAME whose /etc/motd
# says "tested by kiln", with the [[test]] tables TESTS.
recipe() {
    mkdir -p "$1"
    echo "tested by kiln" > "$1/motd"
    cat > "$1/recipe.toml" <<RECIPE
base = "busybox:1.35.0"

[image]
name = "$2"
version = "1.0.0"

[[files]]
src = "motd"
dst = "/etc/motd"

$3
RECIPE
}

recipe "$WORK/pass" tested '[[test]]
run = "cat /etc/motd"
expect_stdout = "tested by kiln"

[[test]]
run = "false"
expect_exit = 1'
out=$WORK/pass.txt
"$KILN" build "$WORK/pass" --init "$KILN_INIT" < /dev/null > "$out" 2>&1
expect_eq passing-build-exit-status 0 "$?"
expect_contains passing-build-published "$out" "^built tested:1.0.0 .*; 2 test(s) passed"
expect_contains each-test-reported "$out" "test PASS cat /etc/motd"
"$KILN" inspect tested:1.0.0 > "$WORK/inspect.txt" 2>&1
expect_contains inspect-shows-results "$WORK/inspect.txt" '"test_results": \['
expect_contains inspect-shows-a-pass "$WORK/inspect.txt" '"passed": true'
expect_contains inspect-shows-the-status "$WORK/inspect.txt" '"exit_status": 1'
expect_contains inspect-shows-durations "$WORK/inspect.txt" '"duration_ms": [1-9]'
"$KILN" images > "$WORK/images.txt" 2>&1
expect_contains images-shows-passed "$WORK/images.txt" "^tested .* 2 passed "
"$KILN" image test tested:1.0.0 < /dev/null > "$WORK/retest.txt" 2>&1
expect_eq image-test-passes 0 "$?"
expect_contains image-test-summary "$WORK/retest.txt" "^tested:1.0.0: 2 passed, 0 failed$"

recipe "$WORK/fail" broken '[[test]]
run = "cat /etc/motd"
expect_stdout = "something else"

[[test]]
run = "false"

[[test]]
run = "sleep 60"
timeout = "3s"

[[test]]
run = "true"'
out=$WORK/fail.txt
"$KILN" build "$WORK/fail" --init "$KILN_INIT" < /dev/null > "$out" 2>&1
expect_eq failing-build-exit-status 1 "$?"
expect_contains output-check-named "$out" "FAIL cat /etc/motd .*does not contain \"something else\""
expect_contains output-shown "$out" "^    .*tested by kiln"
expect_contains status-named "$out" "FAIL false .*exit status 1, expected 0"
expect_contains timeout-named "$out" "FAIL sleep 60 .*timed out after 3 s"
expect_contains passing-test-still-runs "$out" "test PASS true"
expect_contains nothing-published-said "$out" "broken:1.0.0: 3 of 4 test(s) failed; nothing was published"
check nothing-published sh -c "! '$KILN' inspect broken:1.0.0"
check no-scratch-left [ -z "$(ls "$KILN_HOME/tmp")" ]

# Published untested, the same image fails `kiln image test`.
"$KILN" build "$WORK/fail" --init "$KILN_INIT" --skip-tests < /dev/null > "$out" 2>&1
expect_eq skip-tests-publishes 0 "$?"
expect_contains skip-tests-said "$out" "; untested (--skip-tests)"
"$KILN" images > "$WORK/images.txt" 2>&1
expect_contains images-shows-untested "$WORK/images.txt" "^broken .* untested "
"$KILN" image test broken:1.0.0 < /dev/null > "$WORK/retest.txt" 2>&1
expect_eq image-test-fails 1 "$?"
expect_contains image-test-names-failures "$WORK/retest.txt" "^FAIL false "
expect_contains image-test-summary-fails "$WORK/retest.txt" "^broken:1.0.0: 1 passed, 3 failed$"
