# containerd with containerd-shim-kiln-v2: Debian's containerd and ctr run
# containers as Kiln VMs. A docker-save archive made here (busybox, no
# registry) is imported with `ctr image import`; `ctr run --rm` gives back
# stdout and the exit code, also on a terminal (-t); a detached container
# takes `ctr task exec`; two run at once; containerd restarted with a task
# running still has it, and it can be killed and deleted; a container
# whose shim is killed is cleaned up; an absurd memory limit fails Create
# with its reason and leaves nothing behind. Bind mounts are copied in,
# one read-only; a tmpfs mount elsewhere is refused. A pod (CRI's two annotations,
# set through ctr) runs its containers in one VM, each on its own root
# disk (a spare drive filled at Create), reaching each other over
# loopback; a member goes alone, the sandbox takes the VM with it. The containers' VM processes
# are jailed (an unprivileged uid, a mount namespace of their own, the
# spec's memory and vCPUs as their cgroup, removed with the container),
# unless the shim has KILN_JAIL=0, which its log says.
. "$(dirname "$0")/lib.sh"

containerd_setup
start_containerd
check containerd-serves ctr version
busybox_image

# The container's stdout and exit code come back.
kiln_run --rm "$img" first sh -c 'echo "hello from a microVM"; exit 3' \
    < /dev/null > "$WORK/first.txt" 2>&1
expect_eq run-exit-code 3 "$?"
expect_contains run-stdout "$WORK/first.txt" '^hello from a microVM$'
expect_eq run-rm-leaves-no-container "" "$(ctr container ls -q)"

# Bind mounts are copied into the VM: a directory, read-only (laid out as
# a ConfigMap's, a link into ..data), and a file; /dev/shm is a tmpfs.
mkdir -p "$WORK/config/..data"
echo 'level = debug' > "$WORK/config/..data/app.conf"
ln -s ..data/app.conf "$WORK/config/app.conf"
echo 'a file of its own' > "$WORK/note.txt"
kiln_run --rm --mount "type=bind,src=$WORK/config,dst=/etc/app,options=rbind:ro" \
    --mount "type=bind,src=$WORK/note.txt,dst=/srv/note.txt,options=rbind:rw" "$img" binds \
    sh -c 'cat /etc/app/app.conf /srv/note.txt; echo x > /etc/app/new && echo writable
        busybox grep -q " /dev/shm tmpfs " /proc/mounts && echo shm-is-tmpfs' \
    < /dev/null > "$WORK/binds.txt" 2>&1
expect_eq binds-exit-code 0 "$?"
expect_contains bind-directory-copied "$WORK/binds.txt" '^level = debug$'
expect_contains bind-file-copied "$WORK/binds.txt" '^a file of its own$'
expect_eq bind-read-only 0 "$(grep -c '^writable$' "$WORK/binds.txt")"
expect_contains dev-shm-is-tmpfs "$WORK/binds.txt" '^shm-is-tmpfs$'
# A mount the VM cannot have is refused at Create, naming it.
kiln_run --rm --mount "type=tmpfs,src=tmpfs,dst=/scratch" "$img" scratch true \
    < /dev/null > "$WORK/scratch.txt" 2>&1
expect_eq tmpfs-mount-refused 1 "$?"
expect_contains tmpfs-mount-reason "$WORK/scratch.txt" 'mount /scratch (type tmpfs): expected a bind mount'

# -t: the container's process has a terminal of ctr's size (xtask pty
# gives ctr one), and its exit code comes back. Unanchored: the ^D that
# ends the empty input reaches the terminal before ctr makes it raw, and
# comes out as a NUL ahead of the first line.
printf '' | "$XTASK" pty --rows 30 --cols 90 -- ctr -a "$root/containerd.sock" \
    run -t --runtime io.containerd.kiln.v2 --rm "$img" tty1 sh -c 'tty; stty size; exit 6' \
    > "$WORK/tty.txt" 2>&1
expect_eq run-tty-exit-code 6 "$?"
expect_contains run-tty-is-a-terminal "$WORK/tty.txt" '/dev/pts/[0-9]'
expect_contains run-tty-has-ctrs-size "$WORK/tty.txt" '^30 90'

# Two at once; exec into one; the second container of the image built nothing.
kiln_run -d --memory-limit $((192 << 20)) "$img" one sleep 600 > "$WORK/one.txt" 2>&1
kiln_run -d "$img" two sleep 600 > "$WORK/two.txt" 2>&1
ctr task exec --exec-id e1 one sh -c 'echo exec in one; exit 5' < /dev/null > "$WORK/exec.txt" 2>&1
expect_eq exec-exit-code 5 "$?"
expect_contains exec-stdout "$WORK/exec.txt" '^exec in one$'
ctr task ls > "$WORK/tasks.txt" 2>&1
expect_eq two-running "2" "$(grep -c RUNNING "$WORK/tasks.txt")"
# The VMs' consoles, for a failure's reader.
tail -n 3 "$KILN_HOME"/containers/*/console.log 2>&1 | sed 's/^/KILN-INFO console: /'
expect_eq rootfs-cached-once "1" "$(ls "$KILN_HOME/containers/rootfs" | grep -c '\.kiln$')"

# Their VM processes are jailed: one's (192 MiB, 1 vCPU) runs as a jail's
# uid with no capabilities, in a mount namespace other than its shim's
# (its parent's), in a cgroup with the spec's limits.
pid=$(ctr task ls | awk '$1 == "one" { print $2 }')
check vm-process-found test -e "/proc/${pid:-0}/status"
uid=$(status_field "$pid" Uid)
check vm-runs-as-a-jail-uid [ "${uid:-0}" -gt 900000 ]
expect_eq vm-has-no-capabilities 0000000000000000 "$(status_field "$pid" CapEff)"
shim=$(status_field "$pid" PPid)
check vm-parent-is-the-shim grep -q containerd-shim-kiln-v2 "/proc/${shim:-0}/cmdline"
check vm-has-its-own-mount-namespace \
    [ "$(readlink "/proc/$pid/ns/mnt")" != "$(readlink "/proc/$shim/ns/mnt")" ]
expect_contains vm-in-its-cgroup "/proc/$pid/cgroup" '^0::/kiln/containerd-[0-9a-f]*$'
group=/sys/fs/cgroup$(sed -n 's/^0:://p' "/proc/$pid/cgroup")
expect_eq cgroup-memory-is-the-spec-and-allowance $(( (192 + 128) << 20 )) "$(cat "$group/memory.max")"
expect_eq cgroup-cpu-is-one-vcpu "100000 100000" "$(cat "$group/cpu.max")"
uid_two=$(status_field "$(ctr task ls | awk '$1 == "two" { print $2 }')" Uid)
check two-has-a-jail-uid-of-its-own [ "${uid_two:-0}" -gt 900000 -a "$uid_two" != "$uid" ]

# A pod, as CRI makes one: the sandbox, then a member naming it. The
# member's shim is the sandbox's, and its root disk fills the first spare
# drive (the guest's vdb) of the sandbox's VM, jailed: one VM process for
# both, one kernel (boot_id), two roots, one loopback.
pod_run() {
    kiln_run -d --annotation io.kubernetes.cri.container-type="$1" \
        --annotation io.kubernetes.cri.sandbox-id="$2" "$img" "$3" sh -c "$4" \
        < /dev/null > "$WORK/pod-$3.txt" 2>&1
}
task_pid() { ctr task ls | awk -v id="$1" '$1 == id { print $2 }'; }
pod_run sandbox pod1 pod1 'mkdir -p /www && echo served by the sandbox > /www/index.html && exec httpd -f -p 8080 -h /www'
expect_eq pod-sandbox-created 0 "$?"
pod_run container pod1 web 'exec sleep 600'
expect_eq pod-member-created 0 "$?"
pod_pid=$(task_pid pod1)
check pod-one-vm-process [ -n "$pod_pid" -a "$pod_pid" = "$(task_pid web)" ]
ctr task exec --exec-id m1 web sh -c '
    for try in 1 2 3 4 5 6 7 8 9 10; do wget -q -O - http://127.0.0.1:8080/ && break; sleep 1; done
    cat /proc/sys/kernel/random/boot_id
    test -e /www || echo own root
    cat /proc/self/mounts' < /dev/null > "$WORK/pod-member.txt" 2>&1
expect_eq pod-member-exec-status 0 "$?"
expect_contains pod-member-reaches-the-sandbox-over-loopback "$WORK/pod-member.txt" '^served by the sandbox$'
expect_contains pod-member-has-its-own-root "$WORK/pod-member.txt" '^own root$'
expect_contains pod-member-root-is-the-first-spare-drive "$WORK/pod-member.txt" '^/dev/vdb / ext4 '
ctr task exec --exec-id s1 pod1 cat /proc/sys/kernel/random/boot_id < /dev/null > "$WORK/pod-boot-id.txt" 2>&1
boot_id=$(cat "$WORK/pod-boot-id.txt")
check pod-one-kernel grep -qx "${boot_id:-no boot_id}" "$WORK/pod-member.txt"
# An exec into the member on a terminal (its root's /dev/pts) of ctr's size.
printf '' | "$XTASK" pty --rows 20 --cols 70 -- ctr -a "$root/containerd.sock" \
    task exec -t --exec-id m2 web sh -c 'tty; stty size' > "$WORK/pod-tty.txt" 2>&1
expect_contains pod-member-exec-on-a-terminal "$WORK/pod-tty.txt" '/dev/pts/[0-9]'
expect_contains pod-member-terminal-has-ctrs-size "$WORK/pod-tty.txt" '^20 70'
# The member's disk is in the sandbox's directory, given to the jailed
# VM process's uid.
overlay=$(ls -d "$KILN_HOME"/containers/*/members/*/root.overlay 2> /dev/null)
check pod-member-disk-in-the-sandboxs-dir [ -n "$overlay" ]
expect_eq pod-member-disk-given-to-the-vm-process "$(status_field "${pod_pid:-0}" Uid)" \
    "$(ls -ln "${overlay:-/none}" | awk '{ print $3 }')"
# The member's end leaves the sandbox running; its delete takes its files.
ctr task exec --exec-id mk web sh -c 'echo first > /first-member' < /dev/null > /dev/null 2>&1
ctr task kill -s SIGKILL web > /dev/null 2>&1
waited=0
while ! ctr task ls | grep -q '^web .*STOPPED' && [ "$waited" -lt 30 ]; do sleep 1; waited=$((waited + 1)); done
ctr task delete web > "$WORK/pod-delete-web.txt" 2>&1
expect_eq pod-member-deleted 0 "$?"
ctr task exec --exec-id s2 pod1 wget -q -O - http://127.0.0.1:8080/ < /dev/null > "$WORK/pod-after.txt" 2>&1
expect_contains pod-sandbox-outlives-its-member "$WORK/pod-after.txt" '^served by the sandbox$'
expect_eq pod-member-files-removed "" "$(ls "$KILN_HOME"/containers/*/members 2> /dev/null)"
# Its drive was given back (its root released in the guest, then the
# drive detached): the next member fills the same drive, with a root of
# its own, and its delete gives the drive back again.
pod_run container pod1 web2 'exec sleep 600'
expect_eq pod-next-member-created 0 "$?"
ctr task exec --exec-id m3 web2 sh -c 'cat /proc/self/mounts; test -e /first-member || echo fresh-root' \
    < /dev/null > "$WORK/pod-member2.txt" 2>&1
expect_contains pod-next-member-reuses-the-drive "$WORK/pod-member2.txt" '^/dev/vdb / ext4 '
expect_contains pod-next-member-has-a-fresh-root "$WORK/pod-member2.txt" '^fresh-root$'
ctr task kill -s SIGKILL web2 > /dev/null 2>&1
waited=0
while ! ctr task ls | grep -q '^web2 .*STOPPED' && [ "$waited" -lt 30 ]; do sleep 1; waited=$((waited + 1)); done
ctr task delete web2 > "$WORK/pod-delete-web2.txt" 2>&1
expect_eq pod-next-member-deleted 0 "$?"
# A member whose sandbox this shim does not have is refused at Create.
pod_run container nopod stray 'true'
expect_contains pod-member-without-its-sandbox-refused "$WORK/pod-stray.txt" 'pod sandbox "nopod" is not in this shim'
# The sandbox's delete ends the VM and removes the pod's files.
ctr task kill -s SIGKILL pod1 > /dev/null 2>&1
waited=0
while ! ctr task ls | grep -q '^pod1 .*STOPPED' && [ "$waited" -lt 30 ]; do sleep 1; waited=$((waited + 1)); done
ctr task delete pod1 > "$WORK/pod-delete.txt" 2>&1
expect_eq pod-sandbox-deleted 0 "$?"
check pod-vm-ended [ ! -e "/proc/${pod_pid:-0}" ]
ctr container rm pod1 web web2 stray > /dev/null 2>&1
expect_eq pod-leaves-only-one-and-two "2" "$(ls "$KILN_HOME/containers" | grep -vc rootfs)"

# containerd restarted: the task is still there, and can be killed and
# deleted. The shims it starts from now on have the jail off.
kill "$containerd_pid"; wait "$containerd_pid" 2> /dev/null
KILN_JAIL=0
export KILN_JAIL
start_containerd
ctr task ls > "$WORK/after-restart.txt" 2>&1
expect_contains task-survives-restart "$WORK/after-restart.txt" '^one .*RUNNING'
ctr task kill -s SIGKILL one > "$WORK/kill.txt" 2>&1
expect_eq kill-status 0 "$?"
waited=0
while ! ctr task ls | grep -q '^one .*STOPPED' && [ "$waited" -lt 60 ]; do sleep 1; waited=$((waited + 1)); done
ctr task delete one > "$WORK/delete.txt" 2>&1
expect_eq delete-status 0 "$?"
# A shim killed with its container running: containerd's `shim delete`
# kills what is left of its VM with the jail's cgroup, which goes.
two_pid=$(ctr task ls | awk '$1 == "two" { print $2 }')
group_two=/sys/fs/cgroup$(sed -n 's/^0:://p' "/proc/${two_pid:-0}/cgroup")
check two-in-a-group-of-its-own [ "$group_two" != "$group" -a -d "$group_two" ]
kill -9 "$(status_field "${two_pid:-0}" PPid)"
waited=0
while [ -d "$group_two" ] && [ "$waited" -lt 30 ]; do sleep 1; waited=$((waited + 1)); done
check killed-shims-group-removed [ ! -d "$group_two" ]
ctr task delete two > /dev/null 2>&1
ctr container rm one two > /dev/null 2>&1
left=$(ls "$KILN_HOME/containers" | grep -v rootfs)
expect_eq delete-leaves-nothing "" "$left"
expect_eq delete-leaves-no-cgroup "" "$(ls /sys/fs/cgroup/kiln 2> /dev/null | grep '^containerd-')"

# KILN_JAIL=0: containers still run, and the shim's log says the jail is off.
kiln_run --rm "$img" unjailed sh -c 'exit 4' < /dev/null > "$WORK/unjailed.txt" 2>&1
expect_eq unjailed-exit-code 4 "$?"
expect_contains unjailed-said-in-the-shim-log "$root/containerd.log" 'the jail is off (KILN_JAIL=0)'

# Bad input fails Create with its reason, and leaves nothing behind.
kiln_run --rm --memory-limit 1125899906842624 "$img" big true < /dev/null > "$WORK/big.txt" 2>&1
expect_eq absurd-memory-refused 1 "$?"
expect_contains absurd-memory-reason "$WORK/big.txt" 'linux.resources.memory.limit 1125899906842624: expected 64 MiB to'
expect_eq absurd-memory-leaves-nothing "" "$(ls "$KILN_HOME/containers" | grep -v rootfs)"

kill "$containerd_pid"; wait "$containerd_pid" 2> /dev/null
