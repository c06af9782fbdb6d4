# Networking: instances on the kiln0 bridge get their own addresses; the
# host reaches the web image's page by address and through a published
# port (-p); two instances reach each other; ps shows addresses and ports;
# a port in use or no CAP_NET_ADMIN is refused with nothing left behind;
# --network none has no NIC; a killed VMM leaves no tap; terminate frees
# the address; the host's DNS reaches the guest.
. "$(dirname "$0")/lib.sh"

# get ADDRESS PORT FILE: an HTTP GET of / into FILE, retrying while the
# guest boots, for 300 s of wall time. With busybox nc: busybox's static
# wget crashes in the L1, which has no /etc.
get() {
    deadline=$(( $(date +%s) + 300 ))
    while [ "$(date +%s)" -lt "$deadline" ]; do
        printf 'GET / HTTP/1.0\r\nHost: %s\r\n\r\n' "$1" | nc -w 10 "$1" "$2" > "$3" 2>&1
        grep -q "200 OK" "$3" && return
        sleep 2
    done
    # What the host and the instances looked like, for the log.
    echo "KILN-INFO no answer from $1:$2: $(tr '\n' ' ' < "$3")"
    echo "KILN-INFO neighbours: $(ip neigh 2>&1 | tr '\n' ';') bridge ports: $(ls /sys/class/net/kiln0/brif 2>&1 | tr '\n' ' ')"
    echo "KILN-INFO memory: $(grep -E 'MemAvailable' /proc/meminfo) taps: $(ls /sys/class/net | grep -c '^kt-')"
    "$KILN" ps -a 2>&1 | sed 's/^/KILN-INFO ps: /'
    "$KILN" logs web1 2>&1 | tail -n 5 | sed 's/^/KILN-INFO web1: /'
}

# refused ADDRESS PORT FILE: connecting fails; nc's complaint into FILE.
refused() {
    nc -w 5 "$1" "$2" < /dev/null > "$3" 2>&1
}

# field ID NAME: a string field of an instance's record ("null" when unset).
field() {
    sed -n "s/^ *\"$2\": \"*\([^\",]*\)\"*,*$/\1/p" "$KILN_HOME/instances/$1/instance.json"
}

web=$("$KILN" run web:1.0.0 --detach --name web1 -p 8080:80 2> "$WORK/launch.err")
expect_eq launch-exit-status 0 "$?"
address=$(field "$web" address)
expect_eq first-address-of-the-subnet 10.89.0.2 "$address"
"$KILN" ps > "$WORK/ps.txt" 2>&1
expect_contains ps-shows-address-and-port "$WORK/ps.txt" "web1 .*running .*10.89.0.2 .*127.0.0.1:8080->80"
check bridge-has-the-gateway sh -c "ip -4 addr show kiln0 | grep -q 'inet 10.89.0.1/24'"
tap="kt-$(echo "$web" | cut -c3-14)"
check tap-is-on-the-bridge [ -e "/sys/class/net/kiln0/brif/$tap" ]

get "$address" 80 "$WORK/by-address.html"
expect_contains page-by-address "$WORK/by-address.html" "Hello from a Kiln microVM"
wait_console web1 "eth0 is 10.89.0.2/24, default route via 10.89.0.1" guest-configured-eth0
get 127.0.0.1 8080 "$WORK/published.html"
expect_contains page-through-the-published-port "$WORK/published.html" "Hello from a Kiln microVM"
refused 10.89.0.1 8080 "$WORK/not-published.txt"
expect_contains published-on-loopback-only "$WORK/not-published.txt" "refused"

# A second instance fetches the page from the first, by its address.
peer=$("$KILN" run vm-test:1.0.0 --detach --name peer \
    --cmdline "kiln.entrypoint=/tests/fetch.sh kiln.env=PEER=$address" 2> "$WORK/peer.err")
expect_eq peer-launched 0 "$?"
expect_eq second-address 10.89.0.3 "$(field "$peer" address)"
wait_console peer "fetched from $address .*Hello from a Kiln microVM" instances-reach-each-other

# The published port is taken: refused by name, and no instance appears.
"$KILN" run web:1.0.0 --detach --name web2 -p 8080:80 > "$WORK/taken.txt" 2>&1
expect_eq port-in-use-refused 1 "$?"
expect_contains port-in-use-says-which "$WORK/taken.txt" "port 8080 on 127.0.0.1 is already in use"
"$KILN" ps -a > "$WORK/ps.txt" 2>&1
check port-in-use-leaves-no-instance sh -c "! grep -q ' web2 ' '$WORK/ps.txt'"

# Without CAP_NET_ADMIN (in a user namespace of its own): refused, saying
# why, before any instance exists.
unshare -U "$KILN" run web:1.0.0 --detach --name noperm > "$WORK/noperm.txt" 2>&1
expect_eq no-cap-net-admin-refused 1 "$?"
expect_contains no-cap-net-admin-says-why "$WORK/noperm.txt" "needs CAP_NET_ADMIN"
"$KILN" ps -a > "$WORK/ps.txt" 2>&1
check no-cap-net-admin-leaves-no-instance sh -c "! grep -q ' noperm ' '$WORK/ps.txt'"

# No NIC at all.
"$KILN" run vm-test:1.0.0 --detach --name nonet --network none \
    --cmdline 'kiln.entrypoint=/tests/interfaces.sh' > "$WORK/nonet.id" 2>&1
wait_console nonet "^interfaces: lo " network-none-lists-lo
check network-none-has-no-eth0 sh -c "! grep '^interfaces:' '$WORK/nonet.txt' | grep -q eth0"
expect_contains network-none-has-no-address "$WORK/nonet.txt" "local-ipv4: none"

# A VMM killed with -9: its VM process goes, and its tap with it.
kill -9 "$(field "$web" vmm_pid)"
waited=0
while [ -e "/sys/class/net/$tap" ] && [ "$waited" -lt 30 ]; do sleep 1; waited=$((waited + 1)); done
check killed-vmm-leaves-no-tap [ ! -e "/sys/class/net/$tap" ]
refused 127.0.0.1 8080 "$WORK/closed.txt"
expect_contains published-port-closed-with-the-vmm "$WORK/closed.txt" "refused"
check restart-after-crash "$KILN" start web1
expect_eq address-kept-across-stop-start "$address" "$(field "$web" address)"
get 127.0.0.1 8080 "$WORK/restarted.html"
expect_contains page-after-restart "$WORK/restarted.html" "Hello from a Kiln microVM"

# Terminated, the address is free again.
check terminate "$KILN" terminate web1
expect_eq terminate-clears-the-address null "$(field "$web" address)"
again=$("$KILN" run vm-test:1.0.0 --detach --name again \
    --cmdline 'kiln.entrypoint=/tests/interfaces.sh' 2> "$WORK/again.err")
expect_eq terminated-address-reused "$address" "$(field "$again" address)"
wait_console again "local-ipv4: $address" guest-knows-its-address

for name in peer nonet again; do "$KILN" terminate "$name" > /dev/null 2>&1; done

# DNS: the host's resolv.conf (one written here; L1 has none) reaches an
# instance's guest whole, but for the host's loopback resolver. L1's own
# is put back after. (Unanchored at the end: the console ends lines with
# CR LF.)
if [ -e /etc/resolv.conf ]; then cp /etc/resolv.conf "$WORK/l1-resolv.conf"; fi
had_etc=no
if [ -d /etc ]; then had_etc=yes; fi
mkdir -p /etc
printf 'nameserver 127.0.0.53\nnameserver 10.0.0.2\nsearch kiln.test\noptions ndots:2\n' > /etc/resolv.conf
"$KILN" run vm-test:1.0.0 --name dns --cmdline 'kiln.entrypoint="/bin/cat /etc/resolv.conf"' \
    < /dev/null > "$WORK/dns.txt" 2>&1
expect_contains guest-has-the-hosts-nameserver "$WORK/dns.txt" '^nameserver 10\.0\.0\.2'
expect_eq guest-not-the-hosts-loopback 0 "$(grep -c '^nameserver 127' "$WORK/dns.txt")"
expect_contains guest-has-the-search-domain "$WORK/dns.txt" '^search kiln\.test'
expect_contains guest-has-the-options "$WORK/dns.txt" '^options ndots:2'
"$KILN" terminate dns > /dev/null 2>&1
rm -f /etc/resolv.conf
if [ -e "$WORK/l1-resolv.conf" ]; then cp "$WORK/l1-resolv.conf" /etc/resolv.conf; fi
if [ "$had_etc" = no ]; then rmdir /etc; fi
