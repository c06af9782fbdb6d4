//! The root filesystem images the scenarios boot, made on the host.
//!
//! Two kinds, each listed in one place: hand-made raw ext4 images
//! ([`IMAGES`]) for testing the VMM on its own, found by scenarios as
//! `$KILN_ASSETS/<name>.ext4`; and recipes ([`RECIPES`]) built by
//! `kiln build` into an image store, `$KILN_IMAGES`, which each scenario's
//! `$KILN_HOME` uses (`kiln run NAME:VERSION`, `kiln image flatten`).
use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};

use crate::sh;

const BUSYBOX: &str = "/bin/busybox";

/// One image: a name and the entrypoint its /etc/kiln/init.json names.
struct ImageSpec {
    name: &'static str,
    entrypoint: &'static [&'static str],
}

/// `hello`: guest-init, busybox with every applet, and the guest-side test
/// helpers of `tests/vm/guest/` under /tests.
const IMAGES: &[ImageSpec] = &[ImageSpec {
    name: "hello",
    entrypoint: &["/bin/sh", "-c", "echo hello from kiln guest-init; exit 3"],
}];

/// Image size: busybox (~2 MiB) and guest-init leave room for the tests'
/// scratch files.
const IMAGE_SIZE: &str = "32M";

/// Builds every image into `dir`; returns `dir`.
pub fn build(dir: &Path, guest_init: &Path) -> Result<PathBuf> {
    fs::create_dir_all(dir)?;
    for spec in IMAGES {
        let tree = dir.join(format!("{}.root", spec.name));
        let _ = fs::remove_dir_all(&tree);
        populate(&tree, spec, guest_init)
            .with_context(|| format!("assembling {}", tree.display()))?;
        make_ext4(&tree, &dir.join(format!("{}.ext4", spec.name)))?;
        fs::remove_dir_all(&tree)?;
    }
    Ok(dir.to_path_buf())
}

fn populate(tree: &Path, spec: &ImageSpec, guest_init: &Path) -> Result<()> {
    for dir in [
        "sbin", "bin", "etc/kiln", "tests", "dev", "proc", "sys", "tmp", "run",
    ] {
        fs::create_dir_all(tree.join(dir))?;
    }
    fs::copy(guest_init, tree.join("sbin/init"))?;
    fs::copy(BUSYBOX, tree.join("bin/busybox"))?;
    let applets = sh::output(Command::new(BUSYBOX).arg("--list"))?;
    for applet in applets.lines().filter(|a| *a != "busybox") {
        symlink("busybox", tree.join("bin").join(applet))?;
    }
    let guest_helpers = sh::workspace_root().join("tests/vm/guest");
    if guest_helpers.is_dir() {
        for entry in fs::read_dir(&guest_helpers)? {
            let path = entry?.path();
            fs::copy(
                &path,
                tree.join("tests").join(path.file_name().expect("a file")),
            )?;
        }
    }
    let config = serde_json::json!({ "entrypoint": spec.entrypoint });
    fs::write(
        tree.join("etc/kiln/init.json"),
        serde_json::to_string_pretty(&config)?,
    )?;
    Ok(())
}

/// The recipes scenarios boot, by name and directory (relative to the
/// workspace), in build order: a base before the images that start from it.
const RECIPES: &[(&str, &str)] = &[
    ("hello", "recipes/hello"),
    ("hello-plus", "recipes/hello-plus"),
    ("busybox", "recipes/busybox"),
    ("python", "recipes/python"),
    ("python-echo", "recipes/python-echo"),
    ("python-lambda", "recipes/python-lambda"),
    ("rust-lambda", "recipes/rust-lambda"),
    ("web", "recipes/web"),
    ("vm-test", "tests/vm/image"),
    ("disk-bench", "tests/vm/bench-disk"),
    ("web-bench", "tests/vm/bench-net"),
];

/// Builds the recipes with `kiln build` into the store of `kiln_home`
/// (a no-op for each whose inputs have not changed), their tests skipped:
/// this host may not boot VMs. The scenarios run them inside L1
/// (tests/vm/image-tests.sh).
pub fn build_recipes(kiln: &Path, guest_init: &Path, kiln_home: &Path) -> Result<()> {
    for (recipe, dir) in RECIPES {
        build_recipe(kiln, guest_init, kiln_home, recipe, dir)?;
    }
    Ok(())
}

/// Builds recipes/debian-base, the parent recipes/debian starts from, into
/// the store of `kiln_home`: an import needing no VM, so done here, on the
/// host's own CPUs, once per store. Needs the base tar
/// ([`crate::debian::base`]).
pub fn build_debian_base(kiln: &Path, guest_init: &Path, kiln_home: &Path) -> Result<()> {
    build_recipe(
        kiln,
        guest_init,
        kiln_home,
        "debian-base",
        "recipes/debian-base",
    )
}

fn build_recipe(
    kiln: &Path,
    guest_init: &Path,
    kiln_home: &Path,
    recipe: &str,
    dir: &str,
) -> Result<()> {
    let printed = sh::output(
        Command::new(kiln)
            .arg("build")
            .arg(sh::workspace_root().join(dir))
            .arg("--skip-tests")
            .arg("--init")
            .arg(guest_init)
            .env("KILN_HOME", kiln_home),
    )
    .with_context(|| format!("building the {recipe} recipe"))?;
    eprint!("xtask: {printed}");
    Ok(())
}

/// `mkfs.ext4 -d`, with a fixed UUID, hash seed and time so the image does
/// not change between runs for the same inputs.
fn make_ext4(tree: &Path, image: &Path) -> Result<()> {
    const FIXED_UUID: &str = "6b696c6e-0000-4000-8000-000000000001";
    let _ = fs::remove_file(image);
    sh::run(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-L", "rootfs", "-U", FIXED_UUID])
            .arg("-E")
            .arg(format!("hash_seed={FIXED_UUID},root_owner=0:0"))
            .arg("-d")
            .arg(tree)
            .arg(image)
            .arg(IMAGE_SIZE)
            .env("E2FSPROGS_FAKE_TIME", "1"),
    )
}
