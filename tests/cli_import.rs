//! `kiln image import` of a `docker save` archive made here, and the
//! `--format json` listings, end to end, each test with a Kiln home of its
//! own. busybox-static stands in for guest-init (nothing boots).
use std::path::Path;
use std::process::{Command, Output};

use sha2::{Digest, Sha256};

mod common;
use common::tar_of;

fn kiln(home: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .env("KILN_HOME", home)
        .env("KILN_GUEST_INIT", "/bin/busybox")
        .output()
        .unwrap()
}

fn json(home: &Path, args: &[&str]) -> serde_json::Value {
    let out = kiln(home, args);
    assert!(
        out.status.success(),
        "kiln {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A one-layer `docker save` archive tagged `tag`.
fn docker_archive(tag: &str) -> Vec<u8> {
    let layer = tar_of(&[("bin/app", b"#!/bin/sh\necho app\n")]);
    let diff_id = format!("sha256:{}", kiln_image::hex(&Sha256::digest(&layer)));
    let config = serde_json::json!({
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "config": {"Entrypoint": ["/bin/app"], "Cmd": ["--serve"], "User": "1000",
                   "ExposedPorts": {"80/tcp": {}}, "Labels": {"team": "kiln"}}
    });
    let manifest = serde_json::json!([{"Config": "config.json", "RepoTags": [tag], "Layers": ["l/layer.tar"]}]);
    tar_of(&[
        ("manifest.json", &serde_json::to_vec(&manifest).unwrap()),
        ("config.json", &serde_json::to_vec(&config).unwrap()),
        ("l/layer.tar", &layer),
    ])
}

#[test]
fn an_archive_imports_under_its_own_tag_with_its_config() {
    let home = tempfile::tempdir().unwrap();
    let archive = home.path().join("app.tar");
    std::fs::write(&archive, docker_archive("registry.example/team/app:2.1")).unwrap();
    let out = kiln(home.path(), &["image", "import", archive.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.starts_with("imported app:2.1.0 "),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let manifest = json(home.path(), &["inspect", "app:2.1.0", "--format", "json"]);
    assert_eq!(
        manifest["entrypoint"],
        serde_json::json!(["/bin/app", "--serve"])
    );
    assert_eq!(manifest["exposed_ports"], serde_json::json!(["80/tcp"]));
    assert_eq!(manifest["labels"]["team"], "kiln");
    let files = json(
        home.path(),
        &[
            "inspect",
            "app:2.1.0",
            "--files",
            "/etc/kiln",
            "--format",
            "json",
        ],
    );
    assert_eq!(files[1]["path"], "/etc/kiln/init.json", "{files}");
    let images = json(home.path(), &["images", "--format", "json"]);
    assert_eq!(images[0]["name"], "app");
    // The same reference again is refused; another is taken.
    let again = kiln(home.path(), &["image", "import", archive.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&again.stderr).contains("app:2.1.0 is already in the store"));
    let other = kiln(
        home.path(),
        &["image", "import", archive.to_str().unwrap(), "app:3.0.0"],
    );
    assert!(String::from_utf8_lossy(&other.stdout).starts_with("imported app:3.0.0 "));
}

#[test]
fn a_tag_that_is_no_version_asks_for_one() {
    let home = tempfile::tempdir().unwrap();
    let archive = home.path().join("latest.tar");
    std::fs::write(&archive, docker_archive("app:latest")).unwrap();
    let out = kiln(home.path(), &["image", "import", archive.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("app:latest") && err.contains("NAME:VERSION"),
        "{err}"
    );
    assert_eq!(
        json(home.path(), &["images", "--format", "json"]),
        serde_json::json!([])
    );
}

#[test]
fn listings_are_one_json_document_each() {
    let home = tempfile::tempdir().unwrap();
    assert_eq!(
        json(home.path(), &["ps", "-a", "--format", "json"]),
        serde_json::json!([])
    );
    let types = json(home.path(), &["types", "--format", "json"]);
    assert_eq!(types[0]["name"], "k1.nano");
    assert_eq!(types[0]["default"], true);
}
