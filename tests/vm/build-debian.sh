# recipes/debian: a child of debian-base (the Debian 12 minbase root
# mmdebstrap makes, imported into an image on the host by the harness)
# whose VM step builds a .deb shipped as source with the recipe, installs
# it with dpkg and makes a user with useradd; its tests run the installed
# program and look the user up, so the published image has both. It
# stores only the chunks its step changed. Built again from nothing, it
# has the same digest: the step's clock leaves no trace (SOURCE_DATE_EPOCH
# for useradd, dpkg's log removed).
. "$(dirname "$0")/lib.sh"

recipe=$KILN_WORKSPACE/recipes/debian
# A build publishes by renaming from $KILN_HOME/tmp into the store, and a
# child links its parent's file: a store of this scenario's own, on this
# home's filesystem, the parent copied in.
rm -f "$KILN_HOME/images" && mkdir -p "$KILN_HOME/images"
cp -a "$KILN_IMAGES/debian-base" "$KILN_HOME/images/"

out=$WORK/debian.txt
started=$(date +%s)
"$KILN" build "$recipe" --init "$KILN_INIT" --progress < /dev/null > "$out" 2>&1
status=$?
expect_eq debian-build-exit-status 0 "$status"
# A failure's cause is in the step's or the tests' output: show its end.
[ "$status" = 0 ] || tail -n 40 "$out"
echo "build-debian: cold build with tests took $(($(date +%s) - started)) s (nested, emulated); its phases:"
grep '^kiln: \[' "$out"
expect_contains debian-step-output-streamed "$out" "^kiln: step 1 (dpkg-deb .*) | Setting up kiln-hello (1.0.0)"
expect_contains debian-deb-program-runs "$out" "test PASS /usr/bin/kiln-hello"
expect_contains debian-deb-installed "$out" "test PASS /usr/bin/dpkg-query"
expect_contains debian-user-made "$out" "test PASS /usr/bin/id kiln-svc"
expect_contains debian-published "$out" "^built debian:12.0.0 .*; 3 test(s) passed"
digest() { "$KILN" inspect debian:12.0.0 | sed -n 's/.*"digest": "\(sha256:[0-9a-f]*\)".*/\1/p'; }
first=$(digest)
check debian-digest-read [ -n "$first" ]
# The child's own bytes (OWN, column 4, MiB) are a small part of its
# parent's: most of Debian is shared, not stored twice.
"$KILN" images > "$WORK/images.txt" 2>&1
sed 's/^/KILN-INFO images: /' "$WORK/images.txt"
own_share=$(awk '$1 == "debian-base" {p = $4} $1 == "debian" {c = $4} END {if (p > 0) printf "%.3f", c / p}' "$WORK/images.txt")
echo "build-debian: own bytes over the parent's: $own_share"
check debian-shares-its-parents-chunks awk -v r="$own_share" 'BEGIN {exit !(r != "" && r < 0.25)}'

# Reproducible: built again from nothing (tests skipped: they do not
# change the image), the same bytes.
"$KILN" rm debian:12.0.0 > /dev/null 2>&1
started=$(date +%s)
"$KILN" build "$recipe" --init "$KILN_INIT" --skip-tests < /dev/null > "$WORK/again.txt" 2>&1
expect_eq debian-rebuild-exit-status 0 "$?"
echo "build-debian: cold build without tests took $(($(date +%s) - started)) s (nested, emulated)"
expect_eq debian-rebuild-same-digest "$first" "$(digest)"
