# containerd-net: a container in a pod's network namespace, as CRI and CNI
# make one (here by hand: `ip netns add`, a veth pair with L1's end
# outside, addresses on both ends, a default route through L1), run with
# `ctr run --with-ns network:PATH`: the VM's NIC has the veth's MAC and
# address inside the guest, the guest the nameserver of the resolv.conf
# mounted as CRI mounts the pod's (and its search domain and options),
# eth0 the veth's MTU, the container reaches L1's end of the veth
# and L1 reaches a listener in the container. The container is a pod's
# sandbox: a member in its namespace shares the VM's NIC, one in another
# namespace is refused; both mount one emptyDir, one directory in the
# VM. The sandbox's Delete leaves the namespace as it
# was made (no tap, no qdisc, the veth and its address). A
# namespace path that does not exist fails Create with its reason and
# leaves nothing; a container without one has no NIC. Needs L1 to have
# iproute2's ip and tc and the veth, sch_ingress, cls_u32 and act_mirred
# modules loaded (xtask/src/harness/initramfs.rs).
. "$(dirname "$0")/lib.sh"

# iproute2's (busybox's sh would run its own applets for bare names).
ip() { /usr/sbin/ip "$@"; }
tc() { /usr/sbin/tc "$@"; }
containerd_setup
start_containerd
check containerd-serves ctr version
busybox_image

# No namespace in the spec: no NIC. A namespace that does not exist: Create
# fails with its reason and leaves nothing.
kiln_run --rm "$img" nonet busybox ls /sys/class/net < /dev/null > "$WORK/nonet.txt" 2>&1
expect_contains no-namespace-lists-interfaces "$WORK/nonet.txt" '^lo'
expect_eq no-namespace-no-nic 0 "$(grep -c '^eth' "$WORK/nonet.txt")"
kiln_run --rm --with-ns network:/var/run/netns/kiln-none "$img" nons true \
    < /dev/null > "$WORK/nons.txt" 2>&1
expect_eq missing-namespace-refused 1 "$?"
expect_contains missing-namespace-reason "$WORK/nons.txt" \
    'cannot open the network namespace /var/run/netns/kiln-none: No such file'
expect_eq missing-namespace-leaves-nothing "" "$(ls "$KILN_HOME/containers" | grep -v rootfs)"

# What this scenario needs of L1 (xtask/src/harness/initramfs.rs), said
# once rather than as every later check's failure.
missing=""
for module in veth sch_ingress cls_u32 act_mirred; do
    [ -d "/sys/module/$module" ] || missing="$missing $module.ko"
done
ip -V 2> /dev/null | grep -q iproute2 || missing="$missing iproute2's ip"
tc -V 2> /dev/null | grep -q iproute2 || missing="$missing iproute2's tc"
if [ -n "$missing" ]; then
    fail l1-has-what-pods-need "L1 lacks$missing"
    kill "$containerd_pid"; wait "$containerd_pid" 2> /dev/null
    exit 0
fi
pass l1-has-what-pods-need

pod=kiln-pod
# `ip netns` keeps its names in /run/netns; CRI names them as
# /var/run/netns/…, which a host has as /run's (L1 has no /var).
[ -e /var/run ] || { mkdir -p /var && ln -s /run /var/run; }
ip netns add "$pod"
ip link add kiln-veth type veth peer name eth0 netns "$pod"
ip addr add 10.88.7.1/24 dev kiln-veth
# An overlay network's MTU, below Ethernet's, as VXLAN's CNI plugins set.
ip link set kiln-veth mtu 1400 up
ip -n "$pod" addr add 10.88.7.2/24 dev eth0
ip -n "$pod" link set eth0 mtu 1400 up
ip -n "$pod" route add default via 10.88.7.1
mac=$(ip -n "$pod" -o link show eth0 | sed -n 's/.*link\/ether \([0-9a-f:]*\).*/\1/p')
check pod-made [ -n "$mac" ]

# The pod's sandbox (CRI's annotations, set through ctr) serves a line on
# TCP port 8080; the pod's resolv.conf is mounted as CRI mounts it.
# pod_run TYPE NETNS CTR-RUN-ARGS...: a container of the pod "web".
pod_run() {
    kind=$1 netns=$2
    shift 2
    kiln_run -d --annotation io.kubernetes.cri.container-type="$kind" \
        --annotation io.kubernetes.cri.sandbox-id=web --with-ns "network:$netns" "$@"
}
printf 'nameserver 10.88.7.53\nsearch pod.local\noptions ndots:2\n' > "$WORK/resolv.conf"
# An emptyDir both containers mount: one directory in the pod's VM.
mkdir -p "$WORK/shared"
shared="type=bind,src=$WORK/shared,dst=/shared,options=rbind:rw"
pod_run sandbox "/var/run/netns/$pod" \
    --mount "type=bind,src=$WORK/resolv.conf,dst=/etc/resolv.conf,options=rbind:ro" \
    --mount "$shared" "$img" web \
    busybox nc -ll -p 8080 -e busybox echo hello-from-the-pod > "$WORK/web.txt" 2>&1
status=$?
expect_eq pod-container-created 0 "$status"
if [ "$status" != 0 ]; then
    # Why, for the log: ctr's line and the shim's errors.
    sed 's/^/KILN-INFO ctr: /' "$WORK/web.txt"
    grep 'level=error' "$root/containerd.log" | tail -n 5 | sed 's/^/KILN-INFO containerd: /'
fi
expect_eq tap-in-the-pod 1 "$(ip -n "$pod" -o link show | grep -c ' tap0_kiln:')"

ctr task exec --exec-id nic web cat /sys/class/net/eth0/address < /dev/null > "$WORK/mac.txt" 2>&1
expect_contains guest-nic-has-the-veths-mac "$WORK/mac.txt" "^$mac\$"
ctr task exec --exec-id addr web busybox ip -4 addr show eth0 < /dev/null > "$WORK/addr.txt" 2>&1
expect_contains guest-nic-has-the-veths-address "$WORK/addr.txt" 'inet 10.88.7.2/24'
ctr task exec --exec-id route web busybox ip route < /dev/null > "$WORK/route.txt" 2>&1
expect_contains guest-routes-through-the-pods-gateway "$WORK/route.txt" '^default via 10.88.7.1 dev eth0'
ctr task exec --exec-id mtu web cat /sys/class/net/eth0/mtu < /dev/null > "$WORK/mtu.txt" 2>&1
expect_eq guest-nic-has-the-veths-mtu 1400 "$(cat "$WORK/mtu.txt")"

ctr task exec --exec-id dns web cat /etc/resolv.conf < /dev/null > "$WORK/dns.txt" 2>&1
expect_contains guest-has-the-pods-nameserver "$WORK/dns.txt" '^nameserver 10.88.7.53$'
expect_contains guest-has-the-pods-search-domain "$WORK/dns.txt" '^search pod.local$'
expect_contains guest-has-the-pods-options "$WORK/dns.txt" '^options ndots:2$'

# Both ways: the container reaches L1's end; L1 reaches its listener.
ctr task exec --exec-id ping web busybox ping -c 1 -W 10 10.88.7.1 < /dev/null > "$WORK/ping.txt" 2>&1
expect_eq container-reaches-l1 0 "$?"
waited=0
while ! nc -w 5 10.88.7.2 8080 < /dev/null > "$WORK/served.txt" 2>&1 ||
    ! grep -q hello-from-the-pod "$WORK/served.txt"; do
    [ "$waited" -lt 30 ] || break
    sleep 1; waited=$((waited + 1))
done
expect_contains l1-reaches-the-container "$WORK/served.txt" '^hello-from-the-pod$'

# A member of the pod, in its namespace as CRI puts it, shares the VM's
# NIC (no tap of its own); one in another namespace is refused.
pod_run container "/var/run/netns/$pod" --mount "$shared" "$img" side busybox sleep 600 \
    < /dev/null > "$WORK/side.txt" 2>&1
expect_eq pod-member-created 0 "$?"
expect_eq pod-member-adds-no-tap 1 "$(ip -n "$pod" -o link show | grep -c ' tap0_kiln:')"
ctr task exec --exec-id ping side busybox ping -c 1 -W 10 10.88.7.1 < /dev/null > "$WORK/side-ping.txt" 2>&1
expect_eq pod-member-reaches-l1 0 "$?"
ctr task exec --exec-id dns side cat /etc/resolv.conf < /dev/null > "$WORK/side-dns.txt" 2>&1
expect_contains pod-member-has-the-pods-nameserver "$WORK/side-dns.txt" '^nameserver 10.88.7.53$'
ctr task exec --exec-id write web busybox sh -c 'echo from-the-sandbox > /shared/note' < /dev/null
ctr task exec --exec-id read side cat /shared/note < /dev/null > "$WORK/shared.txt" 2>&1
expect_eq pod-members-share-an-emptydir from-the-sandbox "$(cat "$WORK/shared.txt")"
pod_run container /var/run/netns/kiln-other "$img" stray true < /dev/null > "$WORK/stray.txt" 2>&1
expect_contains pod-member-in-another-namespace-refused "$WORK/stray.txt" \
    'network namespace "/var/run/netns/kiln-other": expected the pod.s "/var/run/netns/kiln-pod"'
ctr task kill -s SIGKILL side > /dev/null 2>&1
waited=0
while ! ctr task ls | grep -q '^side .*STOPPED' && [ "$waited" -lt 30 ]; do sleep 1; waited=$((waited + 1)); done
ctr task delete side > /dev/null 2>&1
expect_eq pod-member-deleted 0 "$?"

# The sandbox's Delete leaves the namespace as CNI made it.
ctr task kill -s SIGKILL web > /dev/null 2>&1
waited=0
while ! ctr task ls | grep -q '^web .*STOPPED' && [ "$waited" -lt 60 ]; do sleep 1; waited=$((waited + 1)); done
ctr task delete web > "$WORK/delete.txt" 2>&1
expect_eq delete-status 0 "$?"
ctr container rm web > /dev/null 2>&1
expect_eq delete-removes-the-tap 0 "$(ip -n "$pod" -o link show | grep -c tap0_kiln)"
tc -n "$pod" qdisc show dev eth0 > "$WORK/qdisc.txt" 2>&1
expect_eq delete-removes-the-qdisc 0 "$(grep -c ingress "$WORK/qdisc.txt")"
ip -n "$pod" -4 addr show eth0 > "$WORK/after.txt" 2>&1
expect_contains delete-leaves-the-veth "$WORK/after.txt" 'inet 10.88.7.2/24'

ip netns del "$pod"
kill "$containerd_pid"; wait "$containerd_pid" 2> /dev/null
