#!/bin/sh
# Runs the named scenarios (tests/vm/<name>.sh), one after the other, each
# under a time limit. The same runner serves the
# nested harness (inside L1) and a hardware-KVM host (directly).
# Expects KILN, KILN_KERNEL, KILN_INIT, KILN_ASSETS, KILN_IMAGES, QEMU and
# WORK_ROOT. Each scenario gets a Kiln home of its own (KILN_HOME) whose
# image store is the one the harness built.
here=$(dirname "$0")
limit=${KILN_SCENARIO_TIMEOUT:-600}
for scenario in "$@"; do
    echo "KILN-SCENARIO $scenario"
    WORK="$WORK_ROOT/$scenario"
    rm -rf "$WORK" && mkdir -p "$WORK/home"
    ln -s "$KILN_IMAGES" "$WORK/home/images"
    export KILN_HOME="$WORK/home"
    SCENARIO=$scenario WORK=$WORK timeout "$limit" sh "$here/$scenario.sh"
    status=$?
    [ "$status" -eq 0 ] || echo "KILN-TEST $scenario/script FAIL exited with status $status (124/143: over ${limit}s)"
    # The scratch files live in the test machine's RAM (the L1's tmpfs):
    # the next scenario gets them back.
    echo "KILN-INFO $scenario left $(du -sm "$WORK" | cut -f1) MiB of scratch; $(grep MemAvailable /proc/meminfo)"
    rm -rf "$WORK"
done
