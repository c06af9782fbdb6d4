//! A container's root disk: the rootfs mount containerd hands over (an
//! overlay of the image's snapshots, or a bind mount of a whole snapshot),
//! made into an ext4 filesystem with guest-init added at [`INIT_PATH`],
//! stored as a Kiln image. The VM boots it with a copy-on-write overlay of
//! its own, as an instance boots its image, so the container's writes
//! never reach the image (nor containerd's snapshot).
//!
//! An overlay's lower directories are the read-only parent chain of the
//! container's snapshot: the image is cached under a key made of that
//! chain (and guest-init's digest), so a second container of the same
//! image builds nothing. A bind mount names no chain: its image is built
//! for the container alone.
use std::ffi::CString;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use kiln_builder::ext4::{self, Ext4Error};
use kiln_image::{DEFAULT_CHUNK_SIZE, ImageError};
use sha2::{Digest, Sha256};

/// Where guest-init is in a container's root disk; the kernel is told
/// (`init=`), as a container image has its own /sbin/init or none.
pub const INIT_PATH: &str = "/.kiln/init";
/// Free space in a container's root filesystem, for its writes (the
/// overlay holds only what is written, so unused space costs nothing).
const FREE_BYTES: u64 = 1 << 30;
/// Changes whenever the way an image is made does: old cache entries are
/// then never found. The image format's version is part of the key too
/// ([`Rootfs::cache_key`]), so that an image of a format this Kiln no
/// longer reads is built again rather than found.
const CACHE_VERSION: &str = "kiln-shim rootfs 1";

/// One mount of a task's rootfs, as containerd's Create hands it over.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountSpec {
    /// The filesystem type (`overlay`, `bind`, …).
    pub kind: String,
    /// What is mounted.
    pub source: String,
    /// The mount options.
    pub options: Vec<String>,
}

/// The rootfs, understood.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Rootfs {
    /// An overlay's lower directories, uppermost first: the image's
    /// layers, read-only. Its upper directory would take the container's
    /// writes under runc; here the VM's overlay does.
    Overlay {
        /// The `lowerdir=` directories, uppermost first.
        lowers: Vec<PathBuf>,
    },
    /// A directory holding the whole tree (the native snapshotter's).
    Bind {
        /// The directory.
        source: PathBuf,
    },
}

/// Why a root disk cannot be made.
#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    /// Create came without a rootfs mount.
    #[error("the task has no rootfs mount: expected one overlay or bind mount from containerd")]
    None,
    /// More than one rootfs mount.
    #[error("the task has {0} rootfs mounts: expected one overlay or bind mount")]
    Many(usize),
    /// A mount type the shim cannot read a tree from.
    #[error("rootfs mount type {0:?}: expected overlay or bind")]
    UnsupportedType(String),
    /// An overlay mount without lower directories.
    #[error("rootfs overlay mount has no lowerdir= option: expected the image's layers")]
    NoLowerDir,
    /// The rootfs could not be mounted to be read, or unmounted.
    #[error("cannot mount the rootfs at {target}")]
    Mount {
        /// Where it was being mounted.
        target: PathBuf,
        /// What the mount said.
        #[source]
        source: io::Error,
    },
    /// A file or directory of the build could not be made or read.
    #[error("cannot prepare {path}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What the file system said.
        #[source]
        source: io::Error,
    },
    /// `cp -a` of the tree failed.
    #[error("cannot copy the rootfs into {stage}: {message}")]
    Copy {
        /// Where it was copied to.
        stage: PathBuf,
        /// What cp said.
        message: String,
    },
    /// The ext4 filesystem could not be made.
    #[error("cannot make the root filesystem")]
    Ext4(#[from] Ext4Error),
    /// The Kiln image could not be written.
    #[error("cannot store the root filesystem as an image")]
    Image(#[from] ImageError),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> RootfsError + '_ {
    move |source| RootfsError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl Rootfs {
    /// The rootfs of `mounts`: exactly one overlay (with `lowerdir=`) or
    /// bind mount.
    pub fn parse(mounts: &[MountSpec]) -> Result<Rootfs, RootfsError> {
        let mount = match mounts {
            [] => return Err(RootfsError::None),
            [mount] => mount,
            _ => return Err(RootfsError::Many(mounts.len())),
        };
        match mount.kind.as_str() {
            "overlay" => {
                let lowers = mount
                    .options
                    .iter()
                    .find_map(|option| option.strip_prefix("lowerdir="))
                    .ok_or(RootfsError::NoLowerDir)?;
                Ok(Rootfs::Overlay {
                    lowers: lowers.split(':').map(PathBuf::from).collect(),
                })
            }
            "bind" | "rbind" => Ok(Rootfs::Bind {
                source: PathBuf::from(&mount.source),
            }),
            other => Err(RootfsError::UnsupportedType(other.to_string())),
        }
    }

    /// The cache key of an overlay's image: its parent chain and
    /// guest-init's digest. `None` for a bind mount.
    pub fn cache_key(&self, init_digest: &str) -> Option<String> {
        let Rootfs::Overlay { lowers } = self else {
            return None;
        };
        let mut hash = Sha256::new();
        hash.update(CACHE_VERSION);
        hash.update(kiln_image::VERSION.to_le_bytes());
        hash.update([0]);
        hash.update(init_digest);
        for lower in lowers {
            hash.update([0]);
            hash.update(lower.as_os_str().as_encoded_bytes());
        }
        Some(kiln_image::hex(&hash.finalize()[..16]))
    }

    /// Mounts the tree at `target` to be read: an overlay of the lower
    /// directories alone (read-only), or a recursive bind mount.
    fn mount(&self, target: &Path) -> Result<(), RootfsError> {
        let mounted = match self {
            // An overlay needs two lower directories when it has no upper
            // one: a single layer is read as it is.
            Rootfs::Overlay { lowers } if lowers.len() == 1 => {
                mount(&lowers[0], target, "", libc::MS_BIND | libc::MS_REC, "")
            }
            Rootfs::Overlay { lowers } => {
                let lowers: Vec<_> = lowers.iter().map(|l| l.to_string_lossy()).collect();
                let options = format!("lowerdir={}", lowers.join(":"));
                mount(
                    Path::new("overlay"),
                    target,
                    "overlay",
                    libc::MS_RDONLY,
                    &options,
                )
            }
            Rootfs::Bind { source } => mount(source, target, "", libc::MS_BIND | libc::MS_REC, ""),
        };
        mounted.map_err(|source| RootfsError::Mount {
            target: target.to_path_buf(),
            source,
        })
    }
}

/// mount(2) of `source` at `target`.
fn mount(
    source: &Path,
    target: &Path,
    fstype: &str,
    flags: libc::c_ulong,
    data: &str,
) -> io::Result<()> {
    let c = |s: &[u8]| CString::new(s).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput));
    let (source, target) = (
        c(source.as_os_str().as_bytes())?,
        c(target.as_os_str().as_bytes())?,
    );
    let (fstype, data) = (c(fstype.as_bytes())?, c(data.as_bytes())?);
    // SAFETY: every pointer is to a NUL-terminated string that lives
    // across the call; the kernel only reads them.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            flags,
            data.as_ptr().cast(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Detaches what is mounted at `target` (and below it).
fn unmount(target: &Path) -> Result<(), RootfsError> {
    let unmount_err = |source| RootfsError::Mount {
        target: target.to_path_buf(),
        source,
    };
    let path = CString::new(target.as_os_str().as_bytes())
        .map_err(|_| unmount_err(io::Error::from(io::ErrorKind::InvalidInput)))?;
    // SAFETY: `path` is NUL-terminated and lives across the call.
    if unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) } != 0 {
        return Err(unmount_err(io::Error::last_os_error()));
    }
    Ok(())
}

/// The root disk image of `rootfs` with guest-init from `init`: the
/// cached one when there is one, else built (into the cache for an
/// overlay, into `work` for a bind mount). `work` is the container's own
/// directory; the build's scratch goes there and is removed.
pub fn image(
    rootfs: &Rootfs,
    init: &Path,
    cache: &Path,
    work: &Path,
) -> Result<PathBuf, RootfsError> {
    let digest = kiln_image::file_digest(init)?;
    let image = match rootfs.cache_key(&digest) {
        Some(key) => cache.join(format!("{key}.kiln")),
        None => work.join("rootfs.kiln"),
    };
    if image.is_file() {
        log::info!("rootfs image {} cached", image.display());
        return Ok(image);
    }
    let scratch = work.join("build");
    let built = build(rootfs, init, &scratch, &image);
    let cleaned = fs::remove_dir_all(&scratch).map_err(io_err(&scratch));
    built.and(cleaned)?;
    Ok(image)
}

/// Builds `image` in `scratch`: the tree copied out of its read-only
/// mount, guest-init added, ext4 made, stored as a Kiln image (staged
/// beside it and renamed, so a reader never sees half of one).
fn build(rootfs: &Rootfs, init: &Path, scratch: &Path, image: &Path) -> Result<(), RootfsError> {
    let (mnt, stage, raw) = (
        scratch.join("mnt"),
        scratch.join("stage"),
        scratch.join("root.ext4"),
    );
    for dir in [&mnt, &stage] {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
    }
    rootfs.mount(&mnt)?;
    let copied = copy_tree(&mnt, &stage);
    let unmounted = unmount(&mnt);
    copied.and(unmounted)?;
    add_init(&stage, init)?;
    let size = ext4::size_for(ext4::content_size(&stage)?, FREE_BYTES);
    ext4::make(&stage, &raw, size, &uuid_of(image))?;
    let parent = image.parent().unwrap_or(Path::new("/"));
    fs::create_dir_all(parent).map_err(io_err(parent))?;
    let staged = image.with_extension("kiln.new");
    kiln_image::write(&raw, &staged, DEFAULT_CHUNK_SIZE)?;
    fs::rename(&staged, image).map_err(io_err(image))
}

/// `cp -a from/. to`: ownership, modes, links, devices and times kept.
fn copy_tree(from: &Path, to: &Path) -> Result<(), RootfsError> {
    let output = Command::new("cp")
        .arg("-a")
        .arg(from.join("."))
        .arg(to)
        .output()
        .map_err(io_err(to))?;
    if !output.status.success() {
        return Err(RootfsError::Copy {
            stage: to.to_path_buf(),
            message: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        });
    }
    Ok(())
}

/// guest-init at [`INIT_PATH`], executable.
fn add_init(stage: &Path, init: &Path) -> Result<(), RootfsError> {
    use std::os::unix::fs::PermissionsExt;
    let target = stage.join(INIT_PATH.trim_start_matches('/'));
    let dir = target.parent().unwrap_or(stage);
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    fs::copy(init, &target).map_err(io_err(&target))?;
    fs::set_permissions(&target, fs::Permissions::from_mode(0o755)).map_err(io_err(&target))
}

/// A filesystem UUID from the image's file name (its cache key).
fn uuid_of(image: &Path) -> String {
    let hex = kiln_image::hex(&Sha256::digest(image.as_os_str().as_encoded_bytes()));
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_vmm::report::one_line;

    fn mount(kind: &str, source: &str, options: &[&str]) -> MountSpec {
        MountSpec {
            kind: kind.into(),
            source: source.into(),
            options: options.iter().map(|o| o.to_string()).collect(),
        }
    }

    #[test]
    fn an_overlay_is_its_lower_directories_and_a_bind_its_source() {
        let overlay = mount(
            "overlay",
            "overlay",
            &[
                "index=off",
                "workdir=/s/9/work",
                "upperdir=/s/9/fs",
                "lowerdir=/s/2/fs:/s/1/fs",
            ],
        );
        assert_eq!(
            Rootfs::parse(&[overlay]).unwrap(),
            Rootfs::Overlay {
                lowers: vec!["/s/2/fs".into(), "/s/1/fs".into()]
            }
        );
        let bind = mount("bind", "/snapshots/7", &["rbind", "rw"]);
        assert_eq!(
            Rootfs::parse(&[bind]).unwrap(),
            Rootfs::Bind {
                source: "/snapshots/7".into()
            }
        );
    }

    #[test]
    fn no_rootfs_or_an_unsupported_one_is_refused_by_name() {
        let cases = [
            (vec![], "the task has no rootfs mount"),
            (
                vec![mount("tmpfs", "tmpfs", &[])],
                "rootfs mount type \"tmpfs\": expected overlay or bind",
            ),
            (
                vec![mount("overlay", "overlay", &["upperdir=/u"])],
                "no lowerdir= option",
            ),
            (
                vec![mount("bind", "/a", &[]), mount("bind", "/b", &[])],
                "2 rootfs mounts",
            ),
        ];
        for (mounts, want) in cases {
            let err = one_line(&Rootfs::parse(&mounts).unwrap_err());
            assert!(err.contains(want), "{err}");
        }
    }

    #[test]
    fn the_cache_key_is_the_parent_chain_and_guest_init() {
        let chain = |lowers: &[&str]| Rootfs::Overlay {
            lowers: lowers.iter().map(PathBuf::from).collect(),
        };
        let key = chain(&["/s/2", "/s/1"]).cache_key("init-a").unwrap();
        assert_eq!(key.len(), 32);
        assert_eq!(
            Some(&key),
            chain(&["/s/2", "/s/1"]).cache_key("init-a").as_ref()
        );
        assert_ne!(
            Some(&key),
            chain(&["/s/1", "/s/2"]).cache_key("init-a").as_ref()
        );
        assert_ne!(
            Some(&key),
            chain(&["/s/2", "/s/1"]).cache_key("init-b").as_ref()
        );
        assert_eq!(
            Rootfs::Bind {
                source: "/s".into()
            }
            .cache_key("init-a"),
            None
        );
    }

    /// Needs root (mount) and e2fsprogs, as CI has them: without, it
    /// fails and says why rather than pass untested.
    #[test]
    fn a_second_container_of_the_same_layers_builds_nothing() {
        // SAFETY: geteuid takes no arguments.
        let euid = unsafe { libc::geteuid() };
        assert_eq!(
            euid, 0,
            "mounting a rootfs needs root: run the tests as root"
        );
        let dir = tempfile::tempdir().unwrap();
        let layer = dir.path().join("layer");
        fs::create_dir_all(layer.join("etc")).unwrap();
        fs::write(layer.join("etc/hostname"), "layer\n").unwrap();
        let init = dir.path().join("init");
        fs::write(&init, "#!/bin/sh\n").unwrap();
        let rootfs = Rootfs::Bind {
            source: layer.clone(),
        };
        let (cache, work) = (dir.path().join("cache"), dir.path().join("work"));
        let built = image(&rootfs, &init, &cache, &work).unwrap();
        assert_eq!(built, work.join("rootfs.kiln"));
        assert!(!work.join("build").exists(), "the scratch is removed");
        let entries = ext4_listing(&built);
        assert!(
            entries.contains(&"/etc/hostname".to_string()),
            "{entries:?}"
        );
        assert!(entries.contains(&INIT_PATH.to_string()), "{entries:?}");
        let overlay = Rootfs::Overlay {
            lowers: vec![layer],
        };
        let cached = image(&overlay, &init, &cache, &work).unwrap();
        assert!(cached.starts_with(&cache));
        let modified = fs::metadata(&cached).unwrap().modified().unwrap();
        assert_eq!(image(&overlay, &init, &cache, &work).unwrap(), cached);
        assert_eq!(fs::metadata(&cached).unwrap().modified().unwrap(), modified);
    }

    fn ext4_listing(image: &Path) -> Vec<String> {
        let reader = kiln_image::Reader::open(image).unwrap();
        let mut raw = Vec::new();
        reader.flatten_to(&mut raw).unwrap();
        ext4::list(&raw[..], "/")
            .unwrap()
            .into_iter()
            .map(|entry| entry.path)
            .collect()
    }
}
