# Fault injection (issue 23): kill -9 of `kiln build` (host-side steps)
# at 20 seeded random points (tests/vm/store-faults.sh). Each build
# replaces the same NAME:VERSION, so kills also land in the store's
# replacement of a published image.
. "$(dirname "$0")/lib.sh"
. "$(dirname "$0")/store-faults.sh"

# A host-side build on busybox: 2 MiB of random bytes and the point's
# number, so that each point builds anew and replaces the last.
mkdir -p "$WORK/recipe"
build() {
    cat > "$WORK/recipe/recipe.toml" <<RECIPE
base = "busybox:1.35.0"

[image]
name = "faulty"
version = "1.0.0"

[[build]]
run = 'dd if=/dev/urandom of="\$DESTDIR/blob" bs=1M count=2 2>/dev/null && echo $1 > "\$DESTDIR/point"'
RECIPE
    exec "$KILN" build "$WORK/recipe" --init "$KILN_INIT" --skip-tests
}
inject build
