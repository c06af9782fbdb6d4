//! Writing into a build stage: the one place where the builder creates,
//! replaces, removes or changes anything under an image's root tree.
//!
//! A stage holds untrusted content: the files of a `tar:` or `oci:`
//! archive from anywhere, or of a committed image whose guest chose its
//! names and symlinks. The builder runs as root, so a single write that
//! followed a planted symlink (`sbin -> /sbin`, `etc -> /etc`) or a `..`
//! would change the host. Hence, for every operation:
//!
//! - the path is split into components and each is checked: no `..`, no
//!   NUL, no control character ([`check_name`]);
//! - the directory that holds the last component is opened by the kernel
//!   as if the stage were `/` (`openat2(2)` with `RESOLVE_IN_ROOT`): a
//!   symlink on the way is followed *inside* the stage, an absolute one
//!   from the stage's root, and `..` stops at that root. This is what the
//!   image's own paths mean once it boots (Debian's `bin -> usr/bin`
//!   still works);
//! - the last component itself is never followed: it is created with
//!   `O_EXCL | O_NOFOLLOW`, replaced by unlinking first, or changed with
//!   `AT_SYMLINK_NOFOLLOW` / an `O_NOFOLLOW` descriptor.
//!
//! Nothing but the builder writes a stage while it works on it (recipe
//! `[[build]]` steps run before or after, never alongside), so no check
//! here races with another writer.
use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Component, Path, PathBuf};

use rustix::fs::{AtFlags, Dir, FileType, Gid, Mode, OFlags, ResolveFlags, Uid};
use rustix::io::Errno;

/// Deeper trees are refused: PATH_MAX (4096 bytes) allows at most 2048
/// levels of one-letter names, and no real root tree comes close to this.
pub const MAX_DEPTH: usize = 1024;

/// Why a stage operation failed. `path` is the path inside the image.
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    /// The system refused an operation on `path`.
    #[error("cannot read or write {path}")]
    Io {
        /// The path inside the image.
        path: PathBuf,
        /// What the system said.
        #[source]
        source: io::Error,
    },
    /// A component of `path` is a name no image may hold ([`check_name`]).
    #[error("{path:?}: {reason}; names from archives and images may not have one")]
    BadName {
        /// The path as the archive or filesystem gave it.
        path: PathBuf,
        /// What is wrong with the name, from [`check_name`].
        reason: &'static str,
    },
    /// `path` has more than [`MAX_DEPTH`] components.
    #[error("{path}: deeper than {MAX_DEPTH} directories")]
    TooDeep {
        /// The path inside the image.
        path: PathBuf,
    },
}

/// Checks one file name from an archive or a filesystem: not empty, not
/// `.` or `..`, and without `/`, NUL or a control character (a newline in
/// a name is how a name becomes a command in a line-based tool).
pub fn check_name(name: &[u8]) -> Result<(), &'static str> {
    match name {
        b"" => Err("an empty file name"),
        b"." | b".." => Err("a `.` or `..` component"),
        _ if name.contains(&b'/') => Err("a `/` inside a file name"),
        _ if name.contains(&0) => Err("a NUL byte"),
        _ if name.iter().any(|&b| b < 0x20 || b == 0x7f) => {
            Err("a control character in a file name")
        }
        _ => Ok(()),
    }
}

/// What is at a path, not following a symlink there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A directory.
    Dir,
    /// A regular file.
    File,
    /// A symbolic link (never followed to say what it points to).
    Symlink,
    /// A device node, fifo or socket.
    Other,
}

/// An image's root tree being built, held open by its directory.
#[derive(Debug)]
pub struct Stage {
    root: OwnedFd,
    path: PathBuf,
}

impl Stage {
    /// Creates the directory `path` (mode 0755: it becomes the image's `/`)
    /// and opens it as a stage. Its parent must exist.
    pub fn create(path: &Path) -> Result<Stage, StageError> {
        let err = |source: Errno| StageError::Io {
            path: path.into(),
            source: source.into(),
        };
        match rustix::fs::mkdir(path, Mode::from_raw_mode(0o755)) {
            Ok(()) | Err(Errno::EXIST) => {}
            Err(errno) => return Err(err(errno)),
        }
        let root = rustix::fs::open(path, dir_flags(), Mode::empty()).map_err(err)?;
        rustix::fs::fchmod(&root, Mode::from_raw_mode(0o755)).map_err(err)?;
        Ok(Stage {
            root,
            path: path.into(),
        })
    }

    /// Where the stage is on the host, for tools that take a directory
    /// (`mkfs.ext4 -d`) and for trusted recipe steps (`$DESTDIR`).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// What is at `path`, if anything.
    pub fn kind(&self, path: &Path) -> Result<Option<Kind>, StageError> {
        let (dir, name) = self.parent(path)?;
        match rustix::fs::statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(stat) => Ok(Some(kind_of(FileType::from_raw_mode(stat.st_mode)))),
            Err(Errno::NOENT) => Ok(None),
            Err(errno) => Err(io_err(path, errno)),
        }
    }

    /// Creates `path` and its missing parents as directories with `mode`.
    /// Existing directories (or symlinks to them, inside the stage) are
    /// kept as they are.
    pub fn create_dir_all(&self, path: &Path, mode: u32) -> Result<(), StageError> {
        // Most calls find the directory there already: one open says so.
        if self.open_dir(path).is_ok() {
            return Ok(());
        }
        let mut sofar = PathBuf::new();
        for name in components(path)? {
            sofar.push(name);
            let (dir, name) = self.parent(&sofar)?;
            match rustix::fs::mkdirat(&dir, name, Mode::from_raw_mode(0o700)) {
                // Created here: its mode is ours to set (mkdir's is masked
                // by the umask).
                Ok(()) => self.set_mode(&sofar, mode)?,
                Err(Errno::EXIST) => {}
                Err(errno) => return Err(io_err(&sofar, errno)),
            }
        }
        Ok(())
    }

    /// Makes `path` a directory: whatever else is there goes first.
    /// An existing directory is kept, with its contents.
    pub fn replace_with_dir(&self, path: &Path, mode: u32) -> Result<(), StageError> {
        if !matches!(self.kind(path)?, Some(Kind::Dir) | None) {
            self.remove_all(path)?;
        }
        self.create_dir_all(path, mode)?;
        self.set_mode(path, mode)
    }

    /// Writes a new regular file at `path` with `contents` and `mode`,
    /// replacing whatever was there (a symlink is replaced, never written
    /// through). Its parent directories must exist.
    pub fn write_file(
        &self,
        path: &Path,
        mode: u32,
        contents: &mut dyn Read,
    ) -> Result<(), StageError> {
        let (dir, name) = self.replace(path)?;
        let flags = OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW;
        let fd = rustix::fs::openat(&dir, name, flags | OFlags::CLOEXEC, Mode::RUSR)
            .map_err(|errno| io_err(path, errno))?;
        let mut file = File::from(fd);
        io::copy(contents, &mut file).map_err(|source| StageError::Io {
            path: path.into(),
            source,
        })?;
        rustix::fs::fchmod(&file, Mode::from_raw_mode(mode & 0o7777))
            .map_err(|errno| io_err(path, errno))
    }

    /// Makes `path` a symbolic link to `target`, replacing whatever was
    /// there. The target is only text: it is never resolved here.
    pub fn symlink(&self, target: &Path, path: &Path) -> Result<(), StageError> {
        let (dir, name) = self.replace(path)?;
        rustix::fs::symlinkat(target, &dir, name).map_err(|errno| io_err(path, errno))
    }

    /// Makes `path` a hard link to the existing `original` (both inside
    /// the stage; a symlink at `original` is linked, not followed),
    /// replacing whatever was at `path`.
    pub fn hard_link(&self, original: &Path, path: &Path) -> Result<(), StageError> {
        let (from_dir, from_name) = self.parent(original)?;
        let (dir, name) = self.replace(path)?;
        rustix::fs::linkat(&from_dir, from_name, &dir, name, AtFlags::empty())
            .map_err(|errno| io_err(path, errno))
    }

    /// Removes `path`, and everything below it if it is a directory. A
    /// symlink is removed itself; what it points at is left alone.
    /// Nothing there is no error.
    pub fn remove_all(&self, path: &Path) -> Result<(), StageError> {
        let (parent, name) = split(path)?;
        match self.open_dir(&parent) {
            Ok(dir) => remove_entry(dir.as_fd(), name, 0).map_err(|errno| io_err(path, errno)),
            // No directory there: nothing below it to remove either.
            Err(err) if err.is_missing() => Ok(()),
            Err(err) => Err(err),
        }
    }

    /// Removes everything inside the directory `path` (resolved inside
    /// the stage), keeping the entries named in `keep`. No directory
    /// there is no error.
    pub fn empty_dir(&self, path: &Path, keep: &dyn Fn(&OsStr) -> bool) -> Result<(), StageError> {
        let dir = match self.open_dir(path) {
            Ok(dir) => dir,
            Err(err) if err.is_missing() => return Ok(()),
            Err(err) => return Err(err),
        };
        for name in names_in(&dir).map_err(|errno| io_err(path, errno))? {
            if !keep(&name) {
                remove_entry(dir.as_fd(), &name, 0).map_err(|errno| io_err(path, errno))?;
            }
        }
        Ok(())
    }

    /// Sets the permission bits of `path`; a symlink is left as it is
    /// (Linux ignores a link's own mode).
    pub fn set_mode(&self, path: &Path, mode: u32) -> Result<(), StageError> {
        let (dir, name) = self.parent(path)?;
        // O_NONBLOCK: opening a fifo must not wait for a writer.
        let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::NOCTTY;
        match rustix::fs::openat(&dir, name, flags | OFlags::CLOEXEC, Mode::empty()) {
            Ok(fd) => rustix::fs::fchmod(&fd, Mode::from_raw_mode(mode & 0o7777))
                .map_err(|errno| io_err(path, errno)),
            Err(Errno::LOOP) => Ok(()),
            Err(errno) => Err(io_err(path, errno)),
        }
    }

    /// Sets the owner of `path` itself (a symlink's own, as `lchown`).
    /// Changing the owner clears setuid and setgid: set modes after this.
    pub fn set_owner(&self, path: &Path, uid: u32, gid: u32) -> Result<(), StageError> {
        let (dir, name) = self.parent(path)?;
        let (uid, gid) = (Uid::from_raw(uid), Gid::from_raw(gid));
        rustix::fs::chownat(&dir, name, Some(uid), Some(gid), AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|errno| io_err(path, errno))
    }

    /// Reads the regular file at `path` (symlinks on the way are followed
    /// inside the stage, as the guest would).
    pub fn open_file(&self, path: &Path) -> Result<File, StageError> {
        let relative = relative(path)?;
        let flags = OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOCTTY | OFlags::NONBLOCK;
        let fd = rustix::fs::openat2(&self.root, &relative, flags, Mode::empty(), in_root())
            .map_err(|errno| io_err(path, errno))?;
        let file = File::from(fd);
        let meta = file.metadata().map_err(|source| StageError::Io {
            path: path.into(),
            source,
        })?;
        if !meta.is_file() {
            return Err(io_err(path, Errno::INVAL));
        }
        Ok(file)
    }

    /// The names in the directory `path`, sorted.
    pub fn read_dir(&self, path: &Path) -> Result<Vec<std::ffi::OsString>, StageError> {
        let dir = self.open_dir(path)?;
        let mut names = names_in(&dir).map_err(|errno| io_err(path, errno))?;
        names.sort();
        Ok(names)
    }

    /// The directory `path`, opened inside the stage.
    fn open_dir(&self, path: &Path) -> Result<OwnedFd, StageError> {
        let relative = relative(path)?;
        let relative = if relative.as_os_str().is_empty() {
            Path::new(".")
        } else {
            &relative
        };
        rustix::fs::openat2(&self.root, relative, dir_flags(), Mode::empty(), in_root())
            .map_err(|errno| io_err(path, errno))
    }

    /// The directory holding `path`'s last component, opened inside the
    /// stage, and that component.
    fn parent<'p>(&self, path: &'p Path) -> Result<(OwnedFd, &'p OsStr), StageError> {
        let (parent, name) = split(path)?;
        Ok((self.open_dir(&parent)?, name))
    }

    /// [`Self::parent`], with whatever is at `path` removed: the place
    /// for something new.
    fn replace<'p>(&self, path: &'p Path) -> Result<(OwnedFd, &'p OsStr), StageError> {
        let (dir, name) = self.parent(path)?;
        remove_entry(dir.as_fd(), name, 0).map_err(|errno| io_err(path, errno))?;
        Ok((dir, name))
    }
}

impl StageError {
    /// Whether the error says nothing is there (or a file stands where a
    /// directory would be), which removing treats as done.
    fn is_missing(&self) -> bool {
        let errno = match self {
            StageError::Io { source, .. } => source.raw_os_error(),
            _ => None,
        };
        matches!(errno, Some(e) if e == Errno::NOENT.raw_os_error() || e == Errno::NOTDIR.raw_os_error())
    }
}

/// `path`'s parent (inside the stage) and last component, checked.
fn split(path: &Path) -> Result<(PathBuf, &OsStr), StageError> {
    let mut names = components(path)?;
    let name = names.pop().ok_or_else(|| StageError::BadName {
        path: path.into(),
        reason: "no file name (the stage's root itself)",
    })?;
    Ok((names.iter().collect(), name))
}

/// `path`'s components, checked; `/` and `.` are skipped.
fn components(path: &Path) -> Result<Vec<&OsStr>, StageError> {
    let mut names = Vec::new();
    for component in path.components() {
        match component {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(name) => {
                check_name(name.as_bytes()).map_err(|reason| StageError::BadName {
                    path: path.into(),
                    reason,
                })?;
                names.push(name);
            }
            Component::ParentDir | Component::Prefix(_) => {
                return Err(StageError::BadName {
                    path: path.into(),
                    reason: "a `.` or `..` component",
                });
            }
        }
    }
    if names.len() > MAX_DEPTH {
        return Err(StageError::TooDeep { path: path.into() });
    }
    Ok(names)
}

fn relative(path: &Path) -> Result<PathBuf, StageError> {
    Ok(components(path)?.into_iter().collect())
}

/// How every path inside a stage is resolved: as if the stage were `/`,
/// never through `/proc` magic links or onto another mount.
fn in_root() -> ResolveFlags {
    ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS | ResolveFlags::NO_XDEV
}

fn dir_flags() -> OFlags {
    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC
}

fn kind_of(file_type: FileType) -> Kind {
    match file_type {
        FileType::Directory => Kind::Dir,
        FileType::RegularFile => Kind::File,
        FileType::Symlink => Kind::Symlink,
        _ => Kind::Other,
    }
}

fn io_err(path: &Path, errno: Errno) -> StageError {
    StageError::Io {
        path: path.into(),
        source: errno.into(),
    }
}

/// Every name in the open directory `dir` but `.` and `..`.
fn names_in(dir: &OwnedFd) -> Result<Vec<std::ffi::OsString>, Errno> {
    let mut names = Vec::new();
    for entry in Dir::read_from(dir)? {
        let name = entry?.file_name().to_bytes().to_vec();
        if name != b"." && name != b".." {
            names.push(std::ffi::OsString::from_vec(name));
        }
    }
    Ok(names)
}

/// Removes `name` from `dir`, recursively for a directory, descending by
/// descriptors opened with `O_NOFOLLOW` so that no symlink is followed.
fn remove_entry(dir: BorrowedFd<'_>, name: &OsStr, depth: usize) -> Result<(), Errno> {
    match rustix::fs::unlinkat(dir, name, AtFlags::empty()) {
        Ok(()) | Err(Errno::NOENT) => return Ok(()),
        // unlink(2) of a directory: EISDIR on Linux.
        Err(Errno::ISDIR | Errno::PERM) => {}
        Err(errno) => return Err(errno),
    }
    if depth >= MAX_DEPTH {
        return Err(Errno::LOOP);
    }
    let flags = dir_flags() | OFlags::NOFOLLOW;
    let sub = rustix::fs::openat(dir, name, flags, Mode::empty())?;
    for child in names_in(&sub)? {
        remove_entry(sub.as_fd(), &child, depth + 1)?;
    }
    rustix::fs::unlinkat(dir, name, AtFlags::REMOVEDIR)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};

    /// A stage in `dir/stage` and a victim directory `dir/outside` with a
    /// file in it, which nothing may touch.
    fn setup() -> (tempfile::TempDir, Stage, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let outside = dir.path().join("outside");
        fs::create_dir(&outside).unwrap();
        fs::write(outside.join("important"), "keep").unwrap();
        fs::set_permissions(&outside, fs::Permissions::from_mode(0o755)).unwrap();
        let stage = Stage::create(&dir.path().join("stage")).unwrap();
        (dir, stage, outside)
    }

    fn untouched(outside: &Path) {
        let names: Vec<_> = fs::read_dir(outside)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["important"], "the outside directory changed");
        assert_eq!(
            fs::read_to_string(outside.join("important")).unwrap(),
            "keep"
        );
        assert_eq!(fs::metadata(outside).unwrap().mode() & 0o7777, 0o755);
    }

    #[test]
    fn names_with_control_characters_dots_or_nul_are_refused() {
        for bad in [
            &b""[..],
            b".",
            b"..",
            b"a/b",
            b"a\0b",
            b"x\"\nwrite /etc/x",
            b"tab\there",
            b"del\x7f",
        ] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        for good in [
            &b"a"[..],
            b".wh..wh..opq",
            b"caf\xc3\xa9",
            b"with space",
            b"...",
        ] {
            assert!(check_name(good).is_ok(), "{good:?}");
        }
        let (_dir, stage, _) = setup();
        let err = stage
            .write_file(Path::new("/etc/a\nb"), 0o644, &mut &b""[..])
            .unwrap_err();
        assert!(err.to_string().contains("control character"), "{err}");
        let err = stage
            .create_dir_all(Path::new("a/../../x"), 0o755)
            .unwrap_err();
        assert!(err.to_string().contains("`..`"), "{err}");
    }

    #[test]
    fn symlinks_on_the_way_resolve_inside_the_stage() {
        let (_dir, stage, outside) = setup();
        // A planted absolute link and a relative one climbing out.
        symlink(&outside, stage.path().join("abs")).unwrap();
        symlink("../../../../../../outside", stage.path().join("rel")).unwrap();
        for link in ["abs", "rel"] {
            let path = Path::new(link).join("important");
            stage.write_file(&path, 0o644, &mut &b"pwned"[..]).ok();
            stage.remove_all(&path).ok();
            stage.empty_dir(Path::new(link), &|_| false).ok();
            stage.set_mode(Path::new(link), 0o1777).unwrap();
            stage
                .create_dir_all(&Path::new(link).join("new/dir"), 0o755)
                .ok();
        }
        untouched(&outside);
        // Resolved inside: an absolute link's target is under the stage.
        fs::create_dir_all(stage.path().join(outside.strip_prefix("/").unwrap())).unwrap();
        stage
            .write_file(Path::new("abs/inside"), 0o600, &mut &b"in"[..])
            .unwrap();
        let landed = stage
            .path()
            .join(outside.strip_prefix("/").unwrap())
            .join("inside");
        assert_eq!(fs::read_to_string(landed).unwrap(), "in");
        untouched(&outside);
    }

    #[test]
    fn the_last_component_is_replaced_never_followed() {
        let (_dir, stage, outside) = setup();
        let victim = outside.join("important");
        symlink(&victim, stage.path().join("init")).unwrap();
        stage
            .write_file(Path::new("/init"), 0o755, &mut &b"new"[..])
            .unwrap();
        assert_eq!(
            fs::read_to_string(stage.path().join("init")).unwrap(),
            "new"
        );
        symlink(&outside, stage.path().join("dirlink")).unwrap();
        stage.remove_all(Path::new("dirlink")).unwrap();
        assert!(!stage.path().join("dirlink").exists());
        symlink(&victim, stage.path().join("owned")).unwrap();
        stage.set_owner(Path::new("owned"), 1234, 1234).unwrap();
        stage.set_mode(Path::new("owned"), 0o777).unwrap();
        assert_eq!(fs::metadata(&victim).unwrap().uid(), 0);
        stage
            .hard_link(Path::new("owned"), Path::new("second"))
            .unwrap();
        assert!(
            fs::symlink_metadata(stage.path().join("second"))
                .unwrap()
                .is_symlink()
        );
        untouched(&outside);
    }

    #[test]
    fn directories_are_made_with_their_mode_and_removed_whole() {
        let (_dir, stage, _) = setup();
        stage.create_dir_all(Path::new("/a/b/c"), 0o751).unwrap();
        assert_eq!(
            fs::metadata(stage.path().join("a/b")).unwrap().mode() & 0o7777,
            0o751
        );
        stage
            .write_file(Path::new("a/b/c/f"), 0o4755, &mut &b"x"[..])
            .unwrap();
        assert_eq!(stage.kind(Path::new("a/b/c/f")).unwrap(), Some(Kind::File));
        assert_eq!(
            fs::metadata(stage.path().join("a/b/c/f")).unwrap().mode() & 0o7777,
            0o4755
        );
        assert_eq!(stage.read_dir(Path::new("a")).unwrap(), ["b"]);
        stage.replace_with_dir(Path::new("a/b/c/f"), 0o700).unwrap();
        assert_eq!(stage.kind(Path::new("a/b/c/f")).unwrap(), Some(Kind::Dir));
        stage.remove_all(Path::new("a")).unwrap();
        assert_eq!(stage.kind(Path::new("a")).unwrap(), None);
        stage.remove_all(Path::new("never/was")).unwrap();
        stage.remove_all(Path::new("never")).unwrap();
    }

    #[test]
    fn a_directory_is_emptied_but_for_what_is_kept() {
        let (_dir, stage, _) = setup();
        stage.create_dir_all(Path::new("d/sub"), 0o755).unwrap();
        stage
            .write_file(Path::new("d/old"), 0o644, &mut &b""[..])
            .unwrap();
        stage
            .write_file(Path::new("d/new"), 0o644, &mut &b""[..])
            .unwrap();
        stage
            .empty_dir(Path::new("d"), &|name| name == "new")
            .unwrap();
        assert_eq!(stage.read_dir(Path::new("d")).unwrap(), ["new"]);
        stage.empty_dir(Path::new("missing"), &|_| false).unwrap();
    }

    #[test]
    fn too_deep_paths_are_refused() {
        let (_dir, stage, _) = setup();
        let deep: PathBuf = std::iter::repeat_n("d", MAX_DEPTH + 1).collect();
        let err = stage.create_dir_all(&deep, 0o755).unwrap_err();
        assert!(matches!(err, StageError::TooDeep { .. }), "{err}");
    }
}
