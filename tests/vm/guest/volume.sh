#!/bin/sh
# Guest side of the volume scenarios; $1 says what to do.
case "$1" in
write)
    echo kiln-persisted > /data.txt && sync && echo "volume written" ;;
read)
    cat /data.txt 2>/dev/null || echo "no data" ;;
fill)
    # 8 MiB the overlay must hold, then give back when the file goes.
    dd if=/dev/urandom of=/fill bs=1M count=8 2>/dev/null && sync && echo "filled" ;;
drop)
    rm /fill && sync && echo "dropped" ;;
churn)
    # Rewrites files and syncs (journal commits, FLUSHes) until killed.
    i=0
    while :; do
        dd if=/dev/urandom of="/churn-$((i % 8))" bs=4k count=32 2>/dev/null
        mkdir -p "/dirs/$((i % 16))" && echo "$i" > "/dirs/$((i % 16))/n"
        sync
        i=$((i + 1))
        [ "$i" -eq 3 ] && echo "churning"
    done ;;
scratch)
    # The instance-store disk: the size asked for, and empty.
    echo "scratch bytes: $(blockdev --getsize64 /dev/vdb)"
    echo "scratch nonzero: $(head -c 1048576 /dev/vdb | tr -d '\000' | wc -c)"
    echo kiln-scratch > /dev/vdb && sync ;;
*)
    echo "volume.sh: unknown step $1"; exit 2 ;;
esac
