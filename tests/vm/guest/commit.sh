#!/bin/sh
# Guest side of instance-commit; $1 says what to do.
case "$1" in
write)
    # A file on the root volume, then idle until the VM is stopped.
    echo "kiln-committed $(cat /run/kiln/instance-id)" > /committed.txt && sync && echo "commit: written"
    while :; do sleep 1; done ;;
read)
    cat /committed.txt 2>/dev/null || echo "no committed file" ;;
*)
    echo "commit.sh: unknown step $1"; exit 2 ;;
esac
