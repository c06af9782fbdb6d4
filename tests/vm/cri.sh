# The CRI path without a kubelet: containerd's CRI plugin, driven through
# its socket by kiln-cri-client (tests/cri-client, on the k8s-cri crate),
# as a kubelet would drive it. A pod is run with a runtime handler
# (RunPodSandbox: its pause container from an image this test builds and
# imports, and a network namespace from a CNI bridge with host-local
# addresses), two containers are created and started in it, and the
# test reads their status (ContainerStatus), runs commands in them
# (ExecSync: stdout, stderr, exit code) and has one reach the other over
# the pod's loopback; StopPodSandbox and RemovePodSandbox then leave no
# container, task or shim behind. The pod runs twice: on runc
# (containerd's own runtime: the client, configuration, images and
# network, with no VM), then on the `kiln` handler, where the whole pod
# is one Kiln VM with a kernel of its own.
. "$(dirname "$0")/lib.sh"

# The CRI plugin copies the node's /etc/hosts and /etc/resolv.conf into
# every pod; the L1 has neither.
mkdir -p /etc
[ -e /etc/hosts ] || echo "127.0.0.1 localhost" > /etc/hosts
# A line every pod's copy of /etc/hosts must have.
grep -q kiln-cri-marker /etc/hosts || echo "10.88.0.250 kiln-cri-marker" >> /etc/hosts
[ -e /etc/resolv.conf ] || : > /etc/resolv.conf

root=$WORK/containerd
pause=kiln.test/pause:1
img=kiln.test/bb:1
mkdir -p "$root/cni" /run/containerd
# A bridge with host-local addresses: every pod gets a network namespace
# with loopback (the CRI plugin adds it) and eth0 on the bridge.
cat > "$root/cni/10-kiln-cri.conflist" <<EOF
{
  "cniVersion": "1.0.0",
  "name": "kiln-cri",
  "plugins": [{
    "type": "bridge", "bridge": "kcri0", "isGateway": true, "ipMasq": false,
    "ipam": {"type": "host-local", "dataDir": "$root/ipam", "ranges": [[{"subnet": "10.88.0.0/24"}]]}
  }]
}
EOF
containerd_setup "$(cat <<EOF
  sandbox_image = "$pause"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$root/cni"
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
  # L1's root is its initramfs, which pivot_root cannot move: runc
  # chroots instead (as Docker's DOCKER_RAMDISK does).
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
    NoPivotRoot = true
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.kiln]
    runtime_type = "io.containerd.kiln.v2"
EOF
)"
cri() { kiln-cri-client --socket "$root/containerd.sock" "$@"; }
ctr() { command ctr -a "$root/containerd.sock" -n k8s.io "$@"; }
KILN_GUEST_INIT=$KILN_INIT containerd --config "$root/config.toml" >> "$root/containerd.log" 2>&1 &
containerd_pid=$!
waited=0
while ! cri version > "$WORK/version.txt" 2>&1 && [ "$waited" -lt 60 ]; do
    sleep 1; waited=$((waited + 1))
done
expect_contains cri-serves-v1 "$WORK/version.txt" '^api v1$'

# One busybox layer, two images: the pause image (a static binary that
# sleeps until signalled) and the containers' image.
image=$WORK/image
mkdir -p "$image/root/bin" "$image/archive/l1"
cp /bin/busybox "$image/root/bin/busybox"
for applet in sh echo cat sleep mkdir httpd wget; do ln -s busybox "$image/root/bin/$applet"; done
(cd "$image/root" && tar -cf "$image/archive/l1/layer.tar" bin)
diff_id=$(sha256sum "$image/archive/l1/layer.tar" | cut -d' ' -f1)
image_config() {
    printf '{"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": ["sha256:%s"]}, "config": {"Entrypoint": %s}}' \
        "$diff_id" "$2" > "$image/archive/$1.json"
}
image_config pause '["/bin/sleep", "infinity"]'
image_config bb '["/bin/sh"]'
printf '[{"Config": "pause.json", "RepoTags": ["%s"], "Layers": ["l1/layer.tar"]},
  {"Config": "bb.json", "RepoTags": ["%s"], "Layers": ["l1/layer.tar"]}]' "$pause" "$img" \
    > "$image/archive/manifest.json"
(cd "$image/archive" && tar -cf "$WORK/images.tar" manifest.json pause.json bb.json l1)
ctr image import "$WORK/images.tar" > "$WORK/import.txt" 2>&1
expect_eq import-status 0 "$?"

# A handler containerd has no runtime for is refused, in one line naming it.
cri pod-run stray --handler nosuch > "$WORK/stray.txt" 2>&1
expect_eq unknown-handler-refused 125 "$?"
expect_contains unknown-handler-named "$WORK/stray.txt" \
    '^kiln-cri-client: RunPodSandbox of stray: .*no runtime for "nosuch" is configured'
expect_eq unknown-handler-one-line 1 "$(wc -l < "$WORK/stray.txt")"

# pod_run HANDLER: a pod on HANDLER with a server and a client container
# (checks named HANDLER-…); fails when there is no pod to go on with.
pod_run() {
    h=$1
    pod=$(cri pod-run "pod-$h" --handler "$h" 2> "$WORK/$h-pod.err")
    expect_eq "$h-pod-runs" 0 "$?"
    if [ -z "$pod" ]; then
        sed "s/^/KILN-INFO $h pod: /" "$WORK/$h-pod.err"
        return 1
    fi
    cri pod-status "$pod" > "$WORK/$h-pod.txt" 2>&1
    expect_contains "$h-pod-ready" "$WORK/$h-pod.txt" '^state SANDBOX_READY$'
    expect_contains "$h-pod-has-a-bridge-address" "$WORK/$h-pod.txt" '^ip 10\.88\.0\.[0-9]*$'
    server=$(cri create "$pod" server "$img" -- sh -c \
        'mkdir -p /www && echo served over loopback > /www/index.html && exec httpd -f -p 127.0.0.1:8080 -h /www' \
        2> "$WORK/$h-server.err")
    expect_eq "$h-server-created" 0 "$?"
    client=$(cri create "$pod" client "$img" -- sleep 600 2> "$WORK/$h-client.err")
    expect_eq "$h-client-created" 0 "$?"
    check "$h-server-starts" cri start "$server"
    check "$h-client-starts" cri start "$client"
    for c in server client; do
        eval "id=\$$c"
        cri status "$id" > "$WORK/$h-$c-status.txt" 2>&1
        expect_contains "$h-$c-running" "$WORK/$h-$c-status.txt" '^state CONTAINER_RUNNING$'
    done
}

# pod_execs HANDLER: ExecSync in the pod's containers: output, exit code,
# the client reaching the server on 127.0.0.1, their roots and kernel.
pod_execs() {
    h=$1
    cri exec "$client" -- sh -c 'echo to stdout; echo to stderr >&2; exit 7' \
        > "$WORK/$h-exec.out" 2> "$WORK/$h-exec.err"
    expect_eq "$h-exec-exit-code" 7 "$?"
    expect_eq "$h-exec-stdout" "to stdout" "$(cat "$WORK/$h-exec.out")"
    expect_eq "$h-exec-stderr" "to stderr" "$(cat "$WORK/$h-exec.err")"
    # The server may still be starting: a few tries.
    tries=0
    while ! cri exec "$client" -- wget -q -O - http://127.0.0.1:8080/index.html \
        > "$WORK/$h-loopback.txt" 2>&1 && [ "$tries" -lt 20 ]; do
        sleep 1; tries=$((tries + 1))
    done
    expect_eq "$h-client-reaches-server-over-loopback" "served over loopback" "$(cat "$WORK/$h-loopback.txt")"
    # Each in a root of its own: the server's /www is not the client's.
    check "$h-roots-of-their-own" cri exec "$client" -- sh -c '[ ! -e /www ]'
    # The pod's DNS (its dns_config: the resolv.conf CRI writes and mounts
    # into each container) in both containers, whose image has no /etc.
    for c in server client; do
        eval "id=\$$c"
        cri exec "$id" -- cat /etc/resolv.conf > "$WORK/$h-$c-resolv.txt" 2>&1
        expect_contains "$h-$c-has-the-pods-nameserver" "$WORK/$h-$c-resolv.txt" '^nameserver 10\.96\.0\.10$'
        expect_contains "$h-$c-has-the-pods-search-domains" "$WORK/$h-$c-resolv.txt" \
            '^search default\.svc\.cluster\.local svc\.cluster\.local cluster\.local$'
        expect_contains "$h-$c-has-the-pods-options" "$WORK/$h-$c-resolv.txt" '^options ndots:5$'
    done
    # CRI's other mounts, copied into the VM on kiln: the pod's
    # /etc/hostname and /etc/hosts (a copy of L1's, with its marker).
    for c in server client; do
        eval "id=\$$c"
        cri exec "$id" -- cat /etc/hostname /etc/hosts > "$WORK/$h-$c-etc.txt" 2>&1
        expect_contains "$h-$c-has-the-pods-hostname-file" "$WORK/$h-$c-etc.txt" "^pod-$h\$"
        expect_contains "$h-$c-has-the-pods-hosts" "$WORK/$h-$c-etc.txt" '^10.88.0.250 kiln-cri-marker$'
    done
    boot_server=$(cri exec "$server" -- cat /proc/sys/kernel/random/boot_id)
    boot_client=$(cri exec "$client" -- cat /proc/sys/kernel/random/boot_id)
    check "$h-boot-id-read" [ -n "$boot_server" ]
    expect_eq "$h-containers-share-a-kernel" "$boot_server" "$boot_client"
}

# pod_removed HANDLER: StopPodSandbox ends the containers, RemovePodSandbox
# removes them; what is gone is refused by name.
pod_removed() {
    h=$1
    check "$h-pod-stops" cri pod-stop "$pod"
    cri status "$client" > "$WORK/$h-stopped.txt" 2>&1
    expect_contains "$h-stop-ends-the-containers" "$WORK/$h-stopped.txt" '^state CONTAINER_EXITED$'
    cri pod-status "$pod" > "$WORK/$h-pod-stopped.txt" 2>&1
    expect_contains "$h-pod-not-ready" "$WORK/$h-pod-stopped.txt" '^state SANDBOX_NOTREADY$'
    check "$h-pod-removed" cri pod-rm "$pod"
    cri status "$client" > "$WORK/$h-gone.txt" 2>&1
    expect_eq "$h-removed-container-refused" 125 "$?"
    expect_contains "$h-refusal-names-it" "$WORK/$h-gone.txt" \
        "^kiln-cri-client: ContainerStatus of $client: .*(gRPC NotFound)$"
    expect_eq "$h-no-container-left" "" "$(ctr container ls -q)"
    expect_eq "$h-no-task-left" "" "$(ctr task ls -q)"
}

# runc, containerd's own runtime: the client, the configuration, the
# images and the network, with no VM; its containers share L1's kernel.
if pod_run runc; then
    pod_execs runc
    expect_eq runc-shares-l1s-kernel "$(cat /proc/sys/kernel/random/boot_id)" "$boot_client"
    pod_removed runc
    expect_eq runc-no-shim-left "" "$(pid_of containerd-shim-runc-v2)"
fi

# vm_processes: the pids of the Kiln shim's VM processes
# (`containerd-shim-kiln-v2 __vm …`), one a line.
vm_processes() {
    for dir in /proc/[0-9]*; do
        if tr '\0' ' ' 2> /dev/null < "$dir/cmdline" | grep -q 'containerd-shim-kiln-v2 __vm '; then
            echo "${dir#/proc/}"
        fi
    done
}

# kiln: the same pod is one Kiln VM. The pod's task and both containers'
# are its VM process (containerd's pids), the only one there is; the
# containers share the VM's kernel, not L1's; stopped and removed, the
# pod leaves no VM process and no shim.
if pod_run kiln; then
    pod_execs kiln
    check kiln-a-kernel-of-its-own [ "$boot_client" != "$(cat /proc/sys/kernel/random/boot_id)" ]
    cri pod-status "$pod" > "$WORK/kiln-pod.txt" 2>&1
    vm=$(sed -n 's/^pid //p' "$WORK/kiln-pod.txt")
    expect_eq kiln-one-vm-process "${vm:-no pid}" "$(vm_processes)"
    for c in server client; do
        expect_eq "kiln-$c-in-the-pods-vm" "${vm:-no pid}" "$(sed -n 's/^pid //p' "$WORK/kiln-$c-status.txt")"
    done
    pod_removed kiln
    check kiln-vm-ended [ ! -e "/proc/${vm:-0}" ]
    expect_eq kiln-no-shim-left "" "$(pid_of containerd-shim-kiln-v2)"
    expect_eq kiln-no-container-directory-left "" "$(ls "$KILN_HOME/containers" | grep -v rootfs)"
fi
# The shim's log, for a failure's reader.
grep -i 'kiln' "$root/containerd.log" | grep -i 'level=error' | tail -n 5 | sed 's/^/KILN-INFO containerd: /'

kill "$containerd_pid"; wait "$containerd_pid" 2> /dev/null
