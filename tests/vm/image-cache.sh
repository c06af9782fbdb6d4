# The host-wide hydration cache of an image ($KILN_HOME/cache): two VMs
# booting the image at once while the cache fills, a VM killed mid-fill
# then a clean boot, a damaged (truncated) cache file, and
# `kiln image hydrate`. Each VM reads its whole root disk; every read must
# match the image's raw filesystem.
. "$(dirname "$0")/lib.sh"

image=vm-test:1.0.0
cache="$KILN_HOME/cache"

# hydrated NAME: the HYDRATED column of `kiln images` for vm-test.
hydrated() { "$KILN" images | awk '$1 == "vm-test" && $2 == "1.0.0" { print $5 }'; }

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

read_disk "$WORK/a.txt" & a=$!
read_disk "$WORK/b.txt" & b=$!
wait $a; status_a=$?
wait $b; status_b=$?
expect_eq concurrent-boots-exit-0 "0 0" "$status_a $status_b"
expect_eq first-concurrent-read-matches "$want" "$(disk_sum "$WORK/a.txt")"
expect_eq second-concurrent-read-matches "$want" "$(disk_sum "$WORK/b.txt")"
expect_eq whole-disk-read-hydrates-all 100% "$(hydrated)"

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
