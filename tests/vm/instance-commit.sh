# kiln commit, EC2's "create image": a running instance is refused; once
# stopped, its root volume becomes a new image whose parent is the
# instance's image, and which boots (read-write and read-only) with what
# the instance wrote; the parent stays as it was; a terminated instance
# is refused.
. "$(dirname "$0")/lib.sh"

# A commit publishes by renaming from $KILN_HOME/tmp into the store, so the
# store must be a directory on this home's filesystem; the harness's images
# are linked into it one by one and stay as they were built.
rm "$KILN_HOME/images" && mkdir "$KILN_HOME/images"
for image in "$KILN_IMAGES"/*; do ln -s "$image" "$KILN_HOME/images/"; done

id=$("$KILN" run vm-test:1.0.0 --detach --name src \
    --cmdline 'kiln.entrypoint="/tests/commit.sh write"' 2> "$WORK/launch.err")
expect_eq launch-exit-status 0 "$?"
waited=0
while ! "$KILN" logs src 2>/dev/null | grep -q "commit: written" && [ "$waited" -lt 300 ]; do
    sleep 1; waited=$((waited + 1))
done
"$KILN" logs src > "$WORK/console.txt" 2>&1
expect_contains guest-wrote "$WORK/console.txt" "commit: written"

"$KILN" commit src newimg:1.0.0 > "$WORK/running.txt" 2>&1
expect_eq running-refused 1 "$?"
expect_contains refusal-names-instance-and-state "$WORK/running.txt" \
    "cannot commit instance src ($id): it is running; stop it first"

check stop "$KILN" stop src
"$KILN" commit src newimg:1.0.0 > "$WORK/commit.txt" 2>&1
expect_eq commit-exit-status 0 "$?"
expect_contains commit-prints-reference-and-size "$WORK/commit.txt" \
    "^committed newimg:1.0.0 [0-9a-f]*… ([0-9.]* MiB, [0-9.]* MiB raw), parent vm-test:1.0.0$"
"$KILN" images > "$WORK/images.txt" 2>&1
expect_contains images-lists-it-with-its-parent "$WORK/images.txt" \
    "^newimg  *1\.0\.0  *[0-9a-f]*  *[0-9.]*M  *[0-9.]*M  *[0-9?%][0-9%]*  *vm-test:1\.0\.0 "
"$KILN" inspect newimg:1.0.0 > "$WORK/inspect.txt" 2>&1
expect_contains description-names-the-instance "$WORK/inspect.txt" \
    "\"description\": \"committed from instance src ($id)\""
"$KILN" commit src newimg:1.0.0 > "$WORK/again.txt" 2>&1
expect_eq existing-reference-refused 1 "$?"
expect_contains existing-reference-named "$WORK/again.txt" "newimg:1.0.0 is already in the store"
# The same volume commits to the same image: content-addressed.
"$KILN" commit src newimg:1.0.1 > /dev/null 2>&1
"$KILN" inspect newimg:1.0.1 > "$WORK/inspect2.txt" 2>&1
expect_eq same-volume-same-digest "$(grep '"digest"' "$WORK/inspect.txt")" \
    "$(grep '"digest"' "$WORK/inspect2.txt")"
expect_eq same-volume-same-key "$(grep '"build_key"' "$WORK/inspect.txt")" \
    "$(grep '"build_key"' "$WORK/inspect2.txt")"
check nothing-left-in-scratch [ -z "$(ls "$KILN_HOME/tmp")" ]

# `kiln stop` left the guest's root mounted: the image is the instance's
# volume with its ext4 journal replayed, as the next mount would.
"$KILN" image flatten src "$WORK/src.ext4" > /dev/null 2>&1
"$KILN" image flatten newimg:1.0.0 "$WORK/newimg.ext4" > /dev/null 2>&1
e2fsck -fn "$WORK/src.ext4" > "$WORK/fsck-src.txt" 2>&1
expect_contains stopped-volume-has-a-journal-to-replay "$WORK/fsck-src.txt" "skipping journal recovery"
# (E2FSCK_TIME: the clock kiln's replay gives e2fsck, 2026-01-01, so that
# both write the same superblock.)
E2FSCK_TIME=1767225600 e2fsck -p -E journal_only "$WORK/src.ext4" > /dev/null 2>&1
check image-is-the-volume-with-its-journal-replayed cmp "$WORK/src.ext4" "$WORK/newimg.ext4"
check image-filesystem-is-clean e2fsck -fn "$WORK/newimg.ext4"
rm -f "$WORK/src.ext4" "$WORK/newimg.ext4"
"$KILN" inspect newimg:1.0.0 --files / > "$WORK/files.txt" 2>&1
expect_contains inspect-sees-the-file "$WORK/files.txt" " /committed.txt$"

"$KILN" run newimg:1.0.0 --cmdline 'kiln.entrypoint="/tests/commit.sh read"' \
    < /dev/null > "$WORK/boot.txt" 2>&1
expect_eq new-image-exit-status 0 "$?"
expect_contains new-image-has-the-file "$WORK/boot.txt" "^kiln-committed $id"
"$KILN" run newimg:1.0.0 --read-only --cmdline 'kiln.entrypoint="/tests/commit.sh read"' \
    < /dev/null > "$WORK/boot-ro.txt" 2>&1
expect_eq new-image-boots-read-only 0 "$?"
expect_contains read-only-boot-has-the-file "$WORK/boot-ro.txt" "^kiln-committed $id"
"$KILN" run vm-test:1.0.0 --read-only --cmdline 'kiln.entrypoint="/tests/commit.sh read"' \
    < /dev/null > "$WORK/parent.txt" 2>&1
expect_contains parent-is-unchanged "$WORK/parent.txt" "^no committed file"

check terminate "$KILN" terminate src
# A terminated instance's name is free again: it is found by its id.
"$KILN" commit "$id" other:1.0.0 > "$WORK/terminated.txt" 2>&1
expect_eq terminated-refused 1 "$?"
expect_contains terminated-refusal-says-why "$WORK/terminated.txt" \
    "cannot commit instance src ($id): it is terminated"
