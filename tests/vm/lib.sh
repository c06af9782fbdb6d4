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
