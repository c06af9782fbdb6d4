#!/bin/sh
# Guest side of `cargo xtask bench snapshot`: says it is ready, then answers
# every line that arrives on the console (its stdin) with "got LINE". The
# benchmark times a cold boot to "echo-ready" and a restore, snapshotted
# while this waits in `read`, from writing "ping" to the answer "got ping".
echo echo-ready
while read -r line; do
    echo "got $line"
done
