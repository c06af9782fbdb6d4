#!/bin/sh
# Guest side of instance-lifecycle: counts its boots on the root volume,
# shows the instance metadata, then idles until the VM is stopped.
mkdir -p /var/lib
echo boot >> /var/lib/boots
sync
echo "metadata: $(cat /run/kiln/instance-id) $(cat /run/kiln/instance-type) $(cat /run/kiln/name) $(cat /run/kiln/image)"
echo "hostname: $(hostname)"
echo "boots so far: $(wc -l < /var/lib/boots)"
echo "life ready"
while :; do sleep 1; done
