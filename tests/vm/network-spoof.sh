# Guest network isolation: a guest that takes its neighbour's MAC, then its
# IPv4 address, and claims that address and the gateway's by ARP
# (tests/vm/guest/spoof.sh), has all of it dropped by its tap's filter: the host's ARP cache and the
# neighbour's keep the right MACs, the port proxy still reaches the
# neighbour, and the honest guest loses nothing. The filters go with their
# taps: on terminate, and (swept by the next launch) after a killed VMM.
. "$(dirname "$0")/lib.sh"

# record ID NAME: a string field of an instance's record.
record() {
    sed -n "s/^ *\"$2\": \"*\([^\",]*\)\"*,*$/\1/p" "$KILN_HOME/instances/$1/instance.json"
}

# get FILE: an HTTP GET of / through the published port 8080 into FILE,
# retrying while the guest boots, for 300 s of wall time.
get() {
    deadline=$(( $(date +%s) + 300 ))
    while [ "$(date +%s)" -lt "$deadline" ]; do
        printf 'GET / HTTP/1.0\r\nHost: x\r\n\r\n' | nc -w 10 127.0.0.1 8080 > "$1" 2>&1
        grep -q "200 OK" "$1" && return
        sleep 2
    done
}

# exec_ready NAME: waits (300 s at most) until guest-init answers exec.
exec_ready() {
    deadline=$(( $(date +%s) + 300 ))
    until "$KILN" exec "$1" -- /bin/true > /dev/null 2>&1; do
        [ "$(date +%s)" -lt "$deadline" ] || return 1
        sleep 2
    done
}

# tap ID: the instance's tap.
tap() { echo "kt-$(echo "$1" | cut -c3-14)"; }
# mac_of ADDRESS: the host's ARP cache's MAC for ADDRESS.
mac_of() { ip neigh show "$1" | sed -n 's/.* lladdr \([0-9a-f:]*\).*/\1/p'; }
# dropped TAP: how many frames TAP's filter has dropped.
dropped() {
    nft list table netdev "kiln-$1" | sed -n 's/.*counter packets \([0-9]*\) .*/\1/p'
}
# filters: the tap filters' tables on the host, one per line.
filters() { nft list tables netdev | grep ' kiln-'; }
# spoof STEP MINIMUM: runs tests/vm/guest/spoof.sh's STEP in the spoofer,
# whose tap's filter must drop at least MINIMUM more frames meanwhile.
spoof() {
    before=$(dropped "$(tap "$spoofer")")
    "$KILN" exec spoofer -- /tests/spoof.sh "$1" "$victim_ip" "$gateway" > "$WORK/$1.txt" 2>&1
    expect_contains "$1-spoof-ran" "$WORK/$1.txt" "^spoof: "
    sed "s/^/KILN-INFO spoof $1: /" "$WORK/$1.txt"
    after=$(dropped "$(tap "$spoofer")")
    echo "KILN-INFO spoof $1: $((after - before)) frames dropped"
    check "$1-spoof-dropped" [ "$((after - before))" -ge "$2" ]
}

victim=$("$KILN" run web:1.0.0 --detach --name victim -p 8080:80 2> "$WORK/victim.err")
expect_eq victim-launched 0 "$?"
spoofer=$("$KILN" run vm-test:1.0.0 --detach --name spoofer \
    --cmdline 'kiln.entrypoint="/bin/sleep 3600"' 2> "$WORK/spoofer.err")
expect_eq spoofer-launched 0 "$?"
victim_ip=$(record "$victim" address)
gateway=$(ip -4 addr show kiln0 | sed -n 's/.*inet \([0-9.]*\)\/.*/\1/p')
victim_mac=$(echo "$victim_ip" | awk -F. '{ printf "02:6b:%02x:%02x:%02x:%02x", $1, $2, $3, $4 }')
check each-tap-has-a-filter sh -c "nft list table netdev kiln-$(tap "$victim") &&
    nft list table netdev kiln-$(tap "$spoofer")"

get "$WORK/before.html"
expect_contains page-through-the-port "$WORK/before.html" "Hello from a Kiln microVM"
expect_eq host-knows-the-victim "$victim_mac" "$(mac_of "$victim_ip")"
check spoofer-answers-exec exec_ready spoofer
# From the victim's MAC: an announcement and ARP requests for the gateway.
spoof mac 2
# Announcements of the victim's and the gateway's addresses, and ARP
# requests from the victim's.
spoof address 3
expect_eq host-arp-keeps-the-victim-mac "$victim_mac" "$(mac_of "$victim_ip")"
get "$WORK/after.html"
expect_contains proxy-still-reaches-the-victim "$WORK/after.html" "Hello from a Kiln microVM"
check proxy-not-captured sh -c "! grep -q spoofed '$WORK/after.html'"
"$KILN" exec victim -- /bin/cat /proc/net/arp > "$WORK/victim-arp.txt" 2>&1
expect_contains victim-keeps-the-gateway-mac "$WORK/victim-arp.txt" \
    "^$gateway .*$(cat /sys/class/net/kiln0/address)"
expect_eq honest-guest-loses-nothing 0 "$(dropped "$(tap "$victim")")"
check spoofer-own-address-passes "$KILN" exec spoofer -- /bin/ping -c 3 -W 10 "$gateway"

# A VMM killed with -9 cannot remove its filter; the next launch sweeps it.
kill -9 "$(record "$spoofer" vmm_pid)"
waited=0
while [ -e "/sys/class/net/$(tap "$spoofer")" ] && [ "$waited" -lt 30 ]; do
    sleep 1; waited=$((waited + 1))
done
"$KILN" terminate spoofer > /dev/null 2>&1
check terminate "$KILN" terminate victim
check terminate-removes-the-filter sh -c "! filters | grep -q 'kiln-$(tap "$victim")'"
next=$("$KILN" run vm-test:1.0.0 --detach --name next \
    --cmdline 'kiln.entrypoint="/bin/sleep 3600"' 2> "$WORK/next.err")
expect_eq next-launched 0 "$?"
check killed-vmm-filter-swept sh -c "! filters | grep -q 'kiln-$(tap "$spoofer")'"
"$KILN" terminate next > /dev/null 2>&1
filters > "$WORK/left.txt" 2>&1
expect_eq no-filter-left "" "$(cat "$WORK/left.txt")"
