# Images built from recipes boot as built: hello-plus inherits hello's
# entrypoint and adds /etc/motd; busybox's hostname is its image name.
. "$(dirname "$0")/lib.sh"

out=$WORK/plus.txt
"$KILN" run hello-plus:1.0.0 --read-only < /dev/null > "$out" 2>&1
expect_eq hello-plus-exit-status 0 "$?"
expect_contains hello-plus-inherits-the-entrypoint "$out" "Hello from a Kiln microVM!"

# hello-plus's filesystem, flattened, as a second (raw) disk of hello.ext4.
"$KILN" image flatten hello-plus:1.0.0 "$WORK/plus.ext4" > /dev/null 2>&1
expect_eq flatten-exit-status 0 "$?"
out=$WORK/motd.txt
"$KILN" run --disk "$KILN_ASSETS/hello.ext4" --read-only \
    --disk "$WORK/plus.ext4,ro" --cmdline kiln.entrypoint=/tests/show-motd.sh < /dev/null > "$out" 2>&1
expect_contains motd-in-hello-plus "$out" "Built on hello:1.0.0 by Kiln."

out=$WORK/busybox.txt
"$KILN" run busybox:1.35.0 --cmdline kiln.entrypoint=/bin/hostname < /dev/null > "$out" 2>&1
expect_eq busybox-exit-status 0 "$?"
expect_contains hostname-is-the-image-name "$out" "^busybox"
