//! A detached instance's console log, `console.log`, kept to a size.
//!
//! An instance's serial console runs for as long as the instance does, so
//! its log cannot grow without limit: the VMM process copies the VM
//! process's console (a pipe) into a [`RotatingLog`], which renames
//! `console.log` to `console.log.1` (replacing the previous one) when it
//! reaches [`CONSOLE_LOG_LIMIT`] and starts a fresh `console.log`. An
//! instance's console therefore takes at most twice the limit on disk.
//! Readers (`kiln logs -f`, `kiln attach`) follow the log by its path with
//! a [`Follower`], which goes on into the fresh file after a rotation.
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::num::NonZeroU64;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use kiln_vmm::report::one_line;

/// The size at which `console.log` is rotated. A boot with `quiet` logs a
/// few KiB, so this holds thousands of boots or hours of a chatty guest,
/// `kiln logs` prints it in a moment, and the two files an instance keeps
/// (16 MiB) are small next to its root volume.
pub const CONSOLE_LOG_LIMIT: NonZeroU64 = NonZeroU64::new(8 << 20).unwrap();

/// Why the console log could not be kept.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleLogError {
    /// The log could not be opened (or created) for appending.
    #[error("cannot open the console log {path}")]
    Open {
        /// The log, `console.log`.
        path: PathBuf,
        /// What the open said.
        #[source]
        source: io::Error,
    },
    /// The full log could not be renamed, or a fresh one made in its
    /// place, or the carried descriptor pointed at it.
    #[error("cannot rotate the console log {path} to {rotated}")]
    Rotate {
        /// The log, `console.log`.
        path: PathBuf,
        /// What it was being renamed to, `console.log.1`.
        rotated: PathBuf,
        /// What the failing call said.
        #[source]
        source: io::Error,
    },
    /// Console output could not be appended (a full disk, most likely).
    #[error("cannot write the console log {path}")]
    Write {
        /// The log, `console.log`.
        path: PathBuf,
        /// What the write said.
        #[source]
        source: io::Error,
    },
}

/// `console.log`, appended to and rotated at a size limit.
#[derive(Debug)]
pub struct RotatingLog {
    path: PathBuf,
    rotated: PathBuf,
    limit: NonZeroU64,
    file: File,
    /// Bytes in `file`: what it had when opened, plus what we wrote.
    size: u64,
    /// A descriptor pointed at each fresh file (see [`RotatingLog::carry`]).
    carried: Option<BorrowedFd<'static>>,
}

impl RotatingLog {
    /// The log at `path`, appended to; rotated to `rotated` at `limit`.
    pub fn open(path: &Path, rotated: &Path, limit: NonZeroU64) -> Result<Self, ConsoleLogError> {
        let (file, size) = open_append(path).map_err(|source| ConsoleLogError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(RotatingLog {
            path: path.to_path_buf(),
            rotated: rotated.to_path_buf(),
            limit,
            file,
            size,
            carried: None,
        })
    }

    /// Points `fd` at each fresh file from now on, if it is this log now;
    /// returns whether it is. The VMM process's own stderr is `console.log`
    /// (opened by whoever started it): carried, its messages stay in the
    /// live log instead of following the old file to `console.log.1`.
    /// They are not counted towards the limit; there are few of them.
    pub fn carry(&mut self, fd: BorrowedFd<'static>) -> io::Result<bool> {
        let target = File::from(fd.try_clone_to_owned()?).metadata()?;
        let ours = self.file.metadata()?;
        let same = (target.dev(), target.ino()) == (ours.dev(), ours.ino());
        if same {
            self.carried = Some(fd);
        }
        Ok(same)
    }

    /// Appends `bytes`, rotating whenever the file reaches the limit, so
    /// no file ever exceeds it.
    pub fn write_all(&mut self, mut bytes: &[u8]) -> Result<(), ConsoleLogError> {
        while !bytes.is_empty() {
            if self.size >= self.limit.get() {
                self.rotate()?;
            }
            let room = self.limit.get() - self.size;
            let (now, rest) = bytes.split_at(bytes.len().min(room as usize));
            self.file
                .write_all(now)
                .map_err(|source| ConsoleLogError::Write {
                    path: self.path.clone(),
                    source,
                })?;
            self.size += now.len() as u64;
            bytes = rest;
        }
        Ok(())
    }

    /// console.log becomes console.log.1 (the rename replaces the old one
    /// whole), and a fresh console.log takes the writes.
    fn rotate(&mut self) -> Result<(), ConsoleLogError> {
        let failed = |source| ConsoleLogError::Rotate {
            path: self.path.clone(),
            rotated: self.rotated.clone(),
            source,
        };
        fs::rename(&self.path, &self.rotated).map_err(failed)?;
        let (file, size) = open_append(&self.path).map_err(failed)?;
        if let Some(fd) = self.carried {
            // SAFETY: dup2 takes two descriptor numbers and no pointers:
            // `file` is open, and `fd` is borrowed for 'static, so it is
            // open for the rest of the process and replacing what it
            // refers to closes nothing anyone else owns.
            if unsafe { libc::dup2(file.as_raw_fd(), fd.as_raw_fd()) } < 0 {
                return Err(failed(io::Error::last_os_error()));
            }
        }
        self.file = file;
        self.size = size;
        Ok(())
    }
}

/// `path` for appending, made private (0600) if new: the guest's console
/// may print secrets, and a rotation must not depend on the umask to keep
/// the fresh file as private as the first.
fn open_append(path: &Path) -> io::Result<(File, u64)> {
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)?;
    let size = file.metadata()?.len();
    Ok((file, size))
}

/// Copies `console` (the VM process's output, a pipe) into `log` until it
/// ends. If the log cannot be written (a full disk), that is logged once
/// and the rest is read and dropped: the guest's console must never stall
/// on its log.
pub fn copy_into(mut console: impl Read, log: &mut RotatingLog) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut failed = false;
    loop {
        let n = match console.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => n,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(err) => {
                log::error!("cannot read the VM's console: {}", one_line(&err));
                return;
            }
        };
        if failed {
            continue;
        }
        if let Err(err) = log.write_all(&buf[..n]) {
            log::error!("console output is dropped from now on: {}", one_line(&err));
            failed = true;
        }
    }
}

/// Reads `console.log` by its path as it grows: at the end of the file it
/// has, if the path now names another file (the log was rotated), it goes
/// on into that one.
#[derive(Debug)]
pub struct Follower {
    path: PathBuf,
    file: File,
}

impl Follower {
    /// The log at `path`, from its start.
    pub fn open(path: &Path) -> io::Result<Self> {
        Ok(Follower {
            path: path.to_path_buf(),
            file: File::open(path)?,
        })
    }

    /// The log at `path`, from what it writes next.
    pub fn open_at_end(path: &Path) -> io::Result<Self> {
        let mut follower = Follower::open(path)?;
        follower.file.seek(SeekFrom::End(0))?;
        Ok(follower)
    }

    /// Whether the path names a file other than ours. Missing counts as
    /// not yet: the writer renames, then creates the fresh file.
    fn rotated(&self) -> io::Result<bool> {
        let ours = self.file.metadata()?;
        match fs::metadata(&self.path) {
            Ok(now) => Ok((now.dev(), now.ino()) != (ours.dev(), ours.ino())),
            Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(err) => Err(err),
        }
    }
}

impl Read for Follower {
    /// What the log has past what was read; 0 at its end.
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let n = self.file.read(buf)?;
            if n > 0 || !self.rotated()? {
                return Ok(n);
            }
            // Rotated: the writer renamed our file only after its last
            // write to it, so reading it once more gets all of it.
            let n = self.file.read(buf)?;
            if n > 0 {
                return Ok(n);
            }
            self.file = match File::open(&self.path) {
                Ok(file) => file,
                Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(0),
                Err(err) => return Err(err),
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    use super::*;

    fn limit(bytes: u64) -> NonZeroU64 {
        NonZeroU64::new(bytes).unwrap()
    }

    #[test]
    fn the_log_rotates_at_its_limit_keeping_one_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let (path, rotated) = (
            dir.path().join("console.log"),
            dir.path().join("console.log.1"),
        );
        fs::write(&path, b"0123").unwrap();
        let mut log = RotatingLog::open(&path, &rotated, limit(10)).unwrap();
        // Appended to what was there, and split exactly at the limit.
        log.write_all(b"456789abc").unwrap();
        assert_eq!(fs::read(&rotated).unwrap(), b"0123456789");
        assert_eq!(fs::read(&path).unwrap(), b"abc");
        log.write_all(b"defghijklmnopqrstuvwxyz").unwrap();
        // Each rotation replaces console.log.1: only the last one is kept.
        assert_eq!(fs::read(&rotated).unwrap(), b"klmnopqrst");
        assert_eq!(fs::read(&path).unwrap(), b"uvwxyz");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 2);
        let mode = |p: &Path| fs::metadata(p).unwrap().mode() & 0o777;
        assert_eq!(mode(&path), 0o600, "the fresh log is private");
    }

    #[test]
    fn a_log_already_past_its_limit_rotates_at_the_first_write() {
        let dir = tempfile::tempdir().unwrap();
        let (path, rotated) = (
            dir.path().join("console.log"),
            dir.path().join("console.log.1"),
        );
        fs::write(&path, b"an old, long log").unwrap();
        let mut log = RotatingLog::open(&path, &rotated, limit(4)).unwrap();
        log.write_all(b"new").unwrap();
        assert_eq!(fs::read(&rotated).unwrap(), b"an old, long log");
        assert_eq!(fs::read(&path).unwrap(), b"new");
    }

    #[test]
    fn a_carried_descriptor_writes_into_the_fresh_file() {
        let dir = tempfile::tempdir().unwrap();
        let (path, rotated) = (
            dir.path().join("console.log"),
            dir.path().join("console.log.1"),
        );
        let mut log = RotatingLog::open(&path, &rotated, limit(4)).unwrap();
        // Standing in for the VMM process's stderr, open for the whole test.
        let stderr: &'static File = Box::leak(Box::new(open_append(&path).unwrap().0));
        let elsewhere: &'static File =
            Box::leak(Box::new(File::create(dir.path().join("other")).unwrap()));
        assert!(!log.carry(elsewhere.as_fd()).unwrap());
        assert!(log.carry(stderr.as_fd()).unwrap());
        log.write_all(b"abcdef").unwrap();
        (&*stderr).write_all(b"!").unwrap();
        assert_eq!(fs::read(&rotated).unwrap(), b"abcd");
        assert_eq!(fs::read(&path).unwrap(), b"ef!");
    }

    #[test]
    fn copying_goes_on_when_the_log_cannot_be_written() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        // The rotated name is a directory: the rename fails.
        let rotated = dir.path().join("console.log.1");
        fs::create_dir(&rotated).unwrap();
        let mut log = RotatingLog::open(&path, &rotated, limit(4)).unwrap();
        let mut console = &b"0123456789"[..];
        copy_into(&mut console, &mut log);
        assert!(console.is_empty(), "the console was not read to its end");
        assert_eq!(fs::read(&path).unwrap(), b"0123");
    }

    #[test]
    fn a_follower_goes_on_into_the_fresh_file_after_a_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let (path, rotated) = (
            dir.path().join("console.log"),
            dir.path().join("console.log.1"),
        );
        fn read(follower: &mut Follower) -> String {
            let mut text = String::new();
            follower.read_to_string(&mut text).unwrap();
            text
        }
        let mut log = RotatingLog::open(&path, &rotated, limit(16)).unwrap();
        log.write_all(b"boot ").unwrap();
        let mut from_start = Follower::open(&path).unwrap();
        let mut from_end = Follower::open_at_end(&path).unwrap();
        assert_eq!(read(&mut from_start), "boot ");
        assert_eq!(read(&mut from_end), "");
        // Written after the readers reached the end, rotating once: the
        // old file's last bytes, then the fresh file's.
        log.write_all(b"done; login: ").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b": ");
        assert_eq!(read(&mut from_start), "done; login: ");
        assert_eq!(read(&mut from_end), "done; login: ");
        assert_eq!(read(&mut from_start), "");
    }
}
