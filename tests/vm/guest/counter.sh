#!/bin/sh
# Guest side of the snapshot scenario: writes a file to the root volume,
# then counts ten times a second with the guest's uptime, forever. A restored
# or resumed VM goes on counting where it was; a booted one starts at 1.
mkdir -p /var
echo "written before the snapshot" > /var/marker
sync
i=0
while :; do
    i=$((i + 1))
    echo "count $i uptime $(cut -d' ' -f1 /proc/uptime) marker $(cat /var/marker 2>/dev/null || echo missing)"
    sleep 0.1
done
