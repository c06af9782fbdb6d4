# Images share their parent's chunks: two one-file children of hello
# store only what hello lacks and link hello's file (`kiln images` shows
# them sharing); `kiln rm` of one child frees only its own bytes, and
# removing the parent too leaves the other child whole and bootable.
. "$(dirname "$0")/lib.sh"

# A store of this scenario's own, on this home's filesystem (the run's
# store is shared by its scenarios, linked from elsewhere): hello copied
# in, its children built here.
rm "$KILN_HOME/images" && mkdir -p "$KILN_HOME/images/hello"
cp -a "$KILN_IMAGES/hello/1.0.0" "$KILN_HOME/images/hello/"
hello_file=$KILN_HOME/images/hello/1.0.0/image.kiln

# child NAME TEXT: builds NAME:1.0.0, hello plus /etc/note saying TEXT.
child() {
    mkdir -p "$WORK/$1"
    echo "$2" > "$WORK/$1/note"
    cat > "$WORK/$1/recipe.toml" <<RECIPE
base = "hello:1.0.0"

[image]
name = "$1"
version = "1.0.0"

[[files]]
src = "note"
dst = "/etc/note"
RECIPE
    "$KILN" build "$WORK/$1" --init "$KILN_INIT" --skip-tests < /dev/null > "$WORK/$1.txt" 2>&1
}

# Bytes of the store's image files, each file once however many links.
# (stat, not find -printf: the test machine's busybox find has no -printf.)
store_bytes() {
    find "$KILN_HOME/images" -type f -exec stat -c '%i %s' {} \; | sort -u | awk '{s += $2} END {print s + 0}'
}

child share-a "the first child"
expect_eq build-first-child 0 "$?"
child share-b "the second child"
expect_eq build-second-child 0 "$?"
expect_eq parent-file-linked-by-both-children 3 "$(stat -c %h "$hello_file")"

"$KILN" images > "$WORK/images.txt" 2>&1
sed 's/^/KILN-INFO images: /' "$WORK/images.txt"
# OWN is column 4, SHARED column 5 (MiB, one decimal).
shares=$(awk '$1 == "hello" {h = $4} $1 ~ /^share-/ && $5 + 0 > 0 && $4 * 4 < h {n++} END {print n + 0}' "$WORK/images.txt")
expect_eq images-show-both-children-sharing 2 "$shares"

own_a=$(find "$KILN_HOME/images/share-a" -type f -exec stat -c '%h %s' {} \; | awk '$1 == 1 {s += $2} END {print s + 0}')
expect_eq first-child-owns-some-bytes 1 "$([ "$own_a" -gt 0 ] && echo 1)"
before=$(store_bytes)
check rm-first-child "$KILN" rm share-a:1.0.0
expect_eq store-shrinks-by-the-childs-own-bytes "$own_a" "$((before - $(store_bytes)))"
expect_eq parent-file-still-linked 2 "$(stat -c %h "$hello_file")"

# The parent goes too: its file stays, in the other child's directory.
check rm-parent-before-its-child "$KILN" rm hello:1.0.0
kept=$(find "$KILN_HOME/images/share-b" -name '*.kiln' ! -name image.kiln -exec stat -c %h {} \;)
expect_eq parent-file-kept-for-the-child 1 "$kept"
"$KILN" inspect share-b:1.0.0 --files /etc > "$WORK/files.txt" 2>&1
expect_contains child-reads-whole "$WORK/files.txt" "/etc/note"
out=$WORK/boot.txt
"$KILN" run share-b:1.0.0 --read-only < /dev/null > "$out" 2>&1
expect_eq child-boots-after-parent-removed 0 "$?"
expect_contains child-runs-the-parents-entrypoint "$out" "Hello from a Kiln microVM!"

check rm-last-child "$KILN" rm share-b:1.0.0
expect_eq store-empty-after-the-last-user 0 "$(store_bytes)"
