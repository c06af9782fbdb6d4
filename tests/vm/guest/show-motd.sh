#!/bin/sh
# Guest side of image-children: the second disk is an image built by
# `kiln build`; show a file from it.
mkdir -p /tmp/image && mount -o ro /dev/vdb /tmp/image && cat /tmp/image/etc/motd
