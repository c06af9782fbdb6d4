# A named instance's root volume (the compressed image and its overlay)
# keeps what the guest wrote across VMs; a run without --name keeps
# nothing; deleting a file gives its blocks back (discard); the volume
# flattens to a clean filesystem.
. "$(dirname "$0")/lib.sh"

step() { # step NAME ARGS...: boots vm-test with volume.sh NAME
    name=$1; shift
    "$KILN" run "$@" --cmdline "kiln.entrypoint=\"/tests/volume.sh $name\"" < /dev/null > "$WORK/$name.txt" 2>&1
}

step write vm-test:1.0.0 --name vol
expect_eq write-exit-status 0 "$?"
expect_contains guest-wrote "$WORK/write.txt" "volume written"
step read --name vol
expect_eq read-exit-status 0 "$?"
expect_contains written-file-is-there-next-boot "$WORK/read.txt" "^kiln-persisted"

overlay=$(ls "$KILN_HOME"/instances/i-*/root.overlay)
before=$(du -k "$overlay" | cut -f1)
step fill --name vol
expect_contains guest-filled "$WORK/fill.txt" "filled"
filled=$(du -k "$overlay" | cut -f1)
step drop --name vol
expect_contains guest-dropped "$WORK/drop.txt" "dropped"
dropped=$(du -k "$overlay" | cut -f1)
echo "overlay KiB: before $before, filled $filled, dropped $dropped"
check overlay-holds-the-8MiB-file [ "$filled" -ge $((before + 8192)) ]
check discard-gave-the-blocks-back [ "$dropped" -le $((before + 1024)) ]

"$KILN" image flatten vol "$WORK/vol.ext4" > /dev/null 2>&1
expect_eq flatten-exit-status 0 "$?"
check flattened-volume-is-clean e2fsck -fn "$WORK/vol.ext4"

step write vm-test:1.0.0
step read vm-test:1.0.0
expect_contains unnamed-runs-keep-nothing "$WORK/read.txt" "^no data"
check unnamed-overlays-are-removed [ -z "$(ls "$KILN_HOME/tmp")" ]
