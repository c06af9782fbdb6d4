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

# Fault injection (tests/vm/fault-*.sh). fault_seed prints the seed of the
# scenario's kill points ($KILN_FAULT_SEED to replay a failed run, else the
# clock); fault_next MAX_MS then sets FAULT_DELAY to the next delay below
# MAX_MS milliseconds, in seconds for sleep, from a linear congruential
# generator (POSIX rand's constants) so that a seed replays the same points.
fault_seed() {
    FAULT_STATE=${KILN_FAULT_SEED:-$(date +%s)}
    echo "KILN-INFO $SCENARIO fault seed $FAULT_STATE (KILN_FAULT_SEED=$FAULT_STATE replays it)"
}
fault_next() {
    FAULT_STATE=$(((FAULT_STATE * 1103515245 + 12345) % 2147483648))
    ms=$((FAULT_STATE / 65536 % $1))
    FAULT_DELAY=$((ms / 1000)).$(printf %03d $((ms % 1000)))
}

# now_ms: milliseconds since boot, for measuring an operation's duration.
now_ms() { awk '{ printf "%d\n", $1 * 1000 }' /proc/uptime; }

# pid_of PATTERN: the first process whose command line (words joined by
# spaces) matches PATTERN (grep), if any.
pid_of() {
    for dir in /proc/[0-9]*; do
        if tr '\0' ' ' < "$dir/cmdline" 2>/dev/null | grep -q -- "$1"; then
            echo "${dir#/proc/}"
            return
        fi
    done
}

# one_line NAME FILE: FILE (a failed command's output) is one line at most.
one_line() {
    if [ "$(wc -l < "$2")" -le 1 ]; then pass "$1"
    else fail "$1" "more than one line: $(head -c 300 "$2" | tr '\n' '|')"; fi
}

# fault_tally OP INJECTED LOST: the figures of one operation, as a
# KILN-INFO line and a check that nothing was lost.
fault_tally() {
    echo "KILN-INFO $SCENARIO $1: injected $2 survived $(($2 - $3)) lost $3"
    expect_eq "$1-lost-nothing" 0 "$3"
}

# kill_during OUT TARGET CMD...: runs CMD (output to OUT) in the
# background and, after fault_next's delay below $FAULT_WINDOW ms, sends
# SIGKILL to TARGET: `cli` (CMD itself) or the first process matching a
# pid_of pattern. Sets STATUS to CMD's exit status and LANDED to 1 when
# the kill reached its target while CMD still ran (else 0: CMD won).
kill_during() {
    out=$1 target=$2
    shift 2
    "$@" > "$out" 2>&1 &
    cli=$!
    fault_next "$FAULT_WINDOW"
    sleep "$FAULT_DELAY"
    case $target in
        cli) pid=$cli ;;
        *) pid=$(pid_of "$target") ;;
    esac
    LANDED=0
    if [ -n "$pid" ] && [ "$(cut -d' ' -f3 "/proc/$cli/stat" 2>/dev/null)" != Z ] &&
        kill -9 "$pid" 2>/dev/null; then
        LANDED=1
    fi
    wait "$cli"
    STATUS=$?
    echo "KILN-INFO $SCENARIO kill $target ${FAULT_DELAY}s into: $*: landed $LANDED, status $STATUS"
}

# holds NAME CMD...: within one kill point, CMD succeeds; a failure is a
# check failing (named NAME) and marks the point lost (POINT_LOST=1).
holds() {
    name=$1
    shift
    if ! "$@" > "$WORK/holds.out" 2>&1; then
        POINT_LOST=1
        fail "$name" "command failed: $* ($(tail -c 200 "$WORK/holds.out" | tr '\n' '|'))"
    fi
}
