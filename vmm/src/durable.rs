//! Files that appear whole or not at all: written under a temporary name
//! in their final directory, synced, renamed into place, and the directory
//! synced so the rename itself survives a crash.
//!
//! Work that takes a whole directory (a build's scratch space, a snapshot
//! being written) goes into a [`ScratchDir`]: locked for as long as its
//! command lives, so that what a killed command left is told apart from
//! another command's live work, and removed by the next one.
use std::fs::{self, File};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use tempfile::{NamedTempFile, TempDir};

use crate::{flock, report};

/// A temporary file next to where `path` will be.
pub fn stage(path: &Path) -> io::Result<NamedTempFile> {
    NamedTempFile::new_in(parent(path))
}

/// Makes `staged` durable and renames it to `path`.
pub fn persist(staged: NamedTempFile, path: &Path) -> io::Result<()> {
    staged.as_file().sync_all()?;
    staged.persist(path).map_err(|err| err.error)?;
    File::open(parent(path))?.sync_all()
}

/// Writes `bytes` to `path` whole or not at all: a temporary file beside
/// it, synced, then renamed over it ([`stage`], [`persist`]).
pub fn write(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut staged = stage(path)?;
    staged.write_all(bytes)?;
    persist(staged, path)
}

/// Renames the directory `from` to `to` (replacing nothing: `to` must not
/// exist) and syncs the parent, so the rename survives a crash. The files
/// inside must be synced already.
pub fn rename_dir(from: &Path, to: &Path) -> io::Result<()> {
    std::fs::rename(from, to)?;
    File::open(parent(to))?.sync_all()
}

/// A directory for a command's work in progress, `.NAME.partial-XXXXXX`
/// in its parent, locked (flock) for as long as the command lives, and
/// removed when dropped. A command killed half-way cannot remove it; the
/// lock, gone with the command, tells the next [`scratch_dir`] in the
/// same parent that it is a leftover to remove, not another's live work.
#[derive(Debug)]
pub struct ScratchDir {
    dir: TempDir,
    _lock: File,
}

/// What a scratch directory's name holds between `.NAME` and its random
/// part, which is [`SCRATCH_RANDOM`] characters long.
const SCRATCH_MARK: &str = ".partial-";
/// The random characters after [`SCRATCH_MARK`].
const SCRATCH_RANDOM: usize = 6;

/// Why a scratch directory could not be made.
#[derive(Debug, thiserror::Error)]
#[error("cannot {action} {path}")]
pub struct ScratchError {
    /// What was being done: "open", "lock", "list", "make a scratch
    /// directory in".
    pub action: &'static str,
    /// The directory it was done to.
    pub path: PathBuf,
    /// What the call on it said.
    #[source]
    pub source: io::Error,
}

fn scratch_err<'a>(
    action: &'static str,
    path: &'a Path,
) -> impl FnOnce(io::Error) -> ScratchError + 'a {
    move |source| ScratchError {
        action,
        path: path.to_path_buf(),
        source,
    }
}

impl ScratchDir {
    /// The directory.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Writes `bytes` to the new file `name` in this directory and syncs
    /// it. It needs no temporary name and no directory
    /// sync of its own: nothing sees this directory before
    /// [`rename_to`](Self::rename_to), which syncs it.
    pub fn write_file(&self, name: &str, bytes: &[u8]) -> io::Result<()> {
        let mut file = File::create_new(self.path().join(name))?;
        file.write_all(bytes)?;
        file.sync_all()
    }

    /// Copies the file `from` to the new file `name` in this directory,
    /// holes kept ([`copy_sparse`]), and syncs it.
    pub fn copy_file(&self, name: &str, from: &Path) -> io::Result<()> {
        let to = File::create_new(self.path().join(name))?;
        copy_sparse(&File::open(from)?, &to)?;
        to.sync_all()
    }

    /// Syncs the directory (whose files must be synced already) and
    /// renames it whole to `to`, which must not exist, holding its lock
    /// until it is there. On failure it stays, unlocked, for the next
    /// [`scratch_dir`] beside it to remove.
    pub fn rename_to(self, to: &Path) -> io::Result<()> {
        let ScratchDir { dir, _lock } = self;
        let kept = dir.keep();
        File::open(&kept)?.sync_all()?;
        rename_dir(&kept, to)
    }
}

/// A new, empty scratch directory in `parent` (which must exist), named
/// after `name`, once the leftovers of killed commands there are removed:
/// every scratch directory whose lock no live command holds. Entries of
/// other names are never touched.
pub fn scratch_dir(parent: &Path, name: &str) -> Result<ScratchDir, ScratchError> {
    // Held (on the parent directory itself) until the new directory is
    // locked: another command, removing leftovers meanwhile, would take
    // it for one.
    let beside = File::open(parent).map_err(scratch_err("open", parent))?;
    flock::lock_exclusive(&beside, true).map_err(scratch_err("lock", parent))?;
    remove_leftovers(parent)?;
    let dir = tempfile::Builder::new()
        .prefix(&format!(".{name}{SCRATCH_MARK}"))
        .rand_bytes(SCRATCH_RANDOM)
        .tempdir_in(parent)
        .map_err(scratch_err("make a scratch directory in", parent))?;
    // Waiting, so that the lock is surely taken when this returns; no one
    // else can hold it: the directory is new, made under the parent's lock.
    let lock = File::open(dir.path())
        .and_then(|file| flock::lock_exclusive(&file, true).map(|_| file))
        .map_err(scratch_err("lock", dir.path()))?;
    Ok(ScratchDir { dir, _lock: lock })
}

/// Whether `name` is a scratch directory's: `.NAME.partial-XXXXXX`.
fn is_scratch_name(name: &str) -> bool {
    name.rsplit_once(SCRATCH_MARK).is_some_and(|(head, tail)| {
        head.len() > 1 && head.starts_with('.') && tail.len() == SCRATCH_RANDOM
    })
}

/// Removes the scratch directories in `parent` that no live command
/// holds; one that cannot be removed is logged and left.
fn remove_leftovers(parent: &Path) -> Result<(), ScratchError> {
    let entries = fs::read_dir(parent).map_err(scratch_err("list", parent))?;
    for entry in entries {
        let entry = entry.map_err(scratch_err("list", parent))?;
        let scratch = entry.file_name().to_str().is_some_and(is_scratch_name);
        if !scratch || !entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let path = entry.path();
        let free = File::open(&path).and_then(|dir| flock::lock_exclusive(&dir, false));
        let removed = match free {
            Ok(true) => fs::remove_dir_all(&path),
            Ok(false) => Ok(()),
            Err(err) => Err(err),
        };
        match removed {
            // Removed meanwhile by its own command.
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            // Housekeeping: a leftover that cannot go (another user's,
            // say) must not stop new work; it is named instead.
            Err(err) => log::warn!(
                "{}",
                report::one_line(&scratch_err("remove the leftover", &path)(err))
            ),
            Ok(()) => {}
        }
    }
    Ok(())
}

/// Copies `src` into the empty file `dst`, both from their start, leaving
/// a hole wherever `src` has one (an overlay is mostly holes); returns the
/// bytes of data copied. Uses pread/pwrite, so neither file's position
/// matters to anyone else, and lseek's SEEK_DATA/SEEK_HOLE only to find
/// the data (they move the position of `src`, which nothing reads).
pub fn copy_sparse(src: &File, dst: &File) -> io::Result<u64> {
    const BUFFER: usize = 1 << 20;
    let len = src.metadata()?.len();
    dst.set_len(len)?;
    let mut buffer = vec![0u8; BUFFER];
    let mut copied = 0;
    let mut offset = 0;
    while let Some(data) = seek(src, offset, libc::SEEK_DATA)? {
        let end = seek(src, data, libc::SEEK_HOLE)?.unwrap_or(len).min(len);
        let mut at = data;
        while at < end {
            let chunk = &mut buffer[..(end - at).min(BUFFER as u64) as usize];
            src.read_exact_at(chunk, at)?;
            dst.write_all_at(chunk, at)?;
            at += chunk.len() as u64;
        }
        copied += end - data;
        offset = end;
    }
    Ok(copied)
}

/// lseek(2) with `whence`; `None` when there is no more data (ENXIO).
fn seek(file: &File, offset: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
    let offset = libc::off_t::try_from(offset).map_err(io::Error::other)?;
    // SAFETY: lseek only reads its integer arguments; the descriptor is
    // open for as long as `file` is borrowed.
    let position = unsafe { libc::lseek(file.as_raw_fd(), offset, whence) };
    match position {
        -1 => {
            let err = io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::ENXIO) => Ok(None),
                _ => Err(err),
            }
        }
        position => Ok(Some(position as u64)),
    }
}

fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A killed command's scratch directory (no lock on it) goes at the
    /// next scratch directory beside it; a live one's stays, and so do
    /// the user's own files and directories, whatever their names.
    #[test]
    fn scratch_removes_only_unheld_leftovers() {
        let parent = tempfile::tempdir().unwrap();
        let live = scratch_dir(parent.path(), "one").unwrap();
        let killed = parent.path().join(".two.partial-a1B2c3");
        fs::create_dir(&killed).unwrap();
        fs::write(killed.join("memory"), b"half").unwrap();
        let users = [
            ".notes.partial-old",
            "notes.partial-a1B2c3",
            "..partial-a1B2c3",
        ]
        .map(|name| parent.path().join(name));
        for dir in &users {
            fs::create_dir(dir).unwrap();
        }
        let users_file = parent.path().join(".file.partial-a1B2c3");
        fs::write(&users_file, b"mine").unwrap();

        let next = scratch_dir(parent.path(), "three").unwrap();
        assert!(!killed.exists(), "the killed command's leftover is removed");
        assert!(live.path().is_dir(), "a live command's scratch stays");
        assert!(next.path().is_dir());
        let name = next.path().file_name().unwrap().to_str().unwrap();
        assert!(name.starts_with(".three.partial-") && is_scratch_name(name));
        assert!(users.iter().all(|dir| dir.is_dir()), "not a scratch name");
        assert!(users_file.is_file(), "a file is never a scratch directory");
    }

    /// Files written and copied into a scratch directory arrive with it,
    /// the copy's holes kept; neither replaces a file already there.
    #[test]
    fn scratch_files_arrive_with_their_directory() {
        let parent = tempfile::tempdir().unwrap();
        let sparse = parent.path().join("sparse");
        let file = File::create(&sparse).unwrap();
        file.set_len(1 << 20).unwrap();
        file.write_all_at(b"end", (1 << 20) - 3).unwrap();
        let scratch = scratch_dir(parent.path(), "new").unwrap();
        scratch.write_file("record", b"{}").unwrap();
        scratch.copy_file("overlay", &sparse).unwrap();
        assert!(scratch.write_file("record", b"again").is_err());
        assert!(scratch.copy_file("overlay", &sparse).is_err());
        let done = parent.path().join("done");
        scratch.rename_to(&done).unwrap();
        assert_eq!(fs::read(done.join("record")).unwrap(), b"{}");
        let copy = fs::read(done.join("overlay")).unwrap();
        assert_eq!(copy.len(), 1 << 20);
        assert!(copy.ends_with(b"end") && copy[..4096].iter().all(|&b| b == 0));
        use std::os::unix::fs::MetadataExt;
        let blocks = fs::metadata(done.join("overlay")).unwrap().blocks();
        assert!(blocks < 64, "the hole was written: {blocks} blocks");
    }

    /// A leftover another process's command holds (its lock taken through
    /// a descriptor of its own) is live work: it stays.
    #[test]
    fn a_held_scratch_directory_stays() {
        let parent = tempfile::tempdir().unwrap();
        let held = parent.path().join(".build.partial-Zz9Yy8");
        fs::create_dir(&held).unwrap();
        let lock = File::open(&held).unwrap();
        assert!(flock::lock_exclusive(&lock, false).unwrap());
        drop(scratch_dir(parent.path(), "next").unwrap());
        assert!(held.is_dir(), "held: live work");
        drop(lock);
        drop(scratch_dir(parent.path(), "next").unwrap());
        assert!(!held.exists(), "freed: a leftover");
        assert_eq!(fs::read_dir(parent.path()).unwrap().count(), 0);
    }

    /// Scratch directories made beside one another at once never take
    /// each other's fresh one for a leftover.
    #[test]
    fn concurrent_scratch_directories_all_stay() {
        let parent = tempfile::tempdir().unwrap();
        let dirs: Vec<ScratchDir> = std::thread::scope(|scope| {
            let threads: Vec<_> = (0..16)
                .map(|_| scope.spawn(|| scratch_dir(parent.path(), "s").unwrap()))
                .collect();
            threads.into_iter().map(|t| t.join().unwrap()).collect()
        });
        assert!(dirs.iter().all(|dir| dir.path().is_dir()));
    }

    /// A scratch directory renamed whole is at its new place, and nothing
    /// of it is left beside.
    #[test]
    fn a_scratch_directory_is_renamed_whole() {
        let parent = tempfile::tempdir().unwrap();
        let scratch = scratch_dir(parent.path(), "snap").unwrap();
        fs::write(scratch.path().join("state"), b"state").unwrap();
        let to = parent.path().join("snap");
        scratch.rename_to(&to).unwrap();
        assert_eq!(fs::read(to.join("state")).unwrap(), b"state");
        assert_eq!(fs::read_dir(parent.path()).unwrap().count(), 1);
    }

    #[test]
    fn a_sparse_copy_has_the_same_bytes_and_keeps_the_holes() {
        use std::os::unix::fs::MetadataExt;
        let src = tempfile::tempfile().unwrap();
        let len = 64u64 << 20;
        src.set_len(len).unwrap();
        src.write_all_at(b"start", 0).unwrap();
        src.write_all_at(&[7u8; 5000], 33 << 20).unwrap();
        src.write_all_at(b"end", len - 3).unwrap();
        let dst = tempfile::tempfile().unwrap();
        let copied = copy_sparse(&src, &dst).unwrap();
        // Data is copied a filesystem block at a time.
        assert!((5008..1 << 20).contains(&copied), "{copied}");
        assert_eq!(dst.metadata().unwrap().len(), len);
        assert!(dst.metadata().unwrap().blocks() * 512 < 1 << 20);
        let mut head = [0u8; 5];
        dst.read_exact_at(&mut head, 0).unwrap();
        assert_eq!(&head, b"start");
        let mut middle = vec![0u8; 5002];
        dst.read_exact_at(&mut middle, (33 << 20) - 1).unwrap();
        assert_eq!(middle[0], 0);
        assert!(middle[1..5001].iter().all(|&b| b == 7));
        let mut tail = [0u8; 3];
        dst.read_exact_at(&mut tail, len - 3).unwrap();
        assert_eq!(&tail, b"end");
    }
}
