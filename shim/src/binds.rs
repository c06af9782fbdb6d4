//! A container spec's `mounts`, as a VM can have them. The guest cannot
//! see the host's filesystem, so each bind mount's source (a ConfigMap's
//! or Secret's files, the service account token, a pod's /etc/hosts, an
//! emptyDir) is read here and copied into the guest with the container's
//! first process ([`CopiedMount`]), as Kata Containers copies them when
//! no filesystem is shared; guest-init mounts the copy. The first
//! container of the VM to mount a source makes its copy, later ones share
//! it: later changes on the host (a ConfigMap updated) do not reach the
//! guest, and nothing is written back.
//!
//! Not copied:
//! - the mounts of the guest's own filesystems, which every spec lists
//!   (containerd's defaults): `proc`, `sysfs`, `devpts`, `mqueue`,
//!   `cgroup` and `tmpfs` mounts at [`GUEST_PROVIDED`] places;
//! - the bind at /etc/resolv.conf, the pod's DNS, which reaches the guest
//!   on its kernel command line (`crate::network`);
//! - CRI's bind of the sandbox's /dev/shm: the guest has its own.
//!
//! Any other mount is refused, as are sources that are not files,
//! directories or symbolic links (a socket, a device), and more than
//! [`MAX_COPIED_BYTES`] or [`MAX_COPIED_ENTRIES`] in all: one line
//! naming the mount, at Create.
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use guest_init::exec::{
    CopiedEntry, CopiedKind, CopiedMount, MAX_COPIED_BYTES, MAX_COPIED_ENTRIES,
};
use oci_spec::runtime::Mount;
use sha2::{Digest, Sha256};

/// Where the guest mounts filesystems of its own (guest-init's /proc,
/// /sys, /dev, /dev/pts and /dev/shm, and /run in the guest's root),
/// which a spec's non-bind mounts there ask for too.
pub const GUEST_PROVIDED: [&str; 8] = [
    "/proc",
    "/sys",
    "/sys/fs/cgroup",
    "/dev",
    "/dev/pts",
    "/dev/shm",
    "/dev/mqueue",
    "/run",
];
/// The pod's DNS, carried on the kernel command line instead.
const RESOLV_CONF: &str = "/etc/resolv.conf";
/// CRI binds the sandbox's shared memory here; the guest mounts its own.
const DEV_SHM: &str = "/dev/shm";
/// Hex digits of a source's digest in its key: 64 bits, so two sources
/// of one VM never share a key by chance.
const KEY_DIGITS: usize = 16;

/// Why a mount cannot be had in the VM.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    /// A mount type other than a bind, where the guest has no filesystem
    /// of its own.
    #[error(
        "mount {destination} (type {kind}): expected a bind mount, which is copied into the VM, or the guest's own filesystems at /proc, /sys, /dev and /run"
    )]
    Type {
        /// The mount's destination.
        destination: PathBuf,
        /// Its type.
        kind: String,
    },
    /// A bind mount without a source.
    #[error("mount {0}: a bind mount without a source")]
    NoSource(PathBuf),
    /// The source, or a file under it, could not be read.
    #[error("mount {destination}: cannot read {path}")]
    Read {
        /// The mount's destination.
        destination: PathBuf,
        /// The host file.
        path: PathBuf,
        /// What the system said.
        #[source]
        source: std::io::Error,
    },
    /// Something under the source that cannot be copied.
    #[error("mount {destination}: {path} is not a file, directory or symbolic link")]
    Special {
        /// The mount's destination.
        destination: PathBuf,
        /// The host file.
        path: PathBuf,
    },
    /// A file name that is not UTF-8, which the request cannot carry.
    #[error("mount {destination}: {path} has a name that is not UTF-8")]
    Name {
        /// The mount's destination.
        destination: PathBuf,
        /// The host file.
        path: PathBuf,
    },
    /// The copies outgrow what one request carries.
    #[error(
        "mount {destination}: over {MAX_COPIED_BYTES} bytes or {MAX_COPIED_ENTRIES} files in the container's bind mounts, the most the kiln runtime copies into a VM"
    )]
    TooLarge {
        /// The mount that went over.
        destination: PathBuf,
    },
}

/// The copies of `mounts` (a spec's) the guest mounts, in the spec's
/// order; the module's rules say which.
pub fn copied(mounts: &[Mount]) -> Result<Vec<CopiedMount>, BindError> {
    let mut budget = Budget::default();
    let mut copies = Vec::new();
    for mount in mounts {
        let destination = mount.destination();
        if !is_bind(mount) {
            if GUEST_PROVIDED
                .iter()
                .any(|place| destination == Path::new(place))
            {
                continue;
            }
            return Err(BindError::Type {
                destination: destination.clone(),
                kind: mount.typ().clone().unwrap_or_default(),
            });
        }
        if destination == Path::new(RESOLV_CONF) || destination == Path::new(DEV_SHM) {
            continue;
        }
        let source = mount
            .source()
            .as_deref()
            .ok_or_else(|| BindError::NoSource(destination.clone()))?;
        copies.push(copy(source, destination, read_only(mount), &mut budget)?);
    }
    Ok(copies)
}

/// A bind: the type `bind`, or a `bind`/`rbind` option (as `ctr --mount`
/// writes one, with no type).
fn is_bind(mount: &Mount) -> bool {
    let mut options = mount.options().iter().flatten();
    mount.typ().as_deref() == Some("bind") || options.any(|o| o == "bind" || o == "rbind")
}

fn read_only(mount: &Mount) -> bool {
    mount.options().iter().flatten().any(|o| o == "ro")
}

/// What the copies have used of a request's limits.
#[derive(Default)]
struct Budget {
    bytes: u64,
    entries: usize,
}

/// The copy of `source` (followed, as a bind mount follows it), and what
/// is under it when it is a directory, not following links.
fn copy(
    source: &Path,
    destination: &Path,
    read_only: bool,
    budget: &mut Budget,
) -> Result<CopiedMount, BindError> {
    let top = fs::metadata(source).map_err(read_error(destination, source))?;
    let mut entries = Vec::new();
    // (host path, path under the source, metadata): a directory's entries
    // are listed when it is taken, so parents come first.
    let mut pending = vec![(source.to_path_buf(), String::new(), top)];
    while let Some((path, relative, metadata)) = pending.pop() {
        budget.entries += 1;
        if budget.entries > MAX_COPIED_ENTRIES {
            return Err(too_large(destination));
        }
        let kind = if metadata.is_dir() {
            pending.extend(children(&path, &relative, destination)?.into_iter().rev());
            CopiedKind::Dir
        } else {
            leaf(&path, relative.is_empty(), &metadata, destination, budget)?
        };
        entries.push(CopiedEntry {
            path: relative,
            kind,
            mode: metadata.permissions().mode() & 0o7777,
            uid: metadata.uid(),
            gid: metadata.gid(),
        });
    }
    Ok(CopiedMount {
        destination: destination.to_string_lossy().into_owned(),
        source_key: source_key(source),
        read_only,
        entries,
    })
}

/// The directory `dir`'s entries by name, each with its path under the
/// source (`dir`'s is `relative`) and its own metadata (links not
/// followed).
fn children(
    dir: &Path,
    relative: &str,
    destination: &Path,
) -> Result<Vec<(PathBuf, String, fs::Metadata)>, BindError> {
    let mut children = fs::read_dir(dir)
        .and_then(|list| {
            list.map(|entry| entry.map(|e| e.path()))
                .collect::<std::io::Result<Vec<_>>>()
        })
        .map_err(read_error(destination, dir))?;
    children.sort();
    children
        .into_iter()
        .map(|child| {
            let metadata = fs::symlink_metadata(&child).map_err(read_error(destination, &child))?;
            let name = child
                .file_name()
                .and_then(|n| n.to_str())
                .ok_or_else(|| name_error(destination, &child))?;
            let under = match relative {
                "" => name.to_string(),
                parent => format!("{parent}/{name}"),
            };
            Ok((child, under, metadata))
        })
        .collect()
}

/// What a file or link at `path` is, its contents counted against the
/// budget; anything else is refused. Only the source itself (`top`) is
/// followed if a link.
fn leaf(
    path: &Path,
    top: bool,
    metadata: &fs::Metadata,
    destination: &Path,
    budget: &mut Budget,
) -> Result<CopiedKind, BindError> {
    if metadata.is_file() {
        let within = MAX_COPIED_BYTES - budget.bytes;
        let bytes = read_regular(path, top, within).map_err(read_error(destination, path))?;
        budget.bytes += bytes.len() as u64;
        if budget.bytes > MAX_COPIED_BYTES {
            return Err(too_large(destination));
        }
        return Ok(CopiedKind::File(bytes));
    }
    if metadata.file_type().is_symlink() {
        let target = fs::read_link(path).map_err(read_error(destination, path))?;
        let target = target
            .to_str()
            .ok_or_else(|| name_error(destination, path))?;
        return Ok(CopiedKind::Symlink(target.to_string()));
    }
    Err(BindError::Special {
        destination: destination.to_path_buf(),
        path: path.to_path_buf(),
    })
}

/// A read of `path`'s error, for `map_err`.
fn read_error(destination: &Path, path: &Path) -> impl FnOnce(std::io::Error) -> BindError {
    let (destination, path) = (destination.to_path_buf(), path.to_path_buf());
    move |source| BindError::Read {
        destination,
        path,
        source,
    }
}

fn name_error(destination: &Path, path: &Path) -> BindError {
    BindError::Name {
        destination: destination.to_path_buf(),
        path: path.to_path_buf(),
    }
}

fn too_large(destination: &Path) -> BindError {
    BindError::TooLarge {
        destination: destination.to_path_buf(),
    }
}

/// The bytes of the regular file at `path`, at most `within` and one
/// more (which tells the caller it is too large). Only the source itself
/// is `followed` if a link; no open waits (a FIFO put there meanwhile),
/// and what the open finds must still be a regular file.
fn read_regular(path: &Path, followed: bool, within: u64) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let no_follow = if followed { 0 } else { libc::O_NOFOLLOW };
    let file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(no_follow | libc::O_NONBLOCK)
        .open(path)?;
    if !file.metadata()?.is_file() {
        return Err(std::io::Error::other("no longer a regular file"));
    }
    let mut bytes = Vec::new();
    file.take(within + 1).read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// The key of a host source: the start of its path's SHA-256, in hex.
fn source_key(source: &Path) -> String {
    let digest = Sha256::digest(source.as_os_str().as_encoded_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    hex[..KEY_DIGITS].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use oci_spec::runtime::MountBuilder;

    fn mount(
        kind: Option<&str>,
        source: Option<&Path>,
        destination: &str,
        options: &[&str],
    ) -> Mount {
        let mut builder = MountBuilder::default()
            .destination(destination)
            .options(options.iter().map(|o| o.to_string()).collect::<Vec<_>>());
        if let Some(kind) = kind {
            builder = builder.typ(kind);
        }
        if let Some(source) = source {
            builder = builder.source(source);
        }
        builder.build().unwrap()
    }

    #[test]
    fn a_directory_is_copied_whole_parents_first_with_its_links() {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("config");
        fs::create_dir_all(config.join("..data")).unwrap();
        fs::write(config.join("..data/app.conf"), "level = debug\n").unwrap();
        fs::set_permissions(
            config.join("..data/app.conf"),
            fs::Permissions::from_mode(0o640),
        )
        .unwrap();
        std::os::unix::fs::symlink("..data/app.conf", config.join("app.conf")).unwrap();
        let mounts = [mount(
            Some("bind"),
            Some(&config),
            "/etc/app",
            &["rbind", "ro"],
        )];
        let copies = copied(&mounts).unwrap();
        assert_eq!(copies.len(), 1);
        let copy = &copies[0];
        assert_eq!(
            (copy.destination.as_str(), copy.read_only),
            ("/etc/app", true)
        );
        assert_eq!(copy.source_key.len(), KEY_DIGITS);
        let paths: Vec<(&str, &CopiedKind)> = copy
            .entries
            .iter()
            .map(|e| (e.path.as_str(), &e.kind))
            .collect();
        assert_eq!(
            paths,
            [
                ("", &CopiedKind::Dir),
                ("..data", &CopiedKind::Dir),
                (
                    "..data/app.conf",
                    &CopiedKind::File(b"level = debug\n".to_vec())
                ),
                ("app.conf", &CopiedKind::Symlink("..data/app.conf".into())),
            ]
        );
        assert_eq!(copy.entries[2].mode, 0o640);
    }

    #[test]
    fn one_source_has_one_key_and_a_file_is_copied_as_one() {
        let dir = tempfile::tempdir().unwrap();
        let hosts = dir.path().join("hosts");
        fs::write(&hosts, "10.88.0.5 web\n").unwrap();
        let mounts = [
            mount(None, Some(&hosts), "/etc/hosts", &["rbind", "rw"]),
            mount(Some("bind"), Some(&hosts), "/srv/hosts", &[]),
        ];
        let copies = copied(&mounts).unwrap();
        assert_eq!(copies[0].source_key, copies[1].source_key);
        assert!(!copies[0].read_only);
        assert_eq!(copies[0].entries.len(), 1);
        assert_eq!(
            copies[0].entries[0].kind,
            CopiedKind::File(b"10.88.0.5 web\n".to_vec())
        );
    }

    #[test]
    fn the_guests_own_filesystems_and_the_pods_dns_are_not_copied() {
        let mounts = [
            mount(Some("proc"), Some(Path::new("proc")), "/proc", &[]),
            mount(Some("tmpfs"), Some(Path::new("tmpfs")), "/dev", &[]),
            mount(Some("tmpfs"), Some(Path::new("shm")), "/dev/shm", &[]),
            mount(
                Some("cgroup"),
                Some(Path::new("cgroup")),
                "/sys/fs/cgroup",
                &[],
            ),
            mount(
                Some("bind"),
                Some(Path::new("/nonexistent/shm")),
                "/dev/shm",
                &["rbind"],
            ),
            mount(
                Some("bind"),
                Some(Path::new("/nonexistent/resolv")),
                "/etc/resolv.conf",
                &[],
            ),
        ];
        assert!(copied(&mounts).unwrap().is_empty());
    }

    #[test]
    fn what_cannot_be_copied_is_refused_naming_the_mount() {
        let cases = [
            (
                mount(Some("tmpfs"), Some(Path::new("tmpfs")), "/scratch", &[]),
                "mount /scratch (type tmpfs): expected a bind mount",
            ),
            (
                mount(Some("bind"), None, "/data", &[]),
                "mount /data: a bind mount without a source",
            ),
            (
                mount(
                    Some("bind"),
                    Some(Path::new("/nonexistent/kiln")),
                    "/data",
                    &[],
                ),
                "mount /data: cannot read /nonexistent/kiln: No such file",
            ),
            (
                mount(Some("bind"), Some(Path::new("/dev/null")), "/null", &[]),
                "mount /null: /dev/null is not a file, directory or symbolic link",
            ),
        ];
        for (mount, expected) in cases {
            let err = kiln_vmm::report::one_line(&copied(&[mount]).unwrap_err());
            assert!(err.starts_with(expected), "{err}");
        }
    }

    #[test]
    fn copies_stop_at_the_limits() {
        let dir = tempfile::tempdir().unwrap();
        let big = dir.path().join("big");
        fs::write(&big, vec![0u8; MAX_COPIED_BYTES as usize + 1]).unwrap();
        let err = copied(&[mount(Some("bind"), Some(&big), "/big", &[])]).unwrap_err();
        assert!(matches!(err, BindError::TooLarge { .. }), "{err}");
        let many = dir.path().join("many");
        fs::create_dir(&many).unwrap();
        for i in 0..MAX_COPIED_ENTRIES {
            fs::create_dir(many.join(i.to_string())).unwrap();
        }
        let err = copied(&[mount(Some("bind"), Some(&many), "/many", &[])]).unwrap_err();
        assert!(matches!(err, BindError::TooLarge { .. }), "{err}");
    }
}
