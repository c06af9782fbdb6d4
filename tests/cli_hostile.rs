//! Issue 16's host-safety cases through the real `kiln` binary, run as
//! root as the report's were: a hostile base is built into a Kiln home of
//! its own, next to a victim directory that must not change, and the
//! build fails with a one-line error or succeeds inside its stage. The
//! unit tests beside `builder/src/{stage,oci,ext4,assemble}.rs` cover
//! each case one layer down.
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn kiln(home: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .env("KILN_HOME", home)
        .env("KILN_GUEST_INIT", "/bin/busybox")
        .output()
        .unwrap()
}

/// One tar entry with exactly these bytes as its name and link name.
fn entry(builder: &mut tar::Builder<Vec<u8>>, name: &[u8], kind: tar::EntryType, link: &[u8]) {
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(kind);
    header.set_size(if kind == tar::EntryType::Regular {
        5
    } else {
        0
    });
    header.set_mode(0o755);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(0);
    let old = header.as_old_mut();
    old.name[..name.len()].copy_from_slice(name);
    old.linkname[..link.len()].copy_from_slice(link);
    header.set_cksum();
    let data: &[u8] = if kind == tar::EntryType::Regular {
        b"pwned"
    } else {
        b""
    };
    builder.append(&header, data).unwrap();
}

struct Setup {
    dir: tempfile::TempDir,
    outside: PathBuf,
}

impl Setup {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let outside = dir.path().join("outside");
        fs::create_dir(&outside).unwrap();
        fs::set_permissions(&outside, fs::Permissions::from_mode(0o755)).unwrap();
        fs::write(outside.join("init"), "the host's init").unwrap();
        Setup { dir, outside }
    }

    /// Builds a recipe whose base is the tarball `base`, with a
    /// `[[files]]` entry under /srv.
    fn build(&self, base: Vec<u8>) -> Output {
        let recipe = self.dir.path().join("recipe");
        fs::create_dir_all(&recipe).unwrap();
        fs::write(recipe.join("base.tar"), base).unwrap();
        fs::write(recipe.join("page"), "page").unwrap();
        fs::write(
            recipe.join("recipe.toml"),
            "base = \"tar:base.tar\"\nfree = \"1M\"\n[image]\nname = \"hostile\"\nversion = \"1.0.0\"\n\
             [[files]]\nsrc = \"page\"\ndst = \"/srv/page\"\n[run]\nentrypoint = [\"/x\"]\n",
        )
        .unwrap();
        kiln(
            &self.dir.path().join("home"),
            &["build", recipe.to_str().unwrap()],
        )
    }

    fn assert_untouched(&self) {
        let names: Vec<_> = fs::read_dir(&self.outside)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["init"], "the victim directory changed");
        assert_eq!(
            fs::read_to_string(self.outside.join("init")).unwrap(),
            "the host's init"
        );
        assert_eq!(fs::metadata(&self.outside).unwrap().mode() & 0o7777, 0o755);
    }
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Case 1: a name carrying debugfs commands (`dump` writes a host file)
/// is refused by name; nothing runs it and nothing is published.
#[test]
fn a_name_with_debugfs_commands_is_refused() {
    let setup = Setup::new();
    let planted = setup.outside.join("planted");
    let name = format!("a\"\ndump /sbin/init {}\n#", planted.display());
    let mut base = tar::Builder::new(Vec::new());
    entry(&mut base, name.as_bytes(), tar::EntryType::Regular, b"");
    let out = setup.build(base.into_inner().unwrap());
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("control character") && err.contains("base.tar"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(!planted.exists());
    setup.assert_untouched();
    let images = kiln(&setup.dir.path().join("home"), &["images"]);
    assert_eq!(String::from_utf8_lossy(&images.stdout).lines().count(), 1);
}

/// Case 3: `tmp`, `sbin` and `srv` planted as links to a host directory:
/// the skeleton's chmod, guest-init's copy and `[[files]]` stay inside.
#[test]
fn planted_links_lead_assembly_nowhere_outside() {
    let setup = Setup::new();
    let target = setup.outside.as_os_str().as_encoded_bytes().to_vec();
    let mut base = tar::Builder::new(Vec::new());
    for name in [&b"sbin"[..], b"srv", b"etc"] {
        entry(&mut base, name, tar::EntryType::Symlink, &target);
    }
    // Inside the stage, the same absolute path exists: the links resolve
    // there, and the build succeeds.
    let mut inside = Vec::new();
    for part in setup.outside.iter().skip(1) {
        inside.extend_from_slice(part.as_encoded_bytes());
        entry(&mut base, &inside, tar::EntryType::Directory, b"");
        inside.push(b'/');
    }
    let out = setup.build(base.into_inner().unwrap());
    assert!(out.status.success(), "{}", stderr(&out));
    setup.assert_untouched();
    let files = kiln(
        &setup.dir.path().join("home"),
        &["inspect", "hostile:1.0.0", "--files"],
    );
    let files = String::from_utf8_lossy(&files.stdout);
    let inside = setup.outside.display();
    for landed in ["init", "page", "kiln/init.json"] {
        assert!(
            files.contains(&format!("{inside}/{landed}")),
            "{landed}: {files}"
        );
    }
}

/// Everything under `$KILN_HOME` is its user's alone.
#[test]
fn the_home_and_the_store_are_private() {
    let setup = Setup::new();
    let out = setup.build({
        let mut base = tar::Builder::new(Vec::new());
        entry(&mut base, b"bin/tool", tar::EntryType::Regular, b"");
        base.into_inner().unwrap()
    });
    assert!(out.status.success(), "{}", stderr(&out));
    let home = setup.dir.path().join("home");
    let mode = |p: &Path| fs::metadata(p).unwrap().mode() & 0o7777;
    assert_eq!(mode(&home), 0o700);
    let image = home.join("images/hostile/1.0.0");
    for dir in [
        home.join("images"),
        home.join("images/hostile"),
        image.clone(),
    ] {
        assert_eq!(mode(&dir), 0o700, "{dir:?}");
    }
    for file in ["image.kiln", "manifest.json"] {
        assert_eq!(mode(&image.join(file)), 0o600, "{file}");
    }
    // The image's own files keep the modes they were given.
    let files = kiln(&home, &["inspect", "hostile:1.0.0", "--files", "/bin"]);
    let files = String::from_utf8_lossy(&files.stdout);
    assert!(files.contains("-755") || files.contains("-0755"), "{files}");
}
