# kiln exec: another process in a running instance, through guest-init over
# vsock: its stdout and stderr apart, its exit status, stdin with -i, -e,
# -w and a numeric -u; a terminal with -t; a program that is not there is refused with 127, and
# a stopped instance is named.
. "$(dirname "$0")/lib.sh"

"$KILN" run vm-test:1.0.0 --detach --name ex --network none \
    --cmdline 'kiln.entrypoint="/bin/sleep 600"' > "$WORK/id.txt" 2> "$WORK/launch.err"
expect_eq launch-exit-status 0 "$?"

"$KILN" exec ex -- /bin/sh -c 'echo out; echo err >&2; exit 4' > "$WORK/out.txt" 2> "$WORK/err.txt"
expect_eq exec-exit-status 4 "$?"
expect_contains exec-stdout "$WORK/out.txt" '^out$'
expect_contains exec-stderr "$WORK/err.txt" '^err$'

echo typed | "$KILN" exec -i -e GREETING=hi -w /tmp -u 1000:1000 ex \
    -- /bin/sh -c 'read line; echo "$line $GREETING $(pwd) $(id -u):$(id -g)"' > "$WORK/in.txt" 2>&1
expect_eq exec-interactive-status 0 "$?"
expect_contains exec-stdin-env-workdir-user "$WORK/in.txt" '^typed hi /tmp 1000:1000$'

"$KILN" exec ex -- /no/such/program > "$WORK/missing.txt" 2>&1
expect_eq exec-missing-program-status 127 "$?"
expect_contains exec-missing-program-named "$WORK/missing.txt" '/no/such/program'

# -t: the process gets a terminal of the caller's size, which follows the
# caller's when it changes (xtask pty gives this test a terminal, types
# the shell's input into it, and resizes it once the first size is out).
printf 'tty; stty size; read x; stty size; exit 3\n' |
    "$XTASK" pty --rows 40 --cols 100 --resize 50x120 --after '40 100' \
    -- "$KILN" exec -i -t ex -- /bin/sh > "$WORK/tty.txt" 2>&1
expect_eq exec-tty-status 3 "$?"
expect_contains exec-tty-is-a-terminal "$WORK/tty.txt" '^/dev/pts/[0-9]'
expect_contains exec-tty-has-the-callers-size "$WORK/tty.txt" '^40 100'
expect_contains exec-tty-follows-a-resize "$WORK/tty.txt" '^50 120'

"$KILN" stop ex > "$WORK/stop.txt" 2>&1
"$KILN" exec ex -- /bin/true > "$WORK/stopped.txt" 2>&1
expect_eq exec-needs-a-running-vm 1 "$?"
expect_contains exec-says-it-is-not-running "$WORK/stopped.txt" 'instance ex is [a-z]*: exec needs a running VM'
"$KILN" terminate ex > "$WORK/terminate.txt" 2>&1
