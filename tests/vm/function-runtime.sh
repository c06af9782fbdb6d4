# Functions in runtime-api mode (the default), SnapStart-style:
# kiln fn create starts recipes/python-echo's runtime.py (a Lambda runtime
# on Python's standard library) once, waits until its init is done (it
# waits in restore/next) and snapshots it → each invocation is a clone
# whose runtime ran its after-restore hook (never its before-snapshot hook
# again) and answers the event through the Runtime API → the first clone's
# touched pages become the template's working set, which the next clone
# maps ahead → clones differ in
# kernel UUID, random bytes, hostname and the runtime's own environment
# id → a handler exception is a function error → kiln fn serve speaks
# Lambda's Invoke API (RequestResponse, Event, DryRun, Tail logs, function
# errors, an unknown function's 404) and keeps warm environments: the
# second event reuses the first's (same environment id, its counter goes
# on), kiln fn invoke goes through the serve, concurrent events scale out
# to a second clone, kiln fn ls shows warm and busy ones, a handler
# timeout replaces its environment, idle ones expire after --keep-warm, and
# stopping the serve terminates them all → a runtime whose init fails
# makes kiln fn create fail with the runtime's own message.
. "$(dirname "$0")/lib.sh"

"$KILN" fn create echo-rt --image python-echo:1.0.0 --entrypoint "/usr/bin/python3 /app/runtime.py" \
    --memory 256 --timeout 20 --env GREETING=hi > "$WORK/create.txt" 2>&1
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
expect_contains ls-lists-it "$WORK/ls.txt" "^echo-rt .*python-echo:1.0.0 .*runtime-api .*256M .*20s .*ms"

"$KILN" fn invoke echo-rt --payload '{"n": 1}' > "$WORK/one.txt" 2> "$WORK/one.err"
expect_eq invoke-exit-status 0 "$?"
expect_contains invoke-echoes-the-event "$WORK/one.txt" '"echo": {"n": 1}'
expect_contains runtime-knows-its-function "$WORK/one.txt" '"function": "echo-rt"'
expect_eq after-restore-hook-ran-in-the-clone 1 "$(field "$WORK/one.txt" after_restore)"
expect_eq before-snapshot-hook-ran-once-in-the-template 1 "$(field "$WORK/one.txt" before_snapshot)"
expect_eq first-event-of-the-environment 1 "$(field "$WORK/one.txt" count)"
expect_contains invoke-shows-the-runtimes-log "$WORK/one.err" "echo runtime: event "

# The first clone's pages became the template's working set, which the
# next clone's VM process (jailed: the record is bound into its jail)
# maps ahead, as its log says.
ws=$KILN_HOME/functions/echo-rt/template/memory.ws
check template-records-its-working-set test "$(wc -c < "$ws")" -gt 24
KILN_LOG=info "$KILN" fn invoke echo-rt --payload '{"n": 2}' > "$WORK/two.txt" 2> "$WORK/two.err"
expect_contains working-set-mapped-ahead "$WORK/two.err" "mapped [1-9][0-9]* KiB of the working set ahead"
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

# invoke_api NAME OUT [HEADER]: POSTs OUT.in to the Invoke API of NAME;
# the body lands in OUT, the response's headers in OUT.headers.
invoke_api() {
    wget -S -q -O "$2" --header "${3:-X-Kiln-Test: 1}" --post-file "$2.in" \
        "http://127.0.0.1:18081/2015-03-31/functions/$1/invocations" 2> "$2.headers"
}
# ls_field NAME COLUMN: function NAME's COLUMN (1-based) in kiln fn ls.
ls_field() {
    "$KILN" fn ls | awk -v name="$1" -v col="$2" '$1 == name { print $col }'
}

"$KILN" fn serve echo-rt --listen 127.0.0.1:18081 --max-concurrency 2 --keep-warm 40 \
    2> "$WORK/serve.err" &
serve=$!
for _ in $(seq 1 100); do
    [ "$(ls_field echo-rt 7)" = 0 ] && break
    sleep 0.2
done
expect_eq serve-starts-with-no-environment "0 0" "$(ls_field echo-rt 7) $(ls_field echo-rt 8)"

echo '{"n": 10}' > "$WORK/s1.in"
invoke_api echo-rt "$WORK/s1" "X-Amz-Log-Type: Tail"
expect_eq invoke-api-answers 0 "$?"
expect_contains invoke-api-echoes "$WORK/s1" '"echo": {"n": 10}'
expect_contains invoke-api-version "$WORK/s1.headers" 'X-Amz-Executed-Version: \$LATEST'
expect_contains invoke-api-log-tail "$WORK/s1.headers" "X-Amz-Log-Result: "
expect_eq a-new-environment-served-it 1 "$(field "$WORK/s1" count)"
echo "KILN-INFO serve says: $(tail -c 800 "$WORK/serve.err" | tr '\n' '|')"
echo '{"n": 11}' > "$WORK/s2.in"
invoke_api echo-rt "$WORK/s2"
expect_eq warm-reuse-counts-on 2 "$(field "$WORK/s2" count)"
expect_eq warm-reuse-is-the-same-environment "$(field "$WORK/s1" env)" "$(field "$WORK/s2" env)"
"$KILN" fn invoke echo-rt --payload '{"n": 12}' > "$WORK/s3" 2> "$WORK/s3.err"
expect_eq fn-invoke-goes-through-serve 3 "$(field "$WORK/s3" count)"
echo "KILN-INFO fn invoke through the serve says: $(tail -c 600 "$WORK/s3.err" | tr '\n' '|')"
expect_eq ls-shows-one-warm "1 0" "$(ls_field echo-rt 7) $(ls_field echo-rt 8)"

echo '{"fail": true}' > "$WORK/f.in"
invoke_api echo-rt "$WORK/f"
expect_contains function-error-header "$WORK/f.headers" "X-Amz-Function-Error: Unhandled"
expect_contains function-error-body "$WORK/f" "asked to fail"
echo '{}' > "$WORK/e.in"
invoke_api echo-rt "$WORK/e" "X-Amz-Invocation-Type: Event"
expect_contains event-is-accepted "$WORK/e.headers" "HTTP/1.1 202"
echo '{}' > "$WORK/d.in"
invoke_api echo-rt "$WORK/d" "X-Amz-Invocation-Type: DryRun"
expect_contains dry-run-is-204 "$WORK/d.headers" "HTTP/1.1 204"
echo '{}' > "$WORK/n.in"
invoke_api nope "$WORK/n"
expect_contains unknown-function-is-404 "$WORK/n.headers" "404"

# Two events at once: the warm environment takes one, a new clone the other.
echo '{"sleep": 3}' > "$WORK/c1.in"; cp "$WORK/c1.in" "$WORK/c2.in"
invoke_api echo-rt "$WORK/c1" & c1=$!
invoke_api echo-rt "$WORK/c2" & c2=$!
sleep 1
busy=$(ls_field echo-rt 8)
wait "$c1"; wait "$c2"
check concurrent-events-ran-in-two-environments [ "$(field "$WORK/c1" env)" != "$(field "$WORK/c2" env)" ]
echo "KILN-INFO busy while two events ran: $busy"
expect_eq ls-shows-two-warm 2 "$(ls_field echo-rt 7)"

echo '{"sleep": 120}' > "$WORK/t.in"
invoke_api echo-rt "$WORK/t"
expect_contains timeout-is-a-function-error "$WORK/t" "Task timed out after 20.00 seconds"
echo '{"after": "timeout"}' > "$WORK/a.in"
invoke_api echo-rt "$WORK/a"
expect_contains next-event-after-a-timeout-works "$WORK/a" '"after": "timeout"'

# Idle environments expire after --keep-warm (40 s).
sleep 50
expect_eq idle-environments-expire 0 "$(ls_field echo-rt 7)"
echo '{"n": 13}' > "$WORK/x.in"
invoke_api echo-rt "$WORK/x"
expect_eq after-expiry-a-new-environment 1 "$(field "$WORK/x" count)"

kill -TERM "$serve"
wait "$serve"
expect_eq serve-stops-on-sigterm 0 "$?"
"$KILN" ps -a > "$WORK/ps.txt" 2>&1
expect_eq serve-leaves-no-environment 1 "$(wc -l < "$WORK/ps.txt")"

"$KILN" fn create bad-init --image python-echo:1.0.0 --entrypoint "/usr/bin/python3 /app/runtime.py" \
    --memory 256 --env ECHO_INIT_FAIL=1 > "$WORK/bad.txt" 2>&1
expect_eq init-error-fails-create 1 "$?"
expect_contains init-error-says-the-runtimes-message "$WORK/bad.txt" "init failed on purpose"
"$KILN" fn ls > "$WORK/ls.txt" 2>&1
check failed-create-leaves-no-function sh -c "! grep -q '^bad-init ' '$WORK/ls.txt'"

check rm "$KILN" fn rm echo-rt
"$KILN" ps -a > "$WORK/ps.txt" 2>&1
expect_eq no-instance-left 1 "$(wc -l < "$WORK/ps.txt")"
