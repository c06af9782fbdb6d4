# A Lambda function in Rust on AWS's lambda_runtime crate
# (recipes/rust-lambda, static), a runtime that knows no SnapStart: kiln
# fn create snapshots it in invocation/next → each clone answers with the
# handler's JSON and a per-environment count of 1 → an Err from the
# handler is an Unhandled function error → through kiln fn serve the
# second event reuses the warm environment (its count goes on).
. "$(dirname "$0")/lib.sh"

# The template's console is copied while it runs: a failed create
# removes its instance.
"$KILN" fn create rust --image rust-lambda:1.0.0 --memory 128 --timeout 20 \
    > "$WORK/create.txt" 2>&1 &
creating=$!
while kill -0 "$creating" 2> /dev/null; do
    cat "$KILN_HOME"/instances/i-*/console.log > "$WORK/create.console" 2> /dev/null
    sleep 1
done
wait "$creating"
created=$?
expect_eq create-exit-status 0 "$created"
[ "$created" -eq 0 ] || echo "KILN-INFO the template's console: $(tail -c 3000 "$WORK/create.console" | tr '\n' '|')"
expect_contains create-says-ready-with-the-init-time "$WORK/create.txt" "function rust ready (init [0-9.]* ms)"
echo "KILN-INFO $(tr '\n' '|' < "$WORK/create.txt")"

"$KILN" fn invoke rust --payload '{"n": 1}' > "$WORK/one" 2> "$WORK/one.err"
expect_eq invoke-exit-status 0 "$?"
expect_contains invoke-echoes-the-event "$WORK/one" '"echo": *{"n": *1}'
expect_contains runtime-knows-its-function "$WORK/one" '"function": *"rust"'
expect_contains a-clone-is-a-fresh-environment "$WORK/one" '"count": *1[,}]'
"$KILN" fn invoke rust --payload '{"n": 2}' > "$WORK/two" 2> "$WORK/two.err"
expect_contains the-next-clone-is-fresh-too "$WORK/two" '"count": *1[,}]'

"$KILN" fn invoke rust --payload '{"fail": true}' > "$WORK/fail" 2> "$WORK/fail.err"
expect_eq handler-error-exit-status 1 "$?"
expect_contains handler-error-is-the-body "$WORK/fail" 'asked to fail'
# The runtime names the kind: lambda_runtime says "unhandled".
expect_contains handler-error-is-unhandled "$WORK/fail.err" "[Uu]nhandled"

"$KILN" fn serve rust --listen 127.0.0.1:18083 --max-concurrency 1 2> "$WORK/serve.err" &
serve=$!
# Ready once kiln fn ls shows its (zero) warm environments.
for _ in $(seq 1 100); do
    [ "$("$KILN" fn ls | awk '$1 == "rust" { print $7 }')" = 0 ] && break
    sleep 0.2
done
for n in 1 2; do
    echo "{\"n\": $n}" > "$WORK/s$n.in"
    wget -q -O "$WORK/s$n" --post-file "$WORK/s$n.in" \
        "http://127.0.0.1:18083/2015-03-31/functions/rust/invocations" 2> "$WORK/s$n.err"
done
expect_contains serve-answers "$WORK/s1" '"echo": *{"n": *1}'
expect_contains warm-environment-counts-on "$WORK/s2" '"count": *2[,}]'
kill -TERM "$serve"
wait "$serve"
expect_eq serve-stops-on-sigterm 0 "$?"
check rm "$KILN" fn rm rust
