# Fault injection (issue 23): 16 instances started, snapshotted,
# terminated, restored from their snapshots and terminated again, each
# step for all 16 at once (`&` and `wait`). No record is lost (32, all
# terminated), no tap is left (`ip link`), no VMM or VM process is left,
# and no instance cgroup is left.
. "$(dirname "$0")/lib.sh"

N=16
# The L1 mounts no cgroup hierarchy of its own: give it a v2 one.
if [ ! -e /sys/fs/cgroup/cgroup.controllers ]; then
    mkdir -p /sys/fs/cgroup && mount -t cgroup2 none /sys/fs/cgroup
fi
taps_before=$(ip -o link | grep -c ' kt-')

# all STEP CMD...: CMD for each n of 1..N at once ("{}" in CMD stands for
# n); counts those that failed in FAILED, their output kept.
all() {
    step=$1
    shift
    n=0
    while [ "$n" -lt "$N" ]; do
        n=$((n + 1))
        words=$(printf '%s\n' "$@" | sed "s/{}/$n/g" | tr '\n' ' ')
        (eval "$words" > "$WORK/$step$n.txt" 2>&1; echo $? > "$WORK/$step$n.status") &
    done
    wait
    FAILED=$(cat "$WORK/$step"*.status | grep -cv '^0$')
    echo "KILN-INFO $SCENARIO $step: $N at once, $FAILED failed"
    [ "$FAILED" -eq 0 ] || grep -h . $(grep -lv '^0$' "$WORK/$step"*.status | sed 's/status$/txt/') |
        head -n 5 | sed "s/^/KILN-INFO $SCENARIO $step failure: /"
    lost=$((lost + FAILED))
}

# is_running NAME: `kiln ps` shows instance NAME running.
is_running() { "$KILN" ps | grep -q " $1 .*running"; }

lost=0
start=$(now_ms)
all launch "$KILN" run vm-test:1.0.0 --detach --name c{} --memory 64 --cmdline kiln.entrypoint=/tests/life.sh
all snapshot "$KILN" snapshot create c{} "$WORK/s{}"
all terminate "$KILN" terminate c{}
all restore "$KILN" snapshot restore "$WORK/s{}" --name r{}
all running is_running r{}
all terminate-restored "$KILN" terminate r{}
echo "KILN-INFO $SCENARIO the four steps of $N instances took $(($(now_ms) - start)) ms"

"$KILN" ps -a > "$WORK/ps.txt" 2>&1
expect_eq every-record-kept $((2 * N)) "$(grep -c ' terminated' "$WORK/ps.txt")"
expect_eq no-tap-left "$taps_before" "$(ip -o link | grep -c ' kt-')"
expect_eq no-vmm-process-left "" "$(pid_of '__vmm i-')"
expect_eq no-vm-process-left "" "$(pid_of '__vm --config')"
expect_eq no-cgroup-left "" "$(ls /sys/fs/cgroup/kiln 2>/dev/null | grep '^i-')"
fault_tally concurrent "$((6 * N))" "$lost"
