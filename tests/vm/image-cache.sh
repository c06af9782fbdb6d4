# The host-wide hydration cache of an image ($KILN_HOME/cache): two VMs
# booting the image at once while the cache fills, a VM killed mid-fill
# then a clean boot, a damaged (truncated) cache file, and
# `kiln image hydrate`. Each VM reads its whole root disk; every read must
# match the image's raw filesystem. Then the boot working set: the first
# boot's reads are recorded beside the image, and a later boot has them
# prefetched without reading them itself. Last, jailed VMs: they read the
# cache without writing it, and their supervisor fills it.
. "$(dirname "$0")/lib.sh"

# Unjailed VMs fill the cache themselves and record the working set; a
# jailed one (the default) only reads it, and its supervisor fills it:
# the last part.
export KILN_JAIL=0

image=vm-test:1.0.0
cache="$KILN_HOME/cache"
record="$KILN_HOME/images/vm-test/1.0.0/image.boot"

# hydrated NAME: the HYDRATED column (the 6th, after OWN and SHARED) of
# `kiln images` for vm-test.
hydrated() { "$KILN" images | awk '$1 == "vm-test" && $2 == "1.0.0" { print $6 }'; }

# read_disk OUT: boots the image read-only, the guest hashing its disk.
read_disk() {
    "$KILN" run $image --read-only --cmdline 'kiln.entrypoint="/bin/sha256sum /dev/vda"' \
        < /dev/null > "$1" 2>&1
}

# disk_sum FILE: the hash the guest printed.
disk_sum() { grep -o '^[0-9a-f]\{64\}  /dev/vda' "$1" | cut -d' ' -f1; }

# What the guest reads from the same filesystem as a raw file. (Not the
# file's own hash: the guest reads its mounted root through the kernel's
# cache, which holds the superblock as the mount changed it in memory.)
"$KILN" image flatten $image "$WORK/flat.ext4" > /dev/null 2>&1
"$KILN" run --disk "$WORK/flat.ext4" --read-only \
    --cmdline 'kiln.entrypoint="/bin/sha256sum /dev/vda"' < /dev/null > "$WORK/raw.txt" 2>&1
want=$(disk_sum "$WORK/raw.txt")
rm -f "$WORK/flat.ext4"
expect_eq raw-file-read 64 "${#want}"

expect_eq starts-unhydrated 0% "$(hydrated)"
# The store is shared by every scenario of a run (run.sh links it into
# each KILN_HOME), and earlier ones booted this image and recorded its
# working set beside it: start from none, so the first boot below records.
rm -f "$record"

read_disk "$WORK/a.txt" & a=$!
read_disk "$WORK/b.txt" & b=$!
wait $a; status_a=$?
wait $b; status_b=$?
expect_eq concurrent-boots-exit-0 "0 0" "$status_a $status_b"
expect_eq first-concurrent-read-matches "$want" "$(disk_sum "$WORK/a.txt")"
expect_eq second-concurrent-read-matches "$want" "$(disk_sum "$WORK/b.txt")"
expect_eq whole-disk-read-hydrates-all 100% "$(hydrated)"
check first-boot-records-its-working-set test -s "$record"

raw=$(ls "$cache"/*.raw)
size=$(stat -c %s "$raw")
truncate -s 1048576 "$raw"
read_disk "$WORK/truncated.txt"
expect_eq truncated-cache-is-refilled-not-served "$want" "$(disk_sum "$WORK/truncated.txt")"
expect_eq truncated-cache-is-whole-again "$size" "$(stat -c %s "$raw")"

rm -rf "$cache"
"$KILN" run $image --read-only --cmdline 'kiln.entrypoint="/bin/sha256sum /dev/vda"' \
    < /dev/null > "$WORK/killed.txt" 2>&1 &
vm=$!
waited=0
while [ "$(hydrated)" = 0% ] && [ "$waited" -lt 300 ]; do
    sleep 1; waited=$((waited + 1))
done
kill -9 $vm
wait $vm
expect_eq vm-killed-mid-fill 137 "$?"
read_disk "$WORK/after-kill.txt"
expect_eq clean-boot-after-kill-matches "$want" "$(disk_sum "$WORK/after-kill.txt")"

rm -rf "$cache"
check hydrate "$KILN" image hydrate $image
expect_eq hydrate-fills-all 100% "$(hydrated)"
read_disk "$WORK/hydrated.txt"
expect_eq hydrated-read-matches "$want" "$(disk_sum "$WORK/hydrated.txt")"

# present N: the state byte of chunk N in the image's cache (0 absent,
# 1 data, 2 zeros; nothing before the cache exists).
present() { od -An -tu1 -j $((64 + $1)) -N1 "$cache"/*.present 2>/dev/null | tr -d ' '; }

# The working set. Chunk K, the last but one (128 KiB chunks), lies in
# the free space at the end of the filesystem, which booting never reads:
# the first boot reads it on purpose, the later one only sleeps.
chunks=$(od -An -tu4 -j24 -N4 "$cache"/*.present | tr -d ' ')
k=$((chunks - 2))
rm -rf "$cache" "$record"
"$KILN" run $image --read-only \
    --cmdline "kiln.entrypoint=\"/bin/dd if=/dev/vda of=/dev/null bs=131072 skip=$k count=1\"" \
    < /dev/null > "$WORK/ws-first.txt" 2>&1
expect_eq working-set-boot-exits-0 0 "$?"
listed=$(od -An -tu4 -j48 -v "$record" | tr -s ' ' '\n' | grep -cx "$k")
expect_eq working-set-lists-the-chunk-read 1 "$listed"
rm -rf "$cache"
"$KILN" run $image --read-only --cmdline 'kiln.entrypoint="/bin/sleep 600"' \
    < /dev/null > "$WORK/ws-later.txt" 2>&1 &
vm=$!
waited=0
while ! [ "$(present $k)" -ge 1 ] 2>/dev/null && [ "$waited" -lt 300 ]; do
    sleep 1; waited=$((waited + 1))
done
expect_eq later-boot-has-the-working-set-prefetched yes \
    "$([ "$(present $k)" -ge 1 ] 2>/dev/null && echo yes || echo "no (state '$(present $k)')")"
kill -9 $vm
wait $vm
expect_eq sleeping-boot-killed 137 "$?"

# Jailed VMs: the VM process reads the cache and writes nothing, what is
# not there yet it decompresses in memory; its supervisor fills the cache
# in the background, at idle priority, and repairs a damaged one first.
rm -rf "$cache"
(unset KILN_JAIL; read_disk "$WORK/jailed-cold.txt")
expect_eq jailed-cold-read-matches "$want" "$(disk_sum "$WORK/jailed-cold.txt")"
env -u KILN_JAIL "$KILN" run $image --detach --name filler --network none \
    --cmdline 'kiln.entrypoint="/bin/sleep 600"' > /dev/null 2> "$WORK/filler.err"
started=$?
expect_eq jailed-idle-vm-started 0 "$started"
[ "$started" -eq 0 ] || sed 's/^/KILN-INFO filler: /' "$WORK/filler.err"
waited=0
while [ "$(hydrated)" != 100% ] && [ "$waited" -lt 300 ]; do
    sleep 1; waited=$((waited + 1))
done
expect_eq jailed-vms-supervisor-hydrates-all 100% "$(hydrated)"
check terminate-idle-vm env -u KILN_JAIL "$KILN" terminate filler
truncate -s 1048576 "$(ls "$cache"/*.raw)"
(unset KILN_JAIL; read_disk "$WORK/jailed-repaired.txt")
expect_eq jailed-read-of-a-repaired-cache-matches "$want" "$(disk_sum "$WORK/jailed-repaired.txt")"
