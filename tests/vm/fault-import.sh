# Fault injection (issue 23): kill -9 of `kiln image import` of a
# docker-save archive at 20 seeded random points (tests/vm/store-faults.sh).
. "$(dirname "$0")/lib.sh"
. "$(dirname "$0")/store-faults.sh"

# A docker-save archive of busybox and 2 MiB of random bytes.
mkdir -p "$WORK/root/bin" "$WORK/archive/l1"
cp /bin/busybox "$WORK/root/bin/busybox"
dd if=/dev/urandom of="$WORK/root/blob" bs=1M count=2 2>/dev/null
(cd "$WORK/root" && tar -cf "$WORK/archive/l1/layer.tar" bin blob)
diff_id=$(sha256sum "$WORK/archive/l1/layer.tar" | cut -d' ' -f1)
echo "{\"rootfs\": {\"type\": \"layers\", \"diff_ids\": [\"sha256:$diff_id\"]}, \"config\": {\"Cmd\": [\"/bin/busybox\", \"true\"]}}" \
    > "$WORK/archive/config.json"
printf '[{"Config": "config.json", "RepoTags": ["imported:1.0"], "Layers": ["l1/layer.tar"]}]' \
    > "$WORK/archive/manifest.json"
(cd "$WORK/archive" && tar -cf "$WORK/image.tar" manifest.json config.json l1)
rm -rf "$WORK/root" "$WORK/archive"
import() { exec "$KILN" image import "$WORK/image.tar" "$(reference import "$1")" --init "$KILN_INIT"; }
inject import
