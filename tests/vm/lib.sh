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
        if tr '\0' ' ' 2>/dev/null < "$dir/cmdline" | grep -q "__vm --config $1"; then
            echo "${dir#/proc/}"
            return
        fi
    done
}

# status_field PID NAME: a field of /proc/PID/status, its first column.
status_field() {
    sed -n "s/^$2:[[:space:]]*\([^[:space:]]*\).*/\1/p" "/proc/$1/status"
}

# vm_jail PREFIX PID: while process PID runs, waits for a VM process
# whose definition is under PREFIX (a plain run's, a test's or a build
# step's: "$KILN_HOME/tmp/") and prints, read from /proc while it runs,
# its uid and its pids, this namespace's then its own PID namespace's
# ("UID PID NSPID"); nothing if none ran.
vm_jail() {
    while kill -0 "$2" 2>/dev/null; do
        pid=$(vm_pid "$1")
        if [ -n "$pid" ]; then
            echo "$(status_field "$pid" Uid) $(sed -n 's/^NSpid:[[:space:]]*//p' "/proc/$pid/status")"
            return
        fi
        sleep 0.1
    done
}

# expect_jailed NAME "UID PID NSPID" (vm_jail's line): the VM process ran
# as a jail's uid (above the jails' group, 900000 by default), as the
# init of a PID namespace of its own.
expect_jailed() {
    set -- "$1" $2
    if [ "${2:-0}" -gt 900000 ] && [ "$#" -eq 4 ] && [ "$4" = 1 ]; then pass "$1"
    else fail "$1" "expected a jail's uid and pid 1 in its own namespace, got '$2 $3 $4'"; fi
}

# Where a scenario's server listens for a host step's client: the test
# machine's NIC when nested (the harness forwards a host port to it),
# loopback when the scenarios run on the build host itself. The harness
# sets the address and port (xtask/src/harness/host_steps.rs).
HOST_STEP_LISTEN="${KILN_HOST_ADDRESS:-127.0.0.1}:$KILN_HOST_SERVE_PORT"

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
        if tr '\0' ' ' 2>/dev/null < "$dir/cmdline" | grep -q -- "$1"; then
            echo "${dir#/proc/}"
            return
        fi
    done
}

# fault_tally OP INJECTED LOST [SURVIVED]: the figures of one operation,
# as a KILN-INFO line and a check that nothing was lost. LOST counts the
# points whose checks failed, the kill landed or not; SURVIVED (default
# INJECTED - LOST) the landed kills whose checks all held.
fault_tally() {
    echo "KILN-INFO $SCENARIO $1: injected $2 survived ${4:-$(($2 - $3))} lost $3"
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

# fault_victim NAME: launches instance NAME counting (guest/counter.sh)
# and sets VM and VMM to pid_of patterns of its VM and VMM processes.
fault_victim() {
    id=$("$KILN" run vm-test:1.0.0 --detach --name "$1" --cmdline 'kiln.entrypoint=/tests/counter.sh' \
        2> "$WORK/launch.err")
    expect_eq launch-exit-status 0 "$?"
    wait_console "$1" "^count 3 " victim-counts
    VMM="__vmm $id "
    VM="__vm --config .*$id"
}

# fault_target POINT: whom point POINT kills: the VM process at every
# fifth point, the VMM process at every fifth but two, else the kiln
# command. (Either of the first two ends the instance, whose next boot
# costs the nested test machine a minute.)
fault_target() {
    case $(($1 % 5)) in 1) echo "$VM" ;; 3) echo "$VMM" ;; *) echo cli ;; esac
}

# settled TARGET: once a killed command's request, which may still be
# under way in the VMM, has had the time the operation takes to finish.
settled() {
    [ "$1" != cli ] || sleep $((FAULT_WINDOW / 1000 + 2))
}

# counts_on NAME CHECK: instance NAME runs (started again if it died) and
# its counter goes on within 120 s; else CHECK fails and the point is lost.
# A VM process killed a moment ago may still be recorded running until its
# supervisor reaps it: the state is looked at again while waiting.
counts_on() {
    before=$("$KILN" logs "$1" 2>/dev/null | grep -c '^count ')
    waited=0 restarted=0
    while [ "$("$KILN" logs "$1" 2>/dev/null | grep -c '^count ')" -le "$before" ] &&
        [ "$waited" -lt 120 ]; do
        state=$("$KILN" ps -a | awk -v name="$1" '$2 == name { print $5 }')
        if [ "$restarted" -eq 0 ] && { [ "$state" = stopped ] || [ "$state" = hibernated ]; }; then
            holds "$2-starts-again" "$KILN" start "$1"
            restarted=1
        fi
        sleep 1; waited=$((waited + 1))
    done
    [ "$waited" -lt 120 ] || { POINT_LOST=1; fail "$2-counts-on" "the counter of $1 stopped"; }
}

# fault_said CHECK OUT: after kill_during, a command the kill did not
# reach succeeded, and one that failed otherwise than by the SIGKILL said
# why in one line (its output in OUT); else the point is lost.
fault_said() {
    [ "$LANDED" -eq 1 ] || [ "$STATUS" -eq 0 ] ||
        { POINT_LOST=1; fail "$1-unkilled-fails" "$(tr '\n' '|' < "$2")"; }
    if [ "$STATUS" -ne 0 ] && [ "$STATUS" -ne 137 ] && [ "$(wc -l < "$2")" -gt 1 ]; then
        POINT_LOST=1; fail "$1-one-line" "$(tr '\n' '|' < "$2")"
    fi
}

# point_settled CHECK: after a kill point on the instance `victim`, `kiln
# ps` works and the victim counts on (started again if the kill ended
# it); the point's outcome joins the scenario's tally (lost, survived).
point_settled() {
    holds "$1-ps" "$KILN" ps -a
    counts_on victim "$1"
    lost=$((lost + POINT_LOST))
    survived=$((survived + LANDED * (1 - POINT_LOST)))
}

# containerd (tests/vm/containerd*.sh, cri.sh). containerd_setup
# [CRI_SECTION]: Debian's containerd with its state under
# $WORK/containerd, its CRI plugin configured by CRI_SECTION (off
# without one), L1 given a
# cgroup v2 hierarchy and the overlay module (the snapshotter's), started
# with start_containerd (again after a kill: $containerd_pid); ctr talks
# to it; busybox_image imports a one-layer docker-save archive of busybox
# (no registry) as $img.
containerd_setup() {
    insmod /lib/modules/overlay.ko 2> /dev/null
    # The L1 mounts no cgroup hierarchy of its own: give it a v2 one.
    if [ ! -e /sys/fs/cgroup/cgroup.controllers ]; then
        mkdir -p /sys/fs/cgroup && mount -t cgroup2 none /sys/fs/cgroup
    fi
    root=$WORK/containerd
    mkdir -p "$root" /run/containerd
    cat > "$root/config.toml" <<CONFIG
version = 2
root = "$root/root"
state = "/run/containerd"
[grpc]
  address = "$root/containerd.sock"
[plugins."io.containerd.grpc.v1.cri"]
${1:-  disable = true}
CONFIG
}
start_containerd() {
    KILN_GUEST_INIT=$KILN_INIT containerd --config "$root/config.toml" >> "$root/containerd.log" 2>&1 &
    containerd_pid=$!
    waited=0
    while ! ctr version > /dev/null 2>&1 && [ "$waited" -lt 60 ]; do
        sleep 1; waited=$((waited + 1))
    done
}
ctr() { command ctr -a "$root/containerd.sock" "$@"; }
kiln_run() { ctr run --runtime io.containerd.kiln.v2 "$@"; }
busybox_image() {
    image=$WORK/image
    # An /etc, as every real image has, where guest-init writes the pod's
    # resolv.conf.
    mkdir -p "$image/root/bin" "$image/root/etc" "$image/archive/l1"
    cp /bin/busybox "$image/root/bin/busybox"
    for applet in sh echo cat sleep tty stty mkdir httpd wget test; do ln -s busybox "$image/root/bin/$applet"; done
    (cd "$image/root" && tar -cf "$image/archive/l1/layer.tar" bin etc)
    diff_id=$(sha256sum "$image/archive/l1/layer.tar" | cut -d' ' -f1)
    printf '{"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": ["sha256:%s"]}, "config": {"Cmd": ["/bin/sh"]}}' \
        "$diff_id" > "$image/archive/config.json"
    printf '[{"Config": "config.json", "RepoTags": ["docker.io/library/bb:1"], "Layers": ["l1/layer.tar"]}]' \
        > "$image/archive/manifest.json"
    (cd "$image/archive" && tar -cf "$WORK/bb.tar" manifest.json config.json l1)
    ctr image import "$WORK/bb.tar" > "$WORK/import.txt" 2>&1
    expect_eq import-status 0 "$?"
    img=docker.io/library/bb:1
}
