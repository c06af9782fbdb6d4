# Checks for vm-test scenarios. Each prints exactly one result line:
#   KILN-TEST <scenario>/<check> ok
#   KILN-TEST <scenario>/<check> FAIL <reason>
# The runner sets SCENARIO and WORK (a fresh scratch directory).

pass() { echo "KILN-TEST $SCENARIO/$1 ok"; }
fail() { echo "KILN-TEST $SCENARIO/$1 FAIL $2"; }

# check NAME CMD...: CMD succeeds.
check() {
    name=$1; shift
    if "$@" > "$WORK/check.out" 2>&1; then pass "$name"
    else fail "$name" "command failed: $* ($(tail -c 200 "$WORK/check.out" | tr '\n' '|'))"; fi
}

# expect_eq NAME EXPECTED ACTUAL
expect_eq() {
    if [ "$2" = "$3" ]; then pass "$1"; else fail "$1" "expected '$2', got '$3'"; fi
}

# field FILE NAME: the value of JSON field NAME (a string or a number, as
# a function's answer has them) in FILE, its first match.
field() {
    sed -n "s/.*\"$2\": \"\{0,1\}\([^\",}]*\)\"\{0,1\}[,}].*/\1/p" "$1" | head -n 1
}

# expect_contains NAME FILE PATTERN: FILE has a line matching PATTERN (grep).
expect_contains() {
    if grep -q -- "$3" "$2" 2>/dev/null; then pass "$1"
    else fail "$1" "'$3' not in $2 (ends: $(tail -c 300 "$2" 2>/dev/null | tr '\n' '|'))"; fi
}

# wait_console NAME PATTERN CHECK: instance NAME's console shows PATTERN
# within 300 s; the console is left in $WORK/NAME.txt.
wait_console() {
    waited=0
    while ! "$KILN" logs "$1" 2>/dev/null | grep -q -- "$2" && [ "$waited" -lt 300 ]; do
        sleep 1; waited=$((waited + 1))
    done
    "$KILN" logs "$1" > "$WORK/$1.txt" 2>&1
    expect_contains "$3" "$WORK/$1.txt" "$2"
}

# vm_pid DIR: the pid (in this namespace) of the VM process whose
# definition is under DIR (an instance's or a clone's directory, or
# $KILN_HOME/clones/ for any clone); nothing if none runs.
vm_pid() {
    for status in /proc/[0-9]*/status; do
        dir=${status%/status}
        if tr '\0' ' ' < "$dir/cmdline" 2>/dev/null | grep -q "__vm --config $1"; then
            echo "${dir#/proc/}"
            return
        fi
    done
}

# status_field PID NAME: a field of /proc/PID/status, its first column.
status_field() {
    sed -n "s/^$2:[[:space:]]*\([^[:space:]]*\).*/\1/p" "/proc/$1/status"
}

# Where a scenario's server listens for a host step's client: the test
# machine's NIC when nested (the harness forwards a host port to it),
# loopback when the scenarios run on the build host itself.
HOST_STEP_LISTEN="${KILN_HOST_LISTEN:-127.0.0.1}:9000"

# host_step SCRIPT ARG...: runs tests/vm/host/SCRIPT on the build host,
# which has what the test machine has not (Python, boto3), against the
# server on $HOST_STEP_LISTEN. Each line it prints, "ok CHECK" or "FAIL
# CHECK REASON", becomes a check of this scenario. Nested, the harness
# runs it when it sees the request line below and sends its output to the
# port listened on here (xtask/src/harness/host_steps.rs).
host_step() {
    out="$WORK/host-step.out"
    rm -f "$out"
    if [ -n "$KILN_HOST_REPLY_PORT" ]; then
        timeout 600 nc -l -p "$KILN_HOST_REPLY_PORT" -e sh -c "cat > '$out'; echo ok" &
        listener=$!
        echo "KILN-HOST-STEP $*"
        wait "$listener"
    else
        script=$1; shift
        KILN_HOST_ENDPOINT="http://$HOST_STEP_LISTEN" "$(dirname "$0")/host/$script" "$@" > "$out" ||
            echo "FAIL host-step $script ended with status $?" >> "$out"
    fi
    [ -s "$out" ] || fail host-step "no output from the host step $*"
    while read -r verdict name reason; do
        case $verdict in
            ok) pass "$name" ;;
            *) fail "$name" "$reason" ;;
        esac
    done < "$out"
}
