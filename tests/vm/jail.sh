# The jail, on by default: an instance's VM process runs as an unprivileged
# uid leased for its life (a restored instance running beside it has
# another), with no capabilities and no_new_privs, in its own mount,
# PID, IPC and UTS namespaces, under a root that holds only /dev/kvm and
# what its definition names, with Firecracker's open-file limit, in a
# cgroup v2 group of its own; the guest's network (a tap the supervisor
# made and passed) still works, a snapshot written jailed restores into
# another jailed instance, hibernate and start resume it, and stopping
# removes the group. `--no-jail` is said to be for debugging.
. "$(dirname "$0")/lib.sh"

# The L1 mounts no cgroup hierarchy of its own: give it a v2 one.
if [ ! -e /sys/fs/cgroup/cgroup.controllers ]; then
    mkdir -p /sys/fs/cgroup && mount -t cgroup2 none /sys/fs/cgroup
fi

"$KILN" doctor > "$WORK/doctor.txt" 2>&1
expect_contains doctor-says-jail-on "$WORK/doctor.txt" "^jail: on: "
expect_contains doctor-finds-every-kvm-capability "$WORK/doctor.txt" "^KVM: every capability Kiln needs"
"$KILN" --no-jail doctor > "$WORK/no-jail.txt" 2> "$WORK/no-jail.err"
expect_contains no-jail-doctor-says-off "$WORK/no-jail.txt" "^jail: OFF (KILN_JAIL=0)"
expect_contains no-jail-warns-on-stderr "$WORK/no-jail.err" "WARNING: the jail is off.*debugging only"

id=$("$KILN" run web:1.0.0 --detach --name jailed 2> "$WORK/launch.err")
expect_eq launch-exit-status 0 "$?"
sed 's/^/KILN-INFO launch: /' "$WORK/launch.err"
pid=$(vm_pid "$KILN_HOME/instances/$id/")
# Why the VM process ended, should it have: for the log.
diagnose() {
    "$KILN" ps -a 2>&1 | sed 's/^/KILN-INFO ps: /'
    "$KILN" logs jailed 2>&1 | tail -n 8 | sed 's/^/KILN-INFO console: /'
}
[ -n "$pid" ] || diagnose
check vm-process-found [ -n "$pid" ]
uid=$(status_field "$pid" Uid)
check runs-as-an-unprivileged-uid [ "$uid" -gt 900000 ]
check uid-is-leased [ -e "/run/kiln/jail-uids/$uid" ]
sleep 2
[ -e "/proc/$pid" ] || diagnose
expect_eq gid-is-the-uid "$uid" "$(status_field "$pid" Gid)"
expect_eq only-the-jails-group 900000 "$(sed -n 's/^Groups:[[:space:]]*//p' "/proc/$pid/status" | tr -d ' \t')"
expect_eq no-capabilities 0000000000000000 "$(status_field "$pid" CapEff)"
expect_eq no-bounding-capabilities 0000000000000000 "$(status_field "$pid" CapBnd)"
expect_eq no-new-privs 1 "$(status_field "$pid" NoNewPrivs)"
expect_eq init-of-its-pid-namespace "$pid 1" "$(sed -n 's/^NSpid:[[:space:]]*//p' "/proc/$pid/status" | tr '\t' ' ')"
for ns in mnt pid ipc uts; do
    check "own-$ns-namespace" [ "$(readlink "/proc/$pid/ns/$ns")" != "$(readlink "/proc/self/ns/$ns")" ]
done
expect_eq shares-the-host-network-namespace "$(readlink /proc/self/ns/net)" "$(readlink "/proc/$pid/ns/net")"
ls -A "/proc/$pid/root/" > "$WORK/root.txt" 2>&1
expect_contains root-has-kvm "$WORK/root.txt" "^dev$"
check root-has-only-kvm-in-dev [ "$(ls -A "/proc/$pid/root/dev")" = kvm ]
check root-has-no-tun [ ! -e "/proc/$pid/root/dev/net/tun" ]
check root-has-no-proc [ ! -e "/proc/$pid/root/proc/self" ]
expect_eq proc-has-cpuinfo-alone cpuinfo "$(ls -A "/proc/$pid/root/proc")"
check root-has-no-shell [ ! -e "/proc/$pid/root/bin/sh" ]
check kiln-binary-is-read-only sh -c "! touch '/proc/$pid/root$KILN' 2> /dev/null"
check root-has-the-instance-dir [ -e "/proc/$pid/root$KILN_HOME/instances/$id/vm.json" ]
expect_eq root-has-no-other-instance "$id" "$(ls -A "/proc/$pid/root$KILN_HOME/instances")"
# Its image's hydration cache, its two files alone and read-only: the
# supervisor fills it.
ls -A "/proc/$pid/root$KILN_HOME/cache" > "$WORK/cache.txt" 2>&1
expect_eq root-has-its-images-cache-files 2 "$(grep -c '[.]\(raw\|present\)$' "$WORK/cache.txt")"
check hydration-cache-is-read-only sh -c "! touch /proc/$pid/root$KILN_HOME/cache/*.raw 2> /dev/null"
expect_contains open-files-limit "/proc/$pid/limits" "Max open files *2048 *2048"
group=/sys/fs/cgroup/kiln/$id
expect_contains in-its-cgroup "/proc/$pid/cgroup" "^0::/kiln/$id$"
expect_eq cgroup-cpu-max "100000 100000" "$(cat "$group/cpu.max")"
expect_eq cgroup-memory-max $(( (128 + 128) * 1048576 )) "$(cat "$group/memory.max")"
expect_eq cgroup-pids-max 17 "$(cat "$group/pids.max")"
"$KILN" ps --format json > "$WORK/ps.json" 2>&1
expect_contains ps-shows-the-uid "$WORK/ps.json" "\"uid\": *$uid"
expect_contains ps-shows-the-memory-limit "$WORK/ps.json" "\"memory_max\": *$(( (128 + 128) * 1048576 ))"

# The guest's network works through the passed tap.
address=$(sed -n 's/^ *"address": "\([^"]*\)".*/\1/p' "$KILN_HOME/instances/$id/instance.json")
deadline=$(( $(date +%s) + 300 ))
until printf 'GET / HTTP/1.0\r\n\r\n' | nc -w 10 "$address" 80 > "$WORK/page.html" 2>&1 \
    && grep -q "200 OK" "$WORK/page.html" || [ "$(date +%s)" -ge "$deadline" ]; do sleep 2; done
expect_contains page-from-the-jailed-guest "$WORK/page.html" "Hello from a Kiln microVM"

# A snapshot written jailed restores into another jailed instance.
check snapshot-create "$KILN" snapshot create jailed "$WORK/snap"
check snapshot-is-whole [ -f "$WORK/snap/state" ] && [ -f "$WORK/snap/memory" ]
echo "KILN-INFO jailed VM process (128 MiB guest) memory.peak after a snapshot: $(cat "$group/memory.peak" 2>&1) bytes"
check exchange-left-empty [ -z "$(ls -A "$KILN_HOME/instances/$id/snapshot-out")" ]
restored=$("$KILN" snapshot restore "$WORK/snap" --name restored --network none 2> "$WORK/restore.err")
expect_eq restore-exit-status 0 "$?"
"$KILN" ps > "$WORK/ps-restored.txt" 2>&1
expect_contains restored-runs "$WORK/ps-restored.txt" "restored .*running"
rpid=$(vm_pid "$KILN_HOME/instances/$restored/")
ruid=$(status_field "$rpid" Uid)
check restored-is-jailed [ "$ruid" -gt 900000 ]
check restored-has-a-uid-of-its-own [ "$ruid" != "$uid" ]
check terminate-restored "$KILN" terminate restored

# Hibernate and resume, jailed.
check hibernate "$KILN" stop --hibernate jailed
check group-removed-on-stop [ ! -d "$group" ]
check start-resumes "$KILN" start jailed
get_again() {
    printf 'GET / HTTP/1.0\r\n\r\n' | nc -w 10 "$address" 80 > "$WORK/again.html" 2>&1
    grep -q "200 OK" "$WORK/again.html"
}
check page-after-resume get_again
check resumed-jailed [ "$(status_field "$(vm_pid "$KILN_HOME/instances/$id/")" Uid)" = "$uid" ]
check terminate "$KILN" terminate jailed
check no-group-left [ ! -d "$group" ]
