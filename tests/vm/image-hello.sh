# The README's main job: recipes/hello built by `kiln build` and booted by
# `kiln run` from the compressed image in the store: the static program
# greets and the VM exits 0.
. "$(dirname "$0")/lib.sh"

out=$WORK/out.txt
"$KILN" run hello:1.0.0 < /dev/null > "$out" 2>&1
expect_eq exit-status 0 "$?"
expect_contains greeting "$out" "Hello from a Kiln microVM!"
