#!/bin/sh
# Guest side of run-second-disk: a marker at the start of the second disk.
echo kiln-marker-42 > /dev/vdb && sync && echo "marker written"
