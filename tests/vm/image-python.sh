# recipes/python: Debian's python3 with its ELF closure and stdlib runs the
# image's script, which imports an extension module (_json).
. "$(dirname "$0")/lib.sh"

out=$WORK/out.txt
"$KILN" run python:3.11.2 --memory 256 < /dev/null > "$out" 2>&1
expect_eq exit-status 0 "$?"
expect_contains script-ran "$out" '"greeting": "Hello from Python in a Kiln microVM!"'
expect_contains hostname-is-the-image-name "$out" '"hostname": "python"'
