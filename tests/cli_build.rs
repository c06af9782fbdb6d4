//! `kiln build`, `images`, `inspect` and `rm` end to end on the example
//! recipes, each test with a Kiln home of its own. busybox-static stands in
//! for guest-init: any static binary will do for building.
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

mod common;
use common::tar_of;

const INIT_STAND_IN: &str = "/bin/busybox";

fn recipe(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("recipes")
        .join(name)
}

fn kiln(home: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .env("KILN_HOME", home)
        .env("KILN_GUEST_INIT", INIT_STAND_IN)
        // No kernel: these tests build, and boot nothing.
        .env("KILN_KERNEL", "/nonexistent/vmlinux")
        .output()
        .unwrap()
}

fn ok(home: &Path, args: &[&str]) -> String {
    let out = kiln(home, args);
    assert!(
        out.status.success(),
        "kiln {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Builds recipes/NAME, its tests skipped: running them boots VMs, which
/// tests/vm/ does (`cargo xtask vm-test`).
fn build(home: &Path, name: &str) -> String {
    ok(
        home,
        &["build", recipe(name).to_str().unwrap(), "--skip-tests"],
    )
}

#[test]
fn building_twice_reuses_the_stored_image() {
    let home = tempfile::tempdir().unwrap();
    assert!(build(home.path(), "hello").starts_with("built hello:1.0.0 "));
    assert!(build(home.path(), "hello").starts_with("hello:1.0.0 is up to date (cached"));
}

/// A recipe with tests is refused before anything is built where they
/// cannot run (this host cannot boot VMs, or has no kernel), naming the
/// override; `--skip-tests` publishes it marked untested, and a build
/// that would run them does not take that image for a cached one.
#[test]
fn tests_run_or_are_skipped_out_loud() {
    let home = tempfile::tempdir().unwrap();
    let hello = recipe("hello");
    let (_, err) = fails(home.path(), &["build", hello.to_str().unwrap()]);
    if kiln_vmm::host::detect().can_boot_linux() {
        assert!(
            err.contains("no guest kernel at /nonexistent/vmlinux"),
            "{err}"
        );
    } else {
        assert!(
            err.contains("this host cannot boot one") && err.contains("--skip-tests"),
            "{err}"
        );
    }
    assert!(!home.path().join("images").exists(), "nothing is published");
    assert!(!home.path().join("tmp").exists(), "nothing is built");

    assert!(build(home.path(), "hello").ends_with("; untested (--skip-tests)\n"));
    let images = ok(home.path(), &["images"]);
    assert!(
        images
            .lines()
            .any(|l| l.starts_with("hello ") && l.contains(" untested ")),
        "{images}"
    );
    let manifest: serde_json::Value =
        serde_json::from_str(&ok(home.path(), &["inspect", "hello:1.0.0"])).unwrap();
    assert_eq!(manifest["test_results"], serde_json::Value::Null);
    assert_eq!(
        manifest["tests"][0]["expect_stdout"],
        "Hello from a Kiln microVM!"
    );
    let (_, err) = fails(home.path(), &["build", hello.to_str().unwrap()]);
    assert!(
        err.contains("--skip-tests") || err.contains("no guest kernel"),
        "{err}"
    );
    let (_, err) = fails(home.path(), &["image", "test", "hello:1.0.0"]);
    assert!(err.contains("hello:1.0.0's tests boot the image"), "{err}");
}

#[test]
fn two_clean_builds_are_byte_identical() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    build(a.path(), "hello");
    build(b.path(), "hello");
    let image = |home: &Path| std::fs::read(home.join("images/hello/1.0.0/image.kiln")).unwrap();
    assert!(image(a.path()) == image(b.path()), "the two builds differ");
}

#[test]
fn inspect_lists_files_from_inside_the_image() {
    let home = tempfile::tempdir().unwrap();
    build(home.path(), "busybox");
    let files = ok(home.path(), &["inspect", "busybox:1.35.0", "--files"]);
    for expected in [
        "/sbin/init",
        "/etc/kiln/init.json",
        "/bin/busybox",
        "/bin/sh -> busybox",
        "d1777     0:0",
    ] {
        assert!(files.contains(expected), "{expected:?} not in:\n{files}");
    }
    let etc = ok(
        home.path(),
        &["inspect", "busybox:1.35.0", "--files", "/etc"],
    );
    assert!(!etc.contains("/bin/"), "{etc}");
    let manifest: serde_json::Value =
        serde_json::from_str(&ok(home.path(), &["inspect", "busybox:1.35.0"])).unwrap();
    assert_eq!(manifest["entrypoint"], serde_json::json!(["/bin/sh"]));
    assert!(manifest["digest"].as_str().unwrap().starts_with("sha256:"));
}

#[test]
fn a_child_image_inherits_its_parent_and_outlives_it() {
    let home = tempfile::tempdir().unwrap();
    let out = kiln(
        home.path(),
        &[
            "build",
            recipe("hello-plus").to_str().unwrap(),
            "--skip-tests",
        ],
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("base image hello:1.0.0 is not in the store")
    );
    build(home.path(), "hello");
    build(home.path(), "hello-plus");
    let files = ok(home.path(), &["inspect", "hello-plus:1.0.0", "--files"]);
    assert!(
        files.contains("/bin/hello") && files.contains("/etc/motd"),
        "{files}"
    );
    let manifest: serde_json::Value =
        serde_json::from_str(&ok(home.path(), &["inspect", "hello-plus:1.0.0"])).unwrap();
    assert_eq!(
        (manifest["parent"].as_str(), &manifest["entrypoint"]),
        (Some("hello:1.0.0"), &serde_json::json!(["/bin/hello"]))
    );
    let images = ok(home.path(), &["images"]);
    assert!(
        images
            .lines()
            .any(|l| l.starts_with("hello-plus") && l.contains("hello:1.0.0")),
        "{images}"
    );
    // NAME VERSION DIGEST OWN SHARED: the child reads most of its chunks
    // from hello's file.
    let column = |name: &str, n: usize| -> f64 {
        let row = images.lines().find(|l| l.starts_with(name)).unwrap();
        let value = row.split_whitespace().nth(n).unwrap();
        value.trim_end_matches('M').parse().unwrap()
    };
    assert!(
        column("hello-plus ", 4) > column("hello-plus ", 3),
        "{images}"
    );

    // The child shares the parent's chunks: removing the parent frees
    // nothing the child reads, and the child still reads whole.
    let removed = ok(home.path(), &["rm", "hello:1.0.0"]);
    assert!(removed.starts_with("removed hello:1.0.0 ("), "{removed}");
    let files = ok(home.path(), &["inspect", "hello-plus:1.0.0", "--files"]);
    assert!(files.contains("/bin/hello"), "{files}");
    ok(home.path(), &["rm", "hello-plus:1.0.0"]);
    assert_eq!(
        ok(home.path(), &["images"]).lines().count(),
        1,
        "only the header is left"
    );
}

/// recipes/web: the page on top of the busybox image, whose httpd serves it.
#[test]
fn the_web_image_adds_its_page_to_busybox_and_runs_httpd() {
    let home = tempfile::tempdir().unwrap();
    build(home.path(), "busybox");
    assert!(build(home.path(), "web").starts_with("built web:1.0.0 "));
    let files = ok(home.path(), &["inspect", "web:1.0.0", "--files"]);
    for expected in [
        "/srv/www/index.html",
        "/bin/httpd -> busybox",
        "/bin/wget -> busybox",
    ] {
        assert!(
            files.lines().any(|l| l.ends_with(expected)),
            "{expected} in {files}"
        );
    }
    let manifest: serde_json::Value =
        serde_json::from_str(&ok(home.path(), &["inspect", "web:1.0.0"])).unwrap();
    assert_eq!(manifest["parent"], "busybox:1.35.0");
    assert_eq!(manifest["entrypoint"][0], "/bin/httpd");
}

#[test]
fn a_bad_recipe_is_named_and_nothing_is_stored() {
    let home = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("recipe.toml"),
        "[image]\nname = \"x\"\nversion = \"one\"\n",
    )
    .unwrap();
    let out = kiln(home.path(), &["build", dir.path().to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("recipe.toml:3: `image.version`"),
        "{stderr}"
    );
    assert!(!home.path().join("images").exists());
}

/// An OCI image layout tar: index.json → manifest → two layers, the
/// second deleting a file of the first.
fn oci_image_layout() -> Vec<u8> {
    use sha2::Digest;
    let hex = |bytes: &[u8]| {
        sha2::Sha256::digest(bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    };
    let lower = tar_of(&[
        ("app/run", b"#!/bin/sh\necho from oci\n"),
        ("app/old.conf", b"old"),
    ]);
    let upper = tar_of(&[("app/.wh.old.conf", b""), ("app/new.conf", b"new")]);
    let layer = |bytes: &[u8]| serde_json::json!({"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": format!("sha256:{}", hex(bytes)), "size": bytes.len()});
    let manifest = serde_json::to_vec(
        &serde_json::json!({"schemaVersion": 2, "layers": [layer(&lower), layer(&upper)]}),
    )
    .unwrap();
    let index = serde_json::to_vec(&serde_json::json!({"schemaVersion": 2, "manifests": [{"digest": format!("sha256:{}", hex(&manifest))}]})).unwrap();
    let blob = |bytes: &[u8]| format!("blobs/sha256/{}", hex(bytes));
    let (lower_path, upper_path, manifest_path) = (blob(&lower), blob(&upper), blob(&manifest));
    tar_of(&[
        ("oci-layout", br#"{"imageLayoutVersion": "1.0.0"}"#),
        ("index.json", &index),
        (&manifest_path, &manifest),
        (&lower_path, &lower),
        (&upper_path, &upper),
    ])
}

#[test]
fn an_image_from_an_oci_archive_has_its_layers_applied() {
    let home = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        recipe("oci-demo").join("recipe.toml"),
        dir.path().join("recipe.toml"),
    )
    .unwrap();
    std::fs::write(dir.path().join("image.tar"), oci_image_layout()).unwrap();
    assert!(
        ok(
            home.path(),
            &["build", dir.path().to_str().unwrap(), "--skip-tests"]
        )
        .starts_with("built oci-demo:1.0.0 ")
    );
    let files = ok(
        home.path(),
        &["inspect", "oci-demo:1.0.0", "--files", "/app"],
    );
    assert!(
        files.contains("/app/run") && files.contains("/app/new.conf"),
        "{files}"
    );
    assert!(
        !files.contains("old.conf"),
        "the upper layer's whiteout deletes old.conf:\n{files}"
    );
}

#[test]
fn a_base_chain_that_leads_back_to_the_image_is_refused() {
    let home = tempfile::tempdir().unwrap();
    build(home.path(), "hello");
    build(home.path(), "hello-plus");
    // hello:1.0.0 rebuilt on top of hello-plus, which starts from hello:1.0.0.
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(recipe("hello").join("recipe.toml")).unwrap();
    std::fs::write(
        dir.path().join("recipe.toml"),
        format!("base = \"hello-plus:1.0.0\"\n{text}"),
    )
    .unwrap();
    std::fs::copy(recipe("hello").join("hello.c"), dir.path().join("hello.c")).unwrap();
    let out = kiln(
        home.path(),
        &["build", dir.path().to_str().unwrap(), "--skip-tests"],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("a cycle: hello:1.0.0 -> hello-plus:1.0.0 -> hello:1.0.0"),
        "{stderr}"
    );
}

/// Runs `kiln`, expecting it to fail; returns its stderr.
fn fails(home: &Path, args: &[&str]) -> (Option<i32>, String) {
    let out = kiln(home, args);
    assert!(!out.status.success(), "kiln {args:?} succeeded");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn flatten_writes_a_clean_filesystem_of_the_images_size() {
    let home = tempfile::tempdir().unwrap();
    build(home.path(), "hello");
    let out = home.path().join("hello.ext4");
    let out_arg = out.to_str().unwrap();
    ok(home.path(), &["image", "flatten", "hello:1.0.0", out_arg]);
    let manifest: serde_json::Value =
        serde_json::from_str(&ok(home.path(), &["inspect", "hello:1.0.0"])).unwrap();
    let raw_size = std::fs::metadata(&out).unwrap().len();
    assert_eq!(Some(raw_size), manifest["raw_size"].as_u64(), "{manifest}");
    let fsck = Command::new("e2fsck")
        .args(["-fn", out_arg])
        .output()
        .unwrap();
    assert!(
        fsck.status.success(),
        "{}",
        String::from_utf8_lossy(&fsck.stdout)
    );
    let (_, err) = fails(home.path(), &["image", "flatten", "nobody", out_arg]);
    assert!(err.contains("\"nobody\" is neither"), "{err}");
}

#[test]
fn an_instance_keeps_its_image_and_its_image_cannot_be_removed() {
    let home = tempfile::tempdir().unwrap();
    build(home.path(), "hello");
    // Any file passes for a kernel: these runs end before a guest boots
    // (here for want of hardware KVM, elsewhere at the kernel's ELF check),
    // after the instance and its root volume exist.
    let kernel = home.path().join("not-a-kernel");
    std::fs::write(&kernel, "x").unwrap();
    let kernel = kernel.to_str().unwrap();
    let run = |args: &[&str]| fails(home.path(), &[&["run", "--kernel", kernel], args].concat());
    assert_eq!(run(&["hello:1.0.0", "--name", "web"]).0, Some(125));
    let ps = ok(home.path(), &["ps", "-a"]);
    let id = ps
        .lines()
        .find(|l| l.contains(" web "))
        .expect("web is listed");
    let id = id.split_whitespace().next().unwrap();
    assert!(
        home.path()
            .join("instances")
            .join(id)
            .join("root.overlay")
            .is_file(),
        "{ps}"
    );
    assert!(ps.contains("stopped"), "{ps}");
    let (status, err) = run(&["busybox:1.35.0", "--name", "web"]);
    assert_eq!(status, Some(125));
    assert!(
        err.contains("runs hello:1.0.0, not busybox:1.35.0"),
        "{err}"
    );
    let (_, err) = run(&["--name", "db"]);
    assert!(err.contains("no instance named \"db\""), "{err}");
    let (_, err) = run(&["hello:1.0.0", "--name", "../etc"]);
    assert!(err.contains("instance name \"../etc\""), "{err}");
    let (_, err) = run(&["hello:1.0.0", "--type", "t2.micro"]);
    assert!(err.contains("unknown instance type \"t2.micro\""), "{err}");
    let (_, err) = fails(home.path(), &["start", "nobody"]);
    assert!(err.contains("no instance \"nobody\""), "{err}");
    let (_, err) = fails(home.path(), &["stop", "web"]);
    assert!(
        err.contains("cannot stop an instance that is stopped"),
        "{err}"
    );
    let (_, err) = run(&["nothing:1.0"]);
    assert!(err.contains("nothing:1.0"), "{err}");
    let (_, err) = fails(home.path(), &["rm", "hello:1.0.0"]);
    assert!(err.contains("instance(s) web"), "{err}");

    // The untouched root volume flattens to the image's own filesystem.
    let [from_image, from_instance] = ["hello:1.0.0", "web"].map(|source| {
        let out = home.path().join(format!("{source}.ext4"));
        ok(
            home.path(),
            &["image", "flatten", source, out.to_str().unwrap()],
        );
        std::fs::read(out).unwrap()
    });
    assert!(from_image == from_instance, "the volumes differ");
}

#[test]
fn a_stopped_instance_commits_to_a_child_of_its_image() {
    let home = tempfile::tempdir().unwrap();
    build(home.path(), "hello");
    // As above: the run fails before a guest boots, after the instance
    // and its root volume exist; the instance is then stopped.
    let kernel = home.path().join("not-a-kernel");
    std::fs::write(&kernel, "x").unwrap();
    let kernel = kernel.to_str().unwrap();
    let run = ["run", "--kernel", kernel, "hello:1.0.0", "--name", "web"];
    assert_eq!(fails(home.path(), &run).0, Some(125));

    let out = ok(home.path(), &["commit", "web", "web-image:1.0.0"]);
    assert!(out.starts_with("committed web-image:1.0.0 "), "{out}");
    assert!(
        out.trim_end().ends_with("MiB raw), parent hello:1.0.0"),
        "{out}"
    );
    let images = ok(home.path(), &["images"]);
    let line = images
        .lines()
        .find(|l| l.starts_with("web-image "))
        .unwrap_or_else(|| panic!("web-image not listed:\n{images}"));
    assert!(line.contains(" hello:1.0.0 "), "{line}");
    let manifest: serde_json::Value =
        serde_json::from_str(&ok(home.path(), &["inspect", "web-image:1.0.0"])).unwrap();
    assert_eq!(manifest["parent"], "hello:1.0.0");
    let description = manifest["description"].as_str().unwrap();
    assert!(
        description.starts_with("committed from instance web (i-"),
        "{description}"
    );
    assert_eq!(manifest["entrypoint"], serde_json::json!(["/bin/hello"]));

    // The untouched volume, its image and the commit hold one filesystem.
    let [volume, parent, commit] = ["web", "hello:1.0.0", "web-image:1.0.0"].map(|source| {
        let out = home.path().join("flat.ext4");
        ok(
            home.path(),
            &["image", "flatten", source, out.to_str().unwrap()],
        );
        std::fs::read(out).unwrap()
    });
    assert!(
        volume == commit && parent == commit,
        "the filesystems differ"
    );

    let (_, err) = fails(home.path(), &["commit", "web", "web-image:1.0.0"]);
    assert!(
        err.contains("web-image:1.0.0 is already in the store"),
        "{err}"
    );
    let (_, err) = fails(home.path(), &["commit", "web", "web-image"]);
    assert!(err.contains("expected NAME:VERSION"), "{err}");
    let (_, err) = fails(home.path(), &["commit", "nobody", "x:1.0.0"]);
    assert!(err.contains("no instance \"nobody\""), "{err}");
    let ps = ok(home.path(), &["ps", "-a"]);
    let id = ps.lines().find(|l| l.contains(" web ")).unwrap();
    let id = id.split_whitespace().next().unwrap();
    ok(home.path(), &["terminate", "web"]);
    let (_, err) = fails(home.path(), &["commit", id, "x:1.0.0"]);
    assert!(
        err.contains(&format!(
            "cannot commit instance web ({id}): it is terminated"
        )),
        "{err}"
    );
    assert!(
        std::fs::read_dir(home.path().join("tmp"))
            .unwrap()
            .all(|e| !e
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with(".scratch.partial-")),
        "scratch left behind"
    );
}

#[test]
fn killing_the_cli_mid_operation_never_leaves_a_half_written_record() {
    let home = tempfile::tempdir().unwrap();
    build(home.path(), "hello");
    let kernel = home.path().join("not-a-kernel");
    std::fs::write(&kernel, "x").unwrap();
    let launch = || {
        Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(["run", "hello:1.0.0", "--detach", "--kernel"])
            .arg(&kernel)
            .env("KILN_HOME", home.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap()
    };
    // The kill points spread over what a whole launch takes on this host
    // now (under load, tens of milliseconds pass before the record is
    // even made), measured by one launch left to fail on its own.
    let started = std::time::Instant::now();
    launch().wait().unwrap();
    let whole = started.elapsed();
    for point in 0..20 {
        let mut cli = launch();
        std::thread::sleep(whole * point / 20);
        cli.kill().unwrap();
        cli.wait().unwrap();
    }
    // Whatever moment each CLI died at, every record reads whole, and none
    // claims a VMM that is not there: once the VMMs the CLIs started have
    // failed on the bad kernel (seconds on a loaded host), none is pending
    // or running. A record left claiming one never settles.
    let settled = |ps: &str| {
        ps.lines()
            .skip(1)
            .all(|line| !line.contains("running") && !line.contains("pending"))
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let mut ps = ok(home.path(), &["ps", "-a"]);
    while !settled(&ps) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(200));
        ps = ok(home.path(), &["ps", "-a"]);
    }
    assert!(settled(&ps), "{ps}");
    let instances = std::fs::read_dir(home.path().join("instances")).unwrap();
    for entry in instances {
        let dir = entry.unwrap().path();
        if !dir.file_name().unwrap().to_string_lossy().starts_with("i-") {
            continue; // a directory still being made when its CLI died
        }
        let record = std::fs::read(dir.join("instance.json")).unwrap();
        serde_json::from_slice::<serde_json::Value>(&record)
            .unwrap_or_else(|err| panic!("{}: {err}", dir.display()));
    }
}

/// `kiln image hydrate` fills the image's hydration cache, which `kiln
/// images` reports and `kiln rm` removes with the image.
#[test]
fn hydrate_fills_the_cache_that_images_shows_and_rm_removes() {
    let home = tempfile::tempdir().unwrap();
    build(home.path(), "hello");
    let hydrated = || {
        let listing = ok(home.path(), &["images"]);
        let row = listing.lines().find(|l| l.starts_with("hello ")).unwrap();
        // NAME VERSION DIGEST OWN SHARED HYDRATED
        row.split_whitespace().nth(5).unwrap().to_string()
    };
    assert_eq!(hydrated(), "0%");
    ok(home.path(), &["image", "hydrate", "hello:1.0.0"]);
    assert_eq!(hydrated(), "100%");
    let cache = home.path().join("cache");
    let mut files: Vec<String> = std::fs::read_dir(&cache)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    files.sort();
    assert_eq!(files.len(), 2, "{files:?}");
    assert!(files[0].ends_with(".present") && files[1].ends_with(".raw"));
    // Hydrated, the image still flattens to the same bytes.
    let out = home.path().join("hello.ext4");
    ok(
        home.path(),
        &["image", "flatten", "hello:1.0.0", out.to_str().unwrap()],
    );
    ok(home.path(), &["rm", "hello:1.0.0"]);
    assert_eq!(std::fs::read_dir(&cache).unwrap().count(), 0);
    let (_, err) = fails(home.path(), &["image", "hydrate", "hello:1.0.0"]);
    assert!(err.contains("no image hello:1.0.0"), "{err}");
}

/// A printing command whose reader has gone (`kiln types | head -c1`)
/// ends by SIGPIPE, quietly, as `ls` does: no panic in `println!`.
#[test]
fn a_printing_command_ends_quietly_when_its_reader_goes() {
    use std::os::unix::process::ExitStatusExt;
    let home = tempfile::tempdir().unwrap();
    let (reader, writer) = std::io::pipe().unwrap();
    // The reader is closed before kiln writes: its first write fails.
    drop(reader);
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("types")
        .env("KILN_HOME", home.path())
        .stdout(writer)
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.signal(), Some(libc::SIGPIPE), "{stderr}");
    assert!(stderr.is_empty(), "{stderr}");
}
