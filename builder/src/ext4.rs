//! ext4 filesystems: made with `mkfs.ext4 -d` (e2fsprogs) from a staging
//! tree, deterministically, and read back with the `ext4` crate.
//!
//! Determinism: the UUID and the directory hash seed derive from the
//! content, every timestamp is [`FIXED_TIME`] (staged files are touched to
//! it, and e2fsprogs takes it from E2FSPROGS_FAKE_TIME), so the same tree
//! gives the same bytes.
use std::collections::{BTreeSet, HashMap, HashSet};
use std::fs::{self, File};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use ext4::{Checksums, Enhanced, Inode, Options, SuperBlock};
use positioned_io::ReadAt;

use crate::sandbox::{Sandbox, SandboxError};
use crate::stage::{self, MAX_DEPTH, Stage, StageError};

/// 2026-01-01T00:00:00Z: every timestamp in a Kiln image.
pub const FIXED_TIME: i64 = 1_767_225_600;
const BLOCK: u64 = 4096;
/// The journal and metadata of a small ext4 (mkfs's defaults for a few
/// tens of MiB), with room to spare.
const FIXED_OVERHEAD: u64 = 6 << 20;
/// Where the superblock starts, and the fields of it that say whether a
/// journal waits to be replayed: `s_magic` (u16) and `s_feature_incompat`
/// (u32) at these offsets into it.
const SUPERBLOCK: u64 = 1024;
const S_MAGIC: usize = 56;
const S_FEATURE_INCOMPAT: usize = 96;
const EXT4_MAGIC: u16 = 0xef53;
/// `INCOMPAT_RECOVER`: set while mounted, cleared by a clean unmount.
const INCOMPAT_RECOVER: u32 = 0x4;

/// Errors from making or reading a filesystem.
#[derive(Debug, thiserror::Error)]
pub enum Ext4Error {
    /// A file of the tree or the filesystem image could not be read or
    /// changed.
    #[error("cannot read or write {path}")]
    Io {
        /// The host path.
        path: PathBuf,
        /// What the system said.
        #[source]
        source: io::Error,
    },
    /// An e2fsprogs tool (`mkfs.ext4`, `e2fsck`, `debugfs`) could not be
    /// started at all.
    #[error("cannot run {tool} on {image} (apt-get install e2fsprogs)")]
    Tool {
        /// The program.
        tool: &'static str,
        /// The filesystem image it was to work on.
        image: PathBuf,
        /// Why it did not start.
        #[source]
        source: io::Error,
    },
    /// `mkfs.ext4`, or the `debugfs` run that pins the change times, ran
    /// and failed.
    #[error("mkfs.ext4 failed for {image}: {message}")]
    Mkfs {
        /// The filesystem image being made.
        image: PathBuf,
        /// What the tool printed.
        message: String,
    },
    /// The `ext4` crate could not read the filesystem: not ext4, or
    /// damaged, or using a feature it does not know.
    #[error("cannot read the filesystem")]
    Read(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// [`list`] found nothing at the path it was asked for.
    #[error("no {0} in the image")]
    NotFound(String),
    /// `e2fsck` ran but did not leave the journal replayed.
    #[error("e2fsck could not replay the journal of {image}: {message}")]
    Fsck {
        /// The filesystem image.
        image: PathBuf,
        /// What e2fsck printed, and its exit status.
        message: String,
    },
    /// `e2fsck`'s sandbox could not be made, entered or taken down.
    #[error("cannot run e2fsck sandboxed on {image}")]
    Sandbox {
        /// The filesystem image.
        image: PathBuf,
        /// What went wrong.
        #[source]
        source: SandboxError,
    },
    /// A name in the filesystem (or the tree to make one of) is one no
    /// image may hold ([`stage::check_name`]).
    #[error("{path:?} in the filesystem: {reason}; names from images may not have one")]
    BadName {
        /// The path in the image.
        path: PathBuf,
        /// What is wrong with the name.
        reason: &'static str,
    },
    /// A directory is reached twice (it was linked into itself or into
    /// two places): walking on would never end.
    #[error(
        "{path} in the filesystem: directory inode {inode} is reached a second time (a directory linked into itself or twice)"
    )]
    Loop {
        /// The path it was reached by the second time.
        path: PathBuf,
        /// Its inode number.
        inode: u32,
    },
    /// A path in the filesystem is more than [`MAX_DEPTH`] directories
    /// deep.
    #[error("{path} in the filesystem: deeper than {MAX_DEPTH} directories")]
    TooDeep {
        /// The path in the image.
        path: PathBuf,
    },
    /// Writing an extracted entry into the stage failed.
    #[error("cannot extract the filesystem")]
    Stage(#[from] StageError),
}

/// The `ext4` crate's error (an `anyhow::Error`, its chain kept) as the
/// cause of [`Ext4Error::Read`].
fn read_err(err: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Ext4Error {
    Ext4Error::Read(err.into())
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> Ext4Error + '_ {
    move |source| Ext4Error::Io {
        path: path.into(),
        source,
    }
}

/// Bytes the tree occupies as ext4 blocks, plus an inode's share per entry.
pub fn content_size(tree: &Path) -> Result<u64, Ext4Error> {
    let mut total = 0;
    for entry in walk(tree)? {
        let meta = fs::symlink_metadata(&entry).map_err(io_err(&entry))?;
        total += meta.len().div_ceil(BLOCK) * BLOCK + 256;
    }
    Ok(total)
}

/// The filesystem size for `content` bytes and `free` bytes to spare:
/// a quarter more than the content for metadata, plus the journal, in
/// whole MiB.
pub fn size_for(content: u64, free: u64) -> u64 {
    (content + content / 4 + FIXED_OVERHEAD + free).div_ceil(1 << 20) << 20
}

/// Every path below `root` (not `root` itself), sorted. A name no image
/// may hold (a control character: see [`stage::check_name`]) is refused,
/// whoever put it there.
fn walk(root: &Path) -> Result<Vec<PathBuf>, Ext4Error> {
    let mut found = Vec::new();
    let mut pending = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in fs::read_dir(&dir).map_err(io_err(&dir))? {
            let entry = entry.map_err(io_err(&dir))?;
            let path = entry.path();
            stage::check_name(entry.file_name().as_bytes()).map_err(|reason| {
                Ext4Error::BadName {
                    path: path.strip_prefix(root).unwrap_or(&path).into(),
                    reason,
                }
            })?;
            if fs::symlink_metadata(&path).map_err(io_err(&path))?.is_dir() {
                pending.push(path.clone());
            }
            found.push(path);
        }
    }
    found.sort();
    Ok(found)
}

/// Whether the file `image` holds an ext4 filesystem that was not
/// unmounted, whose journal must be replayed before it reads right (a
/// guest's root volume after its VM was stopped). False for anything that
/// is not ext4.
pub fn needs_recovery(image: &Path) -> Result<bool, Ext4Error> {
    let file = File::open(image).map_err(io_err(image))?;
    let mut superblock = [0u8; S_FEATURE_INCOMPAT + 4];
    match file.read_exact_at(SUPERBLOCK, &mut superblock) {
        Ok(()) => {}
        Err(err) if err.kind() == io::ErrorKind::UnexpectedEof => return Ok(false),
        Err(err) => return Err(io_err(image)(err)),
    }
    let magic = u16::from_le_bytes([superblock[S_MAGIC], superblock[S_MAGIC + 1]]);
    let incompat = u32::from_le_bytes(
        superblock[S_FEATURE_INCOMPAT..]
            .try_into()
            .expect("4 bytes"),
    );
    Ok(magic == EXT4_MAGIC && incompat & INCOMPAT_RECOVER != 0)
}

/// Replays the journal of the ext4 filesystem in `image`, in place, when
/// it [needs recovery](needs_recovery), as its next mount would; nothing
/// else is checked or changed (`e2fsck -E journal_only`), and the same
/// filesystem always replays to the same bytes. Returns whether it did.
/// Afterwards the filesystem mounts read-only and reads whole through the
/// `ext4` crate, which ignores journals. A guest wrote the filesystem, so
/// e2fsck runs in a [`Sandbox`]: an unprivileged uid that reaches nothing
/// but the image.
pub fn replay_journal(image: &Path) -> Result<bool, Ext4Error> {
    if !needs_recovery(image)? {
        return Ok(false);
    }
    let sandbox_err = |source| match source {
        SandboxError::NoProgram { source, .. } => Ext4Error::Tool {
            tool: "e2fsck",
            image: image.into(),
            source,
        },
        source => Ext4Error::Sandbox {
            image: image.into(),
            source,
        },
    };
    let sandbox = Sandbox::new(image).map_err(sandbox_err)?;
    let output = run_e2fsck(&sandbox);
    sandbox.finish().map_err(sandbox_err)?;
    let output = output.map_err(sandbox_err)?;
    // 0: nothing to fix; 1: fixed (the journal replayed).
    if !matches!(output.status.code(), Some(0 | 1)) || needs_recovery(image)? {
        let mut message = output.stdout;
        message.extend(&output.stderr);
        return Err(Ext4Error::Fsck {
            image: image.into(),
            message: format!("{} ({})", one_line(&message), output.status),
        });
    }
    Ok(true)
}

/// `e2fsck -p -E journal_only` on the sandbox's file.
fn run_e2fsck(sandbox: &Sandbox) -> Result<std::process::Output, SandboxError> {
    let mut command = sandbox.command("e2fsck")?;
    command
        .args(["-p", "-E", "journal_only"])
        .arg(sandbox.path())
        // e2fsck's clock (the superblock's write time), so that the same
        // filesystem replays to the same bytes.
        .env("E2FSCK_TIME", FIXED_TIME.to_string());
    sandbox.output(&mut command)
}

/// A tool's output as part of a one-line error: its non-empty lines,
/// trimmed, joined by "; ".
fn one_line(output: &[u8]) -> String {
    let text = String::from_utf8_lossy(output);
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    lines.join("; ")
}

/// Makes `image` (`size` bytes, a multiple of 4 KiB) holding `tree`, the
/// same bytes for the same tree: its change times pinned too.
pub fn make(tree: &Path, image: &Path, size: u64, uuid: &str) -> Result<(), Ext4Error> {
    make_scratch(tree, image, size, uuid)?;
    pin_change_times(image)
}

/// [`make`] without pinning the change times: `mkfs.ext4 -d` leaves each
/// inode the ctime of its file in `tree`. For a disk that is read back
/// into a tree (the build VM's) and never kept: a read-back cannot set
/// ctimes anyway, and pinning costs a debugfs pass over every inode (2 s
/// of a nested Debian build).
pub fn make_scratch(tree: &Path, image: &Path, size: u64, uuid: &str) -> Result<(), Ext4Error> {
    for path in walk(tree)?.iter().chain([&tree.to_path_buf()]) {
        set_fixed_time(path)?;
    }
    let output = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "rootfs", "-U", uuid])
        // Without metadata_csum: the ext4 crate (0.9) stops reading a
        // directory at the checksum tail that ends its first block, and so
        // loses the entries of every later block. The image format's
        // per-chunk SHA-256 already guards the bytes.
        .args(["-O", "^metadata_csum", "-E"])
        .arg(format!("hash_seed={uuid},root_owner=0:0"))
        .arg("-d")
        .arg(tree)
        .arg(image)
        .arg(format!("{}k", size / 1024))
        .env("E2FSPROGS_FAKE_TIME", FIXED_TIME.to_string())
        .output()
        .map_err(|source| Ext4Error::Tool {
            tool: "mkfs.ext4",
            image: image.into(),
            source,
        })?;
    if !output.status.success() {
        let message = one_line(&output.stderr);
        return Err(Ext4Error::Mkfs {
            image: image.into(),
            message,
        });
    }
    Ok(())
}

/// `mkfs.ext4 -d` copies each file's ctime from the host, and a ctime
/// cannot be set from user space (E2FSPROGS_FAKE_TIME does not cover it):
/// rewrite every inode's ctime to [`FIXED_TIME`] in one debugfs session.
/// Inodes are named by number (`<N>`), never by path: a file name in a
/// debugfs script is a way to inject commands into a root-run tool.
fn pin_change_times(image: &Path) -> Result<(), Ext4Error> {
    // Ordered and once each, though hard links reach an inode twice.
    let mut inodes = BTreeSet::new();
    visit_tree(
        &open_fs(File::open(image).map_err(io_err(image))?)?,
        &mut |_, inode, _| {
            inodes.insert(inode.number);
            Ok(())
        },
    )?;
    let commands: String = inodes
        .iter()
        .map(|n| format!("sif <{n}> ctime @{FIXED_TIME}\n"))
        .collect();
    let script = image.with_extension("debugfs");
    fs::write(&script, commands).map_err(io_err(&script))?;
    let output = Command::new("debugfs")
        .arg("-w")
        .arg("-f")
        .arg(&script)
        .arg(image)
        .env("E2FSPROGS_FAKE_TIME", FIXED_TIME.to_string())
        .output()
        .map_err(|source| Ext4Error::Tool {
            tool: "debugfs",
            image: image.into(),
            source,
        })?;
    let _ = fs::remove_file(&script);
    // debugfs reports a failed command on stderr but still exits 0.
    let stderr = String::from_utf8_lossy(&output.stderr);
    let failed = stderr.lines().find(|line| !line.starts_with("debugfs "));
    if !output.status.success() || failed.is_some() {
        let message = format!(
            "debugfs could not fix the change times: {}",
            failed.unwrap_or(stderr.trim())
        );
        return Err(Ext4Error::Mkfs {
            image: image.into(),
            message,
        });
    }
    Ok(())
}

fn set_fixed_time(path: &Path) -> Result<(), Ext4Error> {
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|e| io_err(path)(e.into()))?;
    let time = libc::timespec {
        tv_sec: FIXED_TIME,
        tv_nsec: 0,
    };
    let times = [time, time];
    // SAFETY: `c_path` is NUL-terminated and `times` holds two timespecs,
    // both alive across the call; the kernel only reads them.
    let rc = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c_path.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io_err(path)(io::Error::last_os_error()))
    }
}

/// Opens a filesystem for reading, verifying checksums where the
/// filesystem has them (Kiln's images have none: see [`make`]).
fn open_fs<R: ReadAt>(fs: R) -> Result<SuperBlock<R>, Ext4Error> {
    SuperBlock::new_with_options(
        fs,
        &Options {
            checksums: Checksums::Enabled,
        },
    )
    .map_err(read_err)
}

/// One entry of a filesystem listing.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Entry {
    /// Absolute path inside the image.
    pub path: String,
    /// `d`, `-`, `l`, `c`, `b`, `p` or `s`, as `ls -l` shows it.
    pub kind: char,
    /// Permission bits (with setuid/setgid/sticky).
    pub mode: u32,
    /// Owner's user id.
    pub uid: u32,
    /// Owner's group id.
    pub gid: u32,
    /// Bytes of a file's data, a link's target or a directory's blocks.
    pub size: u64,
    /// A symbolic link's target.
    pub target: Option<String>,
}

/// Visits every entry of the filesystem from its root, parents before
/// children, with its path in the image (`/` for the root), skipping
/// `/lost+found` (mkfs makes a new one). The filesystem is untrusted (a
/// guest wrote it): every name is checked as archive names are, a
/// directory reached twice (linked into itself) is an error rather than
/// an endless walk, and so is a tree deeper than [`MAX_DEPTH`]. The walk
/// keeps its own stack, so no depth overflows the thread's.
fn visit_tree<R: ReadAt>(
    sb: &SuperBlock<R>,
    visit: &mut dyn FnMut(&Path, &Inode, &Enhanced) -> Result<(), Ext4Error>,
) -> Result<(), Ext4Error> {
    let mut directories = HashSet::new();
    let mut pending = vec![(PathBuf::from("/"), sb.root().map_err(read_err)?, 0)];
    while let Some((path, inode, depth)) = pending.pop() {
        let enhanced = sb.enhance(&inode).map_err(read_err)?;
        let Enhanced::Directory(entries) = &enhanced else {
            visit(&path, &inode, &enhanced)?;
            continue;
        };
        if !directories.insert(inode.number) {
            return Err(Ext4Error::Loop {
                path,
                inode: inode.number,
            });
        }
        if depth >= MAX_DEPTH {
            return Err(Ext4Error::TooDeep { path });
        }
        visit(&path, &inode, &enhanced)?;
        for entry in entries.iter().rev() {
            if entry.name == "." || entry.name == ".." || (depth == 0 && entry.name == "lost+found")
            {
                continue;
            }
            let child = path.join(&entry.name);
            stage::check_name(entry.name.as_bytes()).map_err(|reason| Ext4Error::BadName {
                path: child.clone(),
                reason,
            })?;
            let inode = sb.load_inode(entry.inode).map_err(read_err)?;
            pending.push((child, inode, depth + 1));
        }
    }
    Ok(())
}

/// Lists everything at and below `under` ("/" for all), sorted by path.
pub fn list<R: ReadAt>(fs: R, under: &str) -> Result<Vec<Entry>, Ext4Error> {
    let sb = open_fs(fs)?;
    let under = Path::new("/").join(under.trim_matches('/'));
    let mut entries = Vec::new();
    visit_tree(&sb, &mut |path, inode, enhanced| {
        if path.starts_with(&under) {
            entries.push(entry(path, inode, enhanced));
        }
        Ok(())
    })?;
    if entries.is_empty() {
        return Err(Ext4Error::NotFound(under.display().to_string()));
    }
    entries.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(entries)
}

fn entry(path: &Path, inode: &Inode, enhanced: &Enhanced) -> Entry {
    let (kind, target) = match enhanced {
        Enhanced::Directory(_) => ('d', None),
        Enhanced::RegularFile => ('-', None),
        Enhanced::SymbolicLink(target) => ('l', Some(target.clone())),
        Enhanced::CharacterDevice(..) => ('c', None),
        Enhanced::BlockDevice(..) => ('b', None),
        Enhanced::Fifo => ('p', None),
        Enhanced::Socket => ('s', None),
    };
    let stat = &inode.stat;
    Entry {
        path: path.to_string_lossy().into_owned(),
        kind,
        mode: u32::from(stat.file_mode) & 0o7777,
        uid: stat.uid,
        gid: stat.gid,
        size: stat.size,
        target,
    }
}

/// Copies every directory, file and symbolic link of the filesystem into
/// `stage` with their modes and owners (the starting point of a child
/// image); files linked more than once stay hard links.
pub fn extract<R: ReadAt>(fs: R, stage: &Stage) -> Result<(), Ext4Error> {
    let sb = open_fs(fs)?;
    let mut linked: HashMap<u32, PathBuf> = HashMap::new();
    visit_tree(&sb, &mut |path, inode, enhanced| {
        let mode = u32::from(inode.stat.file_mode) & 0o7777;
        if path == Path::new("/") {
            return Ok(()); // The stage's root: made by Stage::create.
        }
        match enhanced {
            Enhanced::Directory(_) => stage.replace_with_dir(path, mode)?,
            Enhanced::RegularFile
                if inode.stat.link_count > 1 && linked.contains_key(&inode.number) =>
            {
                // The first name has the owner and mode already.
                return Ok(stage.hard_link(&linked[&inode.number], path)?);
            }
            Enhanced::RegularFile => {
                let mut reader = sb.open(inode).map_err(read_err)?;
                stage.write_file(path, mode, &mut reader)?;
                if inode.stat.link_count > 1 {
                    linked.insert(inode.number, path.into());
                }
            }
            Enhanced::SymbolicLink(target) => stage.symlink(Path::new(target), path)?,
            // Device nodes, fifos and sockets come from devtmpfs at run time.
            _ => return Ok(()),
        }
        // The owner first: chown(2) clears setuid and setgid.
        stage.set_owner(path, inode.stat.uid, inode.stat.gid)?;
        if !matches!(enhanced, Enhanced::SymbolicLink(_)) {
            stage.set_mode(path, mode)?;
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    const UUID: &str = "6b696c6e-0000-4000-8000-000000000002";

    fn staged_mode(path: &Path) -> io::Result<(u32, u32, u32)> {
        let meta = fs::symlink_metadata(path)?;
        Ok((meta.uid(), meta.gid(), meta.mode() & 0o7777))
    }

    /// A tree larger than its filesystem: mkfs.ext4's complaint (three
    /// lines of it) is one line of the error, each line kept.
    #[test]
    fn a_full_filesystem_is_a_one_line_error() {
        let dir = tempfile::tempdir().unwrap();
        let tree = dir.path().join("tree");
        fs::create_dir(&tree).unwrap();
        fs::write(tree.join("big"), vec![1u8; 4 << 20]).unwrap();
        let image = dir.path().join("small.ext4");
        let err = make(&tree, &image, 1 << 20, UUID).unwrap_err().to_string();
        assert!(!err.contains('\n'), "{err:?}");
        assert!(
            err.contains("while writing file \"big\"; mkfs.ext4: Could not allocate block"),
            "{err:?}"
        );
    }

    fn tree(dir: &Path) -> PathBuf {
        let tree = dir.join("tree");
        fs::create_dir_all(tree.join("bin")).unwrap();
        fs::create_dir_all(tree.join("etc/kiln")).unwrap();
        fs::write(tree.join("etc/motd"), "hello\n").unwrap();
        fs::write(tree.join("bin/tool"), vec![7u8; 10_000]).unwrap();
        fs::set_permissions(tree.join("bin/tool"), fs::Permissions::from_mode(0o755)).unwrap();
        std::os::unix::fs::symlink("tool", tree.join("bin/alias")).unwrap();
        std::os::unix::fs::lchown(tree.join("etc/motd"), Some(1000), Some(100)).unwrap();
        tree
    }

    #[test]
    fn a_journal_left_to_replay_is_replayed_and_nothing_else_is_touched() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("fs.ext4");
        make(&tree(dir.path()), &image, 8 << 20, UUID).unwrap();
        assert!(!needs_recovery(&image).unwrap());
        assert!(
            !replay_journal(&image).unwrap(),
            "a clean filesystem is left alone"
        );
        // What a mounted filesystem's superblock says until it is unmounted.
        let mut bytes = fs::read(&image).unwrap();
        let at = SUPERBLOCK as usize + S_FEATURE_INCOMPAT;
        let incompat = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap());
        bytes[at..at + 4].copy_from_slice(&(incompat | INCOMPAT_RECOVER).to_le_bytes());
        fs::write(&image, bytes).unwrap();
        let copy = dir.path().join("copy.ext4");
        fs::copy(&image, &copy).unwrap();
        assert!(needs_recovery(&image).unwrap());
        assert!(replay_journal(&image).unwrap());
        assert!(!needs_recovery(&image).unwrap());
        // A second later, the same filesystem replays to the same bytes.
        std::thread::sleep(std::time::Duration::from_millis(1100));
        assert!(replay_journal(&copy).unwrap());
        assert!(
            fs::read(&image).unwrap() == fs::read(&copy).unwrap(),
            "replays differ"
        );
        let entries = list(fs::File::open(&image).unwrap(), "/etc").unwrap();
        assert!(entries.iter().any(|e| e.path == "/etc/motd"), "{entries:?}");

        for other in [vec![0x53u8; 100], vec![0xef; 8192]] {
            let path = dir.path().join("other");
            fs::write(&path, &other).unwrap();
            assert!(!replay_journal(&path).unwrap(), "not ext4: left alone");
            assert_eq!(fs::read(&path).unwrap(), other);
        }
    }

    /// A filesystem e2fsck will not touch (an incompatible feature it does
    /// not know, as a guest's bytes may say): the one-line error, with
    /// e2fsck's words in it, from inside the sandbox.
    #[test]
    fn a_filesystem_e2fsck_refuses_is_a_one_line_error() {
        use std::os::unix::fs::FileExt;
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("fs.ext4");
        make(&tree(dir.path()), &image, 8 << 20, UUID).unwrap();
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&image)
            .unwrap();
        let mut incompat = [0u8; 4];
        let at = SUPERBLOCK + S_FEATURE_INCOMPAT as u64;
        FileExt::read_exact_at(&file, &mut incompat, at).unwrap();
        let unknown = 0x4000_0000; // INCOMPAT bit 30, which no ext4 defines
        let flags = u32::from_le_bytes(incompat) | INCOMPAT_RECOVER | unknown;
        file.write_all_at(&flags.to_le_bytes(), at).unwrap();
        let err = replay_journal(&image).unwrap_err();
        assert!(matches!(err, Ext4Error::Fsck { .. }), "{err:?}");
        let text = err.to_string();
        assert!(!text.contains('\n'), "{text:?}");
        assert!(
            text.contains("unsupported feature(s): FEATURE_I30"),
            "{text}"
        );
        assert!(text.ends_with("(exit status: 8)"), "{text}");
    }

    #[test]
    fn the_same_tree_gives_the_same_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let tree = tree(dir.path());
        let size = size_for(content_size(&tree).unwrap(), 1 << 20);
        make(&tree, &dir.path().join("a.ext4"), size, UUID).unwrap();
        fs::write(tree.join("etc/motd"), "hello\n").unwrap(); // new mtime on the host
        make(&tree, &dir.path().join("b.ext4"), size, UUID).unwrap();
        assert_eq!(
            fs::read(dir.path().join("a.ext4")).unwrap(),
            fs::read(dir.path().join("b.ext4")).unwrap()
        );
    }

    #[test]
    fn listing_shows_modes_owners_and_links() {
        let dir = tempfile::tempdir().unwrap();
        let tree = tree(dir.path());
        let image = dir.path().join("fs.ext4");
        make(&tree, &image, 8 << 20, UUID).unwrap();
        let entries = list(fs::File::open(&image).unwrap(), "/").unwrap();
        let find = |p: &str| {
            entries
                .iter()
                .find(|e| e.path == p)
                .unwrap_or_else(|| panic!("{p} not in {entries:?}"))
        };
        assert_eq!(
            (
                find("/bin/tool").kind,
                find("/bin/tool").mode,
                find("/bin/tool").size
            ),
            ('-', 0o755, 10_000)
        );
        assert_eq!((find("/etc/motd").uid, find("/etc/motd").gid), (1000, 100));
        assert_eq!(find("/bin/alias").target.as_deref(), Some("tool"));
        assert!(entries.iter().all(|e| !e.path.starts_with("/lost+found")));
        let etc = list(fs::File::open(&image).unwrap(), "/etc").unwrap();
        assert_eq!(
            etc.iter().map(|e| e.path.as_str()).collect::<Vec<_>>(),
            ["/etc", "/etc/kiln", "/etc/motd"]
        );
        assert!(matches!(
            list(fs::File::open(&image).unwrap(), "/nope"),
            Err(Ext4Error::NotFound(_))
        ));
    }

    /// Makes an image of `tree` in `dir` and extracts it into `dir/out`.
    fn made_and_extracted(dir: &Path, tree: &Path) -> PathBuf {
        let image = dir.join("fs.ext4");
        make(tree, &image, 8 << 20, UUID).unwrap();
        let out = dir.join("out");
        extract(
            fs::File::open(&image).unwrap(),
            &Stage::create(&out).unwrap(),
        )
        .unwrap();
        out
    }

    #[test]
    fn extraction_restores_the_tree() {
        let dir = tempfile::tempdir().unwrap();
        let out = made_and_extracted(dir.path(), &tree(dir.path()));
        assert_eq!(fs::read(out.join("bin/tool")).unwrap(), vec![7u8; 10_000]);
        assert_eq!(
            staged_mode(&out.join("etc/motd")).unwrap(),
            (1000, 100, 0o644)
        );
        assert_eq!(
            fs::read_link(out.join("bin/alias")).unwrap(),
            Path::new("tool")
        );
    }

    #[test]
    fn large_directories_are_listed_whole() {
        let dir = tempfile::tempdir().unwrap();
        let tree = dir.path().join("tree");
        fs::create_dir_all(tree.join("many")).unwrap();
        for n in 0..300 {
            fs::write(
                tree.join("many")
                    .join(format!("file-with-a-long-name-{n:04}")),
                "",
            )
            .unwrap();
        }
        let image = dir.path().join("fs.ext4");
        make(&tree, &image, 8 << 20, UUID).unwrap();
        let entries = list(fs::File::open(&image).unwrap(), "/many").unwrap();
        assert_eq!(entries.len(), 301, "the directory and its 300 files");
    }

    #[test]
    fn mkfs_failures_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let tree = tree(dir.path());
        // 64 KiB cannot hold an ext4 with a journal.
        let err = make(&tree, &dir.path().join("tiny.ext4"), 64 << 10, UUID)
            .unwrap_err()
            .to_string();
        assert!(err.contains("mkfs.ext4 failed for"), "{err}");
    }

    /// Makes an image of `tree`, then renames its entry `from` to `to`
    /// (the same length) in the raw bytes: names no host tool would
    /// write, as a guest's own kernel could. Without metadata_csum (see
    /// [`make`]) a directory block carries no checksum to fix.
    fn image_with_renamed_entry(dir: &Path, tree: &Path, from: &[u8], to: &[u8]) -> PathBuf {
        let image = dir.join("hostile.ext4");
        make(tree, &image, 8 << 20, UUID).unwrap();
        let mut bytes = fs::read(&image).unwrap();
        let at = bytes.windows(from.len()).position(|w| w == from).unwrap();
        bytes[at..at + to.len()].copy_from_slice(to);
        fs::write(&image, bytes).unwrap();
        image
    }

    /// Issue 16, case 4: an entry named `../../../../pwn2` was written
    /// outside the stage, by a child build of a hostile image.
    #[test]
    fn names_that_climb_or_carry_commands_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let tree = tree(dir.path());
        fs::write(tree.join("etc/XXXXXXX"), "escape").unwrap();
        for (to, reason) in [
            (&b"../pwn2"[..], "a `/` inside"),
            (b"a\nb\"cd", "control character"),
        ] {
            let image = image_with_renamed_entry(dir.path(), &tree, b"XXXXXXX", to);
            let out = dir.path().join("out");
            let stage = Stage::create(&out).unwrap();
            let err = extract(fs::File::open(&image).unwrap(), &stage)
                .unwrap_err()
                .to_string();
            assert!(err.contains(reason), "{err}");
            let err = list(fs::File::open(&image).unwrap(), "/").unwrap_err();
            assert!(err.to_string().contains(reason), "{err}");
            assert!(!dir.path().join("pwn2").exists() && !out.join("pwn2").exists());
            fs::remove_dir_all(&out).unwrap();
        }
    }

    /// Issue 16, case 4: a directory hard-linked into itself overflowed
    /// the stack in `kiln inspect --files`, and a child build made
    /// thousands of nested directories before failing.
    #[test]
    fn a_directory_linked_into_itself_is_an_error_not_a_loop() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("loop.ext4");
        make(&tree(dir.path()), &image, 8 << 20, UUID).unwrap();
        let output = Command::new("debugfs")
            .args(["-w", "-R", "ln /etc /etc/kiln/loop"])
            .arg(&image)
            .output()
            .unwrap();
        assert!(output.status.success(), "{output:?}");
        let err = list(fs::File::open(&image).unwrap(), "/").unwrap_err();
        assert!(matches!(err, Ext4Error::Loop { .. }), "{err}");
        assert!(err.to_string().contains("/etc/kiln/loop"), "{err}");
        let out = dir.path().join("out");
        let err = extract(
            fs::File::open(&image).unwrap(),
            &Stage::create(&out).unwrap(),
        )
        .unwrap_err();
        assert!(matches!(err, Ext4Error::Loop { .. }), "{err}");
        assert!(!out.join("etc/kiln/loop/kiln").exists());
    }

    /// Issue 16, case 1: file names went into a debugfs script as text.
    /// Names with quotes and spaces now build (inodes go by number), and
    /// a name with a control character is refused before mkfs runs.
    #[test]
    fn odd_names_build_and_control_characters_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let tree = tree(dir.path());
        fs::write(tree.join("etc/we\"ird name"), "odd").unwrap();
        let a = dir.path().join("a.ext4");
        make(&tree, &a, 8 << 20, UUID).unwrap();
        let entries = list(fs::File::open(&a).unwrap(), "/etc").unwrap();
        assert!(
            entries.iter().any(|e| e.path == "/etc/we\"ird name"),
            "{entries:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(1100));
        fs::write(tree.join("etc/we\"ird name"), "odd").unwrap(); // a new ctime
        let b = dir.path().join("b.ext4");
        make(&tree, &b, 8 << 20, UUID).unwrap();
        assert!(
            fs::read(&a).unwrap() == fs::read(&b).unwrap(),
            "the ctime was not pinned"
        );

        fs::write(tree.join("etc/x\"\nrm etc\n"), "").unwrap();
        let err = make(&tree, &dir.path().join("c.ext4"), 8 << 20, UUID).unwrap_err();
        assert!(matches!(err, Ext4Error::BadName { .. }), "{err}");
        assert!(!dir.path().join("c.ext4").exists());
    }

    #[test]
    fn hard_links_stay_links_when_extracted() {
        let dir = tempfile::tempdir().unwrap();
        let tree = tree(dir.path());
        fs::hard_link(tree.join("bin/tool"), tree.join("bin/tool2")).unwrap();
        let out = made_and_extracted(dir.path(), &tree);
        let meta = fs::metadata(out.join("bin/tool2")).unwrap();
        assert_eq!((meta.nlink(), meta.mode() & 0o7777), (2, 0o755));
    }
}
