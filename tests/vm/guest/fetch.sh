#!/bin/sh
# Fetches http://$PEER/ (another instance, by its address) with busybox nc
# until it answers, at most 60 tries, and says what it got.
for try in $(seq 1 60); do
    printf 'GET / HTTP/1.0\r\nHost: %s\r\n\r\n' "$PEER" | nc -w 5 "$PEER" 80 > /tmp/page 2>&1
    if grep -q "200 OK" /tmp/page; then
        echo "fetched from $PEER after $try tries: $(grep -o 'Hello from a Kiln microVM' /tmp/page)"
        exit 0
    fi
    sleep 1
done
echo "fetch from $PEER failed: $(head -c 200 /tmp/page)"
exit 1
