# Fault injection (issue 23): kill -9 of `kiln commit` of a stopped
# instance at 20 seeded random points (tests/vm/store-faults.sh).
. "$(dirname "$0")/lib.sh"
. "$(dirname "$0")/store-faults.sh"

"$KILN" run vm-test:1.0.0 --detach --name src --cmdline 'kiln.entrypoint="/tests/commit.sh write"' \
    > /dev/null 2> "$WORK/launch.err"
wait_console src "commit: written" guest-wrote
check stop "$KILN" stop src
commit() { exec "$KILN" commit src "$(reference commit "$1")"; }
inject commit

"$KILN" terminate src > /dev/null 2>&1
