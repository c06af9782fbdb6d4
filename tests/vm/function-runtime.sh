# Functions in runtime-api mode (the default), SnapStart-style:
# kiln fn create starts recipes/python-echo's runtime.py (a Lambda runtime
# on Python's standard library) once, waits until its init is done (it
# waits in restore/next) and snapshots it → each invocation is a clone
# whose runtime ran its after-restore hook (never its before-snapshot hook
# again) and answers the event through the Runtime API → clones differ in
# kernel UUID, random bytes, hostname and the runtime's own environment
# id → a handler exception is a function error → a runtime whose init
# fails makes kiln fn create fail with the runtime's own message.
. "$(dirname "$0")/lib.sh"

# field FILE NAME: the value of JSON field NAME on FILE's first line.
field() {
    sed -n "s/.*\"$2\": \"\{0,1\}\([^\",}]*\)\"\{0,1\}[,}].*/\1/p" "$1" | head -n 1
}

"$KILN" fn create echo-rt --image python-echo:1.0.0 --entrypoint "/usr/bin/python3 /app/runtime.py" \
    --memory 256 --timeout 60 --env GREETING=hi > "$WORK/create.txt" 2>&1
created=$?
expect_eq create-exit-status 0 "$created"
if [ "$created" -ne 0 ]; then
    cat "$WORK/create.txt"
    "$KILN" ps -a
    for log in "$KILN_HOME"/instances/i-*/console.log; do tail -n 30 "$log"; done
fi
expect_contains create-says-ready-with-the-init-time "$WORK/create.txt" "function echo-rt ready (init [0-9.]* ms)"
echo "KILN-INFO $(cat "$WORK/create.txt")"
"$KILN" fn ls > "$WORK/ls.txt" 2>&1
expect_contains ls-lists-it "$WORK/ls.txt" "^echo-rt .*python-echo:1.0.0 .*runtime-api .*256M .*60s .*ms"

"$KILN" fn invoke echo-rt --payload '{"n": 1}' > "$WORK/one.txt" 2> "$WORK/one.err"
expect_eq invoke-exit-status 0 "$?"
expect_contains invoke-echoes-the-event "$WORK/one.txt" '"echo": {"n": 1}'
expect_contains runtime-knows-its-function "$WORK/one.txt" '"function": "echo-rt"'
expect_eq after-restore-hook-ran-in-the-clone 1 "$(field "$WORK/one.txt" after_restore)"
expect_eq before-snapshot-hook-ran-once-in-the-template 1 "$(field "$WORK/one.txt" before_snapshot)"
expect_eq first-event-of-the-environment 1 "$(field "$WORK/one.txt" count)"
expect_contains invoke-shows-the-runtimes-log "$WORK/one.err" "echo runtime: event "

"$KILN" fn invoke echo-rt --payload '{"n": 2}' > "$WORK/two.txt" 2> "$WORK/two.err"
check clones-have-a-uuid [ -n "$(field "$WORK/one.txt" uuid)" ]
check clones-differ-in-kernel-uuid [ "$(field "$WORK/one.txt" uuid)" != "$(field "$WORK/two.txt" uuid)" ]
check clones-differ-in-random-bytes [ "$(field "$WORK/one.txt" random)" != "$(field "$WORK/two.txt" random)" ]
check clones-differ-in-runtime-state [ "$(field "$WORK/one.txt" env)" != "$(field "$WORK/two.txt" env)" ]
h1=$(field "$WORK/one.txt" hostname)
h2=$(field "$WORK/two.txt" hostname)
check clones-are-hosts-of-their-own sh -c "case '$h1' in i-*) [ '$h1' != '$h2' ];; *) false;; esac"

"$KILN" fn invoke echo-rt --payload '{"fail": true}' > "$WORK/fail.txt" 2> "$WORK/fail.err"
expect_eq handler-exception-exit-status 1 "$?"
expect_contains handler-exception-is-the-body "$WORK/fail.txt" '"errorMessage": "asked to fail"'
expect_contains handler-exception-is-unhandled "$WORK/fail.err" "Unhandled"

"$KILN" fn create bad-init --image python-echo:1.0.0 --entrypoint "/usr/bin/python3 /app/runtime.py" \
    --memory 256 --env ECHO_INIT_FAIL=1 > "$WORK/bad.txt" 2>&1
expect_eq init-error-fails-create 1 "$?"
expect_contains init-error-says-the-runtimes-message "$WORK/bad.txt" "init failed on purpose"
"$KILN" fn ls > "$WORK/ls.txt" 2>&1
check failed-create-leaves-no-function sh -c "! grep -q '^bad-init ' '$WORK/ls.txt'"

check rm "$KILN" fn rm echo-rt
"$KILN" ps -a > "$WORK/ps.txt" 2>&1
expect_eq no-instance-left 1 "$(wc -l < "$WORK/ps.txt")"
