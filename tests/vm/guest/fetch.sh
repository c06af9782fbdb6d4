#!/bin/sh
# Fetches http://$PEER/ (another instance, by its address) until it
# answers, at most 60 tries, and says what it got. The URL names its port:
# busybox's static wget crashes looking a missing one up through NSS.
for try in $(seq 1 60); do
    if wget -q -T 5 -O /tmp/page "http://$PEER:80/" 2>/dev/null; then
        echo "fetched from $PEER after $try tries: $(grep -o 'Hello from a Kiln microVM' /tmp/page)"
        exit 0
    fi
    sleep 1
done
echo "fetch from $PEER failed"
exit 1
