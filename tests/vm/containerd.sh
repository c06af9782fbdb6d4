# containerd with containerd-shim-kiln-v2: Debian's containerd and ctr run
# containers as Kiln VMs. A docker-save archive made here (busybox, no
# registry) is imported with `ctr image import`; `ctr run --rm` gives back
# stdout and the exit code, also on a terminal (-t); a detached container
# takes `ctr task exec`; two run at once; containerd restarted with a task running still has it, and
# it can be killed and deleted; an absurd memory limit fails Create with
# its reason and leaves nothing behind.
. "$(dirname "$0")/lib.sh"

insmod /lib/modules/overlay.ko 2> /dev/null
root=$WORK/containerd
mkdir -p "$root" /run/containerd
cat > "$root/config.toml" <<EOF
version = 2
root = "$root/root"
state = "/run/containerd"
[grpc]
  address = "$root/containerd.sock"
[plugins."io.containerd.grpc.v1.cri"]
  disable = true
EOF
start_containerd() {
    KILN_GUEST_INIT=$KILN_INIT containerd --config "$root/config.toml" >> "$root/containerd.log" 2>&1 &
    containerd_pid=$!
    waited=0
    while ! ctr -a "$root/containerd.sock" version > /dev/null 2>&1 && [ "$waited" -lt 60 ]; do
        sleep 1; waited=$((waited + 1))
    done
}
ctr() { command ctr -a "$root/containerd.sock" "$@"; }
start_containerd
check containerd-serves ctr version

# A one-layer docker-save archive of busybox.
image=$WORK/image
mkdir -p "$image/root/bin" "$image/archive/l1"
cp /bin/busybox "$image/root/bin/busybox"
for applet in sh echo cat sleep tty stty; do ln -s busybox "$image/root/bin/$applet"; done
(cd "$image/root" && tar -cf "$image/archive/l1/layer.tar" bin)
diff_id=$(sha256sum "$image/archive/l1/layer.tar" | cut -d' ' -f1)
printf '{"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": ["sha256:%s"]}, "config": {"Cmd": ["/bin/sh"]}}' \
    "$diff_id" > "$image/archive/config.json"
printf '[{"Config": "config.json", "RepoTags": ["docker.io/library/bb:1"], "Layers": ["l1/layer.tar"]}]' \
    > "$image/archive/manifest.json"
(cd "$image/archive" && tar -cf "$WORK/bb.tar" manifest.json config.json l1)
ctr image import "$WORK/bb.tar" > "$WORK/import.txt" 2>&1
expect_eq import-status 0 "$?"
img=docker.io/library/bb:1
kiln_run() { ctr run --runtime io.containerd.kiln.v2 "$@"; }

# The container's stdout and exit code come back.
kiln_run --rm "$img" first sh -c 'echo "hello from a microVM"; exit 3' \
    < /dev/null > "$WORK/first.txt" 2>&1
expect_eq run-exit-code 3 "$?"
expect_contains run-stdout "$WORK/first.txt" '^hello from a microVM$'
expect_eq run-rm-leaves-no-container "" "$(ctr container ls -q)"

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
kiln_run -d "$img" one sleep 600 > "$WORK/one.txt" 2>&1
kiln_run -d "$img" two sleep 600 > "$WORK/two.txt" 2>&1
ctr task exec --exec-id e1 one sh -c 'echo exec in one; exit 5' < /dev/null > "$WORK/exec.txt" 2>&1
expect_eq exec-exit-code 5 "$?"
expect_contains exec-stdout "$WORK/exec.txt" '^exec in one$'
ctr task ls > "$WORK/tasks.txt" 2>&1
expect_eq two-running "2" "$(grep -c RUNNING "$WORK/tasks.txt")"
# The VMs' consoles, for a failure's reader.
tail -n 3 "$KILN_HOME"/containers/*/console.log 2>&1 | sed 's/^/KILN-INFO console: /'
expect_eq rootfs-cached-once "1" "$(ls "$KILN_HOME/containers/rootfs" | grep -c '\.kiln$')"

# containerd restarted: the task is still there, and can be killed and deleted.
kill "$containerd_pid"; wait "$containerd_pid" 2> /dev/null
start_containerd
ctr task ls > "$WORK/after-restart.txt" 2>&1
expect_contains task-survives-restart "$WORK/after-restart.txt" '^one .*RUNNING'
ctr task kill -s SIGKILL one > "$WORK/kill.txt" 2>&1
expect_eq kill-status 0 "$?"
waited=0
while ! ctr task ls | grep -q '^one .*STOPPED' && [ "$waited" -lt 60 ]; do sleep 1; waited=$((waited + 1)); done
ctr task delete one > "$WORK/delete.txt" 2>&1
expect_eq delete-status 0 "$?"
ctr task kill -s SIGKILL two > /dev/null 2>&1
sleep 2; ctr task delete two > /dev/null 2>&1
ctr container rm one two > /dev/null 2>&1
left=$(ls "$KILN_HOME/containers" | grep -v rootfs)
expect_eq delete-leaves-nothing "" "$left"

# Bad input fails Create with its reason, and leaves nothing behind.
kiln_run --rm --memory-limit 1125899906842624 "$img" big true < /dev/null > "$WORK/big.txt" 2>&1
expect_eq absurd-memory-refused 1 "$?"
expect_contains absurd-memory-reason "$WORK/big.txt" 'linux.resources.memory.limit 1125899906842624: expected 64 MiB to'
expect_eq absurd-memory-leaves-nothing "" "$(ls "$KILN_HOME/containers" | grep -v rootfs)"

kill "$containerd_pid"; wait "$containerd_pid" 2> /dev/null
