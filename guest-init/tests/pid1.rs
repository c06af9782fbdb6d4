//! guest-init as a real PID 1: new PID, mount, UTS and network namespaces,
//! chrooted into a scratch root with busybox as the entrypoint's shell.
//!
//! The test binary of guest-init is dynamically linked, so its shared
//! libraries are copied into the root (found with `ldd`). In a PID
//! namespace reboot(2) does not touch the host: the kernel ends the
//! namespace's init with SIGHUP instead, which is what guest-init's
//! "power off" looks like here.
use std::fs;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::Path;
use std::process::{Command, Output};

const BUSYBOX: &str = "/bin/busybox";
const APPLETS: &[&str] = &[
    "sh", "cat", "tr", "sleep", "grep", "hostname", "echo", "kill",
];

fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "this test creates namespaces and chroots: run it as root"
    );
    assert!(
        Path::new(BUSYBOX).exists(),
        "{BUSYBOX} is missing: apt-get install busybox-static"
    );
}

/// Copies `file` into `root` at the same path.
fn copy_into(root: &Path, file: &Path) {
    let target = root.join(file.strip_prefix("/").unwrap());
    fs::create_dir_all(target.parent().unwrap()).unwrap();
    fs::copy(file, &target).unwrap();
}

/// A root with guest-init at /sbin/init (and its libraries), busybox, and
/// an optional /etc/kiln/init.json.
fn scratch_root(config: Option<&str>) -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    let init = Path::new(env!("CARGO_BIN_EXE_guest-init"));
    let ldd = Command::new("ldd").arg(init).output().unwrap();
    for lib in String::from_utf8_lossy(&ldd.stdout)
        .split_whitespace()
        .filter(|w| w.starts_with('/'))
    {
        copy_into(root.path(), Path::new(lib));
    }
    fs::create_dir_all(root.path().join("sbin")).unwrap();
    fs::copy(init, root.path().join("sbin/init")).unwrap();
    copy_into(root.path(), Path::new(BUSYBOX));
    for applet in APPLETS {
        symlink("busybox", root.path().join("bin").join(applet)).unwrap();
    }
    if let Some(json) = config {
        fs::create_dir_all(root.path().join("etc/kiln")).unwrap();
        fs::write(root.path().join("etc/kiln/init.json"), json).unwrap();
    }
    fs::set_permissions(root.path(), fs::Permissions::from_mode(0o755)).unwrap();
    root
}

/// Boots guest-init as PID 1. Its root is a tmpfs inside the new mount
/// namespace, filled from `root`: guest-init remounts / read-only before
/// it "reboots", and on the host's own filesystem that would reach the
/// host's superblock.
fn boot(root: &Path) -> (Output, String) {
    let mountpoint = tempfile::tempdir().unwrap();
    let script = r#"mount -t tmpfs -o mode=0755 kiln-test "$2" && cp -a "$1/." "$2/" && exec chroot "$2" /sbin/init"#;
    let output = Command::new("unshare")
        .args([
            "--fork",
            "--pid",
            "--mount",
            "--uts",
            "--net",
            "--propagation",
            "private",
            "sh",
            "-c",
            script,
            "sh",
        ])
        .arg(root)
        .arg(mountpoint.path())
        .output()
        .expect("unshare (util-linux) runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output, text)
}

#[test]
fn runs_the_entrypoint_as_pid_1_reaps_orphans_and_reports_its_status() {
    require_root();
    // The entrypoint leaves an orphan behind ((sleep &) exits at once), which
    // becomes PID 1's child; unless PID 1 reaps it, it stays a zombie.
    let script = "echo entry-pid=$$; echo init-cmdline=$(tr '\\\\0' ' ' < /proc/1/cmdline); \
                  (sleep 0.1 &); sleep 0.6; \
                  echo zombies=$(cat /proc/[0-9]*/stat | grep -c ') Z '); \
                  echo hostname=$(hostname); echo tmp=$(grep -c ' /tmp tmpfs' /proc/mounts); exit 3";
    let json =
        serde_json::json!({ "entrypoint": ["/bin/sh", "-c", script], "hostname": "kiln-test" });
    let root = scratch_root(Some(&json.to_string()));
    let (_, text) = boot(root.path());
    for expected in [
        "init-cmdline=/sbin/init",
        "zombies=0",
        "hostname=kiln-test",
        "tmp=1",
        "guest-init: entrypoint exited with status 3",
    ] {
        assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
    }
    assert!(
        !text.contains("entry-pid=1\n"),
        "the entrypoint must not be PID 1:\n{text}"
    );
    assert!(
        !text.contains("cannot remount"),
        "the root must be left read-only and clean:\n{text}"
    );
}

#[test]
fn a_missing_configuration_is_named_and_ends_with_127() {
    require_root();
    let root = scratch_root(None);
    let (_, text) = boot(root.path());
    assert!(
        text.contains("/etc/kiln/init.json: field `entrypoint`: the file is missing"),
        "{text}"
    );
    assert!(text.contains("entrypoint exited with status 127"), "{text}");
}

#[test]
fn run_by_hand_it_exits_with_the_status_instead_of_rebooting() {
    // Not PID 1: no mounts, no reboot; the entrypoint's status is the exit code.
    let status = Command::new(env!("CARGO_BIN_EXE_guest-init"))
        .status()
        .unwrap();
    // No /etc/kiln/init.json on a build host: "not found".
    assert_eq!(status.code(), Some(127));
}

#[test]
fn sigterm_to_pid_1_is_forwarded_to_the_entrypoint() {
    require_root();
    // The entrypoint traps TERM, then signals PID 1: only forwarding brings
    // the signal back to it (nothing else sends one), and its trap's status
    // becomes the reported one.
    let script = "trap 'echo forwarded-term; exit 5' TERM; kill -TERM 1; sleep 5 & wait";
    let json = serde_json::json!({ "entrypoint": ["/bin/sh", "-c", script] });
    let root = scratch_root(Some(&json.to_string()));
    let (_, text) = boot(root.path());
    assert!(text.contains("forwarded-term"), "{text}");
    assert!(text.contains("entrypoint exited with status 5"), "{text}");
}
