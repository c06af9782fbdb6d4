# A real Lambda runtime, SnapStart-style: recipes/python-lambda's app.py
# under AWS's awslambdaric with snapshot-restore-py hooks. kiln fn create
# runs its init once (the before-snapshot hook with it) and snapshots it
# in restore/next → each clone ran the after-restore hook, never the
# before-snapshot hook again, answers with the handler's JSON and has an
# environment id and random generator of its own → a handler exception
# is an Unhandled function error → kiln fn serve's Invoke API answers an
# event, and the exception with X-Amz-Function-Error → boto3 on the build
# host invokes it as an application would. Python's init is
# slow under nested TCG: two clones and one serve, its second event warm.
. "$(dirname "$0")/lib.sh"

"$KILN" fn create lambda --image python-lambda:1.0.0 --handler app.handler \
    --memory 256 --timeout 30 > "$WORK/create.txt" 2>&1
created=$?
expect_eq create-exit-status 0 "$created"
if [ "$created" -ne 0 ]; then
    cat "$WORK/create.txt"
    for log in "$KILN_HOME"/instances/i-*/console.log; do tail -n 30 "$log"; done
fi
expect_contains create-says-ready-with-the-init-time "$WORK/create.txt" "function lambda ready (init [0-9.]* ms)"
echo "KILN-INFO $(tr '\n' '|' < "$WORK/create.txt")"

# invoke OUT PAYLOAD: kiln fn invoke of PAYLOAD, its answer in OUT and
# its messages (the runtime's log of the event, the VM process's own
# complaints) in OUT.err, shown if there is no answer. A clone's guest
# console goes nowhere: it is a lone VM process with no console log.
invoke() {
    "$KILN" fn invoke lambda --payload "$2" > "$1" 2> "$1.err"
    status=$?
    [ -s "$1" ] || echo "KILN-INFO no answer; kiln fn invoke said: $(tail -c 2000 "$1.err" | tr '\n' '|')"
    return "$status"
}

invoke "$WORK/one" '{"n": 1}'
expect_eq invoke-exit-status 0 "$?"
expect_contains invoke-answers-the-handlers-json "$WORK/one" '"echo": {"n": 1}'
expect_contains handler-knows-its-function "$WORK/one" '"function": "lambda"'
echo "KILN-INFO invoke says: $(tail -c 600 "$WORK/one.err" | tr '\n' '|')"
invoke "$WORK/two" '{"n": 2}'
expect_contains second-clone-answers "$WORK/two" '"echo": {"n": 2}'
for clone in one two; do
    expect_eq "before-snapshot-hook-ran-once-in-the-template-$clone" 1 "$(field "$WORK/$clone" before_snapshot)"
    expect_eq "after-restore-hook-ran-in-clone-$clone" 1 "$(field "$WORK/$clone" after_restore)"
    expect_eq "first-event-of-clone-$clone" 1 "$(field "$WORK/$clone" count)"
done
env1=$(field "$WORK/one" env)
check after-restore-gave-an-environment-id sh -c "echo '$env1' | grep -qx '[0-9a-f]\{32\}'"
check clones-differ-in-environment-id [ "$(field "$WORK/one" env)" != "$(field "$WORK/two" env)" ]
check clones-differ-in-random-numbers [ "$(field "$WORK/one" random)" != "$(field "$WORK/two" random)" ]

invoke "$WORK/fail" '{"fail": true}'
expect_eq handler-exception-exit-status 1 "$?"
expect_contains handler-exception-is-the-body "$WORK/fail" '"errorMessage": "asked to fail"'
expect_contains handler-exception-names-its-type "$WORK/fail" '"errorType": "ValueError"'
expect_contains handler-exception-is-unhandled "$WORK/fail.err" "^kiln: function lambda: Unhandled (Error)"

# invoke_api OUT: POSTs OUT.in to the Invoke API; the body lands in OUT,
# the response's headers in OUT.headers.
invoke_api() {
    wget -S -q -O "$1" --post-file "$1.in" \
        "http://$HOST_STEP_LISTEN/2015-03-31/functions/lambda/invocations" 2> "$1.headers"
}

# On the address the build host's boto3 reaches (host_step, below).
"$KILN" fn serve lambda --listen "$HOST_STEP_LISTEN" --allow-remote --max-concurrency 1 \
    2> "$WORK/serve.err" &
serve=$!
# Ready once kiln fn ls shows its (zero) warm environments.
for _ in $(seq 1 100); do
    [ "$("$KILN" fn ls | awk '$1 == "lambda" { print $7 }')" = 0 ] && break
    sleep 0.2
done

echo '{"n": 10}' > "$WORK/s1.in"
invoke_api "$WORK/s1"
expect_eq invoke-api-answers 0 "$?"
expect_contains invoke-api-answers-the-handlers-json "$WORK/s1" '"echo": {"n": 10}'
expect_eq invoke-api-clone-ran-the-after-restore-hook 1 "$(field "$WORK/s1" after_restore)"
echo '{"fail": true}' > "$WORK/f.in"
invoke_api "$WORK/f"
expect_contains invoke-api-function-error-header "$WORK/f.headers" "X-Amz-Function-Error: Unhandled"
expect_contains invoke-api-function-error-body "$WORK/f" "asked to fail"

# AWS's Python SDK as an application uses it, on the build host (the test
# machine has no Python): RequestResponse with a log tail, a handler
# exception, Event, DryRun and an unknown function.
host_step boto3-invoke lambda

kill -TERM "$serve"
wait "$serve"
expect_eq serve-stops-on-sigterm 0 "$?"
check rm "$KILN" fn rm lambda
"$KILN" ps -a > "$WORK/ps.txt" 2>&1
expect_eq no-instance-left 1 "$(wc -l < "$WORK/ps.txt")"
