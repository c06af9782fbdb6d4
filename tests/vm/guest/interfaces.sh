#!/bin/sh
# Lists the guest's network interfaces and its resolvers.
echo "interfaces: $(ls /sys/class/net | tr '\n' ' ')"
echo "local-ipv4: $(cat /run/kiln/local-ipv4 2>/dev/null || echo none)"
