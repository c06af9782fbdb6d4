#!/bin/sh
# Guest side of run-vcpus: how many CPUs the guest kernel brought up.
echo "online=$(cat /sys/devices/system/cpu/online) processors=$(grep -c ^processor /proc/cpuinfo)"
