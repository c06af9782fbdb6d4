# Docker-style images and runs: a `docker save` archive made here (busybox
# tar and sha256sum, no registry) goes into the store with no recipe
# (`kiln image import`); its image config is what runs: Entrypoint + Cmd,
# Env, WorkingDir and a non-root User with its supplementary groups, HOME
# and PATH. `kiln run IMAGE -- CMD` replaces only Cmd, with -e, -w and -u.
. "$(dirname "$0")/lib.sh"

# A store of this scenario's own: the shared one stays as the harness built it.
export KILN_HOME=$WORK/own-home

root=$WORK/root
mkdir -p "$root/bin" "$root/etc" "$root/home/app" "$root/srv" "$WORK/archive/l1"
cp /bin/busybox "$root/bin/busybox"
printf 'root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:App:/home/app:/bin/sh\n' > "$root/etc/passwd"
printf 'root:x:0:\napp:x:1000:\nwheel:x:10:app\naudio:x:29:app\n' > "$root/etc/group"
(cd "$root" && tar -cf "$WORK/archive/l1/layer.tar" bin etc home srv)
diff_id=$(sha256sum "$WORK/archive/l1/layer.tar" | cut -d' ' -f1)
# What the entrypoint says about itself, one line.
report='echo "ran $0 as $(busybox id -u):$(busybox id -g) groups=$(busybox id -G) home=$HOME path=$PATH pwd=$(busybox pwd) greeting=$GREETING"'
cat > "$WORK/archive/config.json" <<EOF
{"rootfs": {"type": "layers", "diff_ids": ["sha256:$diff_id"]},
 "config": {"Entrypoint": ["/bin/busybox", "sh", "-c"], "Cmd": ["$(echo "$report" | sed 's/"/\\"/g')", "from-config"],
            "Env": ["GREETING=hello there"], "WorkingDir": "/srv", "User": "app",
            "ExposedPorts": {"8080/tcp": {}}, "Labels": {"org.example.team": "kiln"}}}
EOF
printf '[{"Config": "config.json", "RepoTags": ["docker.io/library/demo:1.2"], "Layers": ["l1/layer.tar"]}]' \
    > "$WORK/archive/manifest.json"
(cd "$WORK/archive" && tar -cf "$WORK/demo.tar" manifest.json config.json l1)

"$KILN" image import "$WORK/demo.tar" --init "$KILN_INIT" > "$WORK/import.txt" 2>&1
expect_eq import-status 0 "$?"
expect_contains import-named-by-repotags "$WORK/import.txt" "imported demo:1.2.0"
"$KILN" inspect demo:1.2.0 > "$WORK/inspect.txt" 2>&1
expect_contains inspect-exposed-ports "$WORK/inspect.txt" '"8080/tcp"'
expect_contains inspect-labels "$WORK/inspect.txt" '"org.example.team": "kiln"'

# The image config as it is: user app, its groups, HOME, WorkingDir, Env.
"$KILN" run demo:1.2.0 < /dev/null > "$WORK/config.txt" 2>&1
expect_eq config-run-status 0 "$?"
expect_contains config-cmd-runs "$WORK/config.txt" "ran from-config as 1000:1000"
expect_contains config-supplementary-groups "$WORK/config.txt" "groups=1000.* 10 29"
expect_contains config-home-and-path "$WORK/config.txt" "home=/home/app path=/usr/local/bin:/usr/bin:/bin"
expect_contains config-workdir-and-env "$WORK/config.txt" "pwd=/srv greeting=hello there"

# CMD replaces Cmd after the Entrypoint; -u with an explicit group, -w, -e.
"$KILN" run demo:1.2.0 -u app:audio -w /home -e 'GREETING=from the command line' \
    -- "$report; exit 3" overridden < /dev/null > "$WORK/override.txt" 2>&1
expect_eq override-exit-status 3 "$?"
expect_contains override-user-group "$WORK/override.txt" "ran overridden as 1000:29 groups=29 home=/home/app"
expect_contains override-workdir-env "$WORK/override.txt" "pwd=/home greeting=from the command line"

# A user the image does not have is named; nothing runs.
"$KILN" run demo:1.2.0 -u nobody < /dev/null > "$WORK/nouser.txt" 2>&1
expect_eq unknown-user-status 127 "$?"
expect_contains unknown-user-named "$WORK/nouser.txt" 'user "nobody": no such user in /etc/passwd'

# An archive whose tag is no version needs NAME:VERSION.
sed 's/demo:1.2/demo:latest/' "$WORK/archive/manifest.json" > "$WORK/m.json" && mv "$WORK/m.json" "$WORK/archive/manifest.json"
(cd "$WORK/archive" && tar -cf "$WORK/latest.tar" manifest.json config.json l1)
"$KILN" image import "$WORK/latest.tar" --init "$KILN_INIT" > "$WORK/latest.txt" 2>&1
expect_eq unversioned-refused 1 "$?"
expect_contains unversioned-asks-for-a-reference "$WORK/latest.txt" "give the image's NAME:VERSION"
