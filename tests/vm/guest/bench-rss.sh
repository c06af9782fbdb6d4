#!/bin/sh
# Guest side of the boot benchmark's memory sample: stay up while the host
# reads the VMM's memory map.
echo kiln-bench-ready
sleep 2
