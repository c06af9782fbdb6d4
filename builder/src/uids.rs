//! Kiln's unprivileged ids: a range of uids (and gids, the same numbers),
//! `$KILN_JAIL_UIDS`, leased one per confined process for its life (a
//! jailed VM process, kiln-control's jail; a sandboxed e2fsck,
//! [`crate::sandbox`]), so that no two live confined processes ever
//! share one, whichever `$KILN_HOME` or process started them.
//!
//! A lease is an exclusive flock(2) on the id's file in a host-wide
//! directory ([`LEASES_DIR`]): held by an open file description, so two
//! leases in one process exclude each other as two processes' do. The
//! leaseholder holds it, and so may the process it execs, which inherits
//! the descriptor ([`UidLease::keep_across_exec`]): the kernel drops the
//! lock when the last of them ends, killed or not, so a crash leaks no id,
//! and a VM process that outlives a killed supervisor (for the moment its
//! parent-death signal takes) keeps its id until it is gone.
use std::fs::{self, File};
use std::io;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use rustix::fs::{FlockOperation, Mode, OFlags};
use rustix::io::FdFlags;

/// Where the leases' files are: host-wide, not under `$KILN_HOME`, since
/// the uids are the host's (two homes on one host must not hand out the
/// same one); on the tmpfs a reboot empties.
pub const LEASES_DIR: &str = "/run/kiln/jail-uids";
/// The variable that names the range, as `FIRST-LAST`.
pub const UIDS_ENV: &str = "KILN_JAIL_UIDS";
/// The range when [`UIDS_ENV`] is unset: above any distribution's system
/// and user ids, and above the subordinate ids `useradd` hands out by
/// default (100000 on).
pub const DEFAULT_UIDS: UidRange = UidRange {
    first: 900_000,
    count: 65_536,
};

/// Why no id could be leased.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// [`UIDS_ENV`] is not a range of unprivileged ids.
    #[error("${UIDS_ENV}={0:?}: expected FIRST-LAST, with 0 < FIRST < LAST")]
    Range(String),
    /// The leases' directory or an id's lock file could not be made or
    /// locked.
    #[error("cannot {what} {path} for a uid lease")]
    Io {
        /// The step, as a verb: `create` (the directory) or `lock`.
        what: &'static str,
        /// The directory or lock file.
        path: PathBuf,
        /// What the system said.
        #[source]
        source: io::Error,
    },
    /// Every id of the range is leased to a live process.
    #[error(
        "every jail uid of {range} is held by a live VM process or sandbox (leases in {}); expected a wider ${UIDS_ENV}",
        dir.display()
    )]
    NoFreeUid {
        /// The range.
        range: UidRange,
        /// Where the leases are.
        dir: PathBuf,
    },
}

/// A range of unprivileged ids.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UidRange {
    /// The first id.
    pub first: u32,
    /// How many ids follow it, itself included.
    pub count: u32,
}

/// An id of a [`UidRange`] held until dropped.
#[derive(Debug)]
pub struct UidLease {
    uid: u32,
    /// Holds the id's flock while open.
    lock: File,
}

impl UidLease {
    /// The leased uid (and gid).
    pub fn uid(&self) -> u32 {
        self.uid
    }

    /// Has the lease's descriptor survive the caller's next exec, so that
    /// the program it runs holds the lease too. Called between fork and
    /// exec: one fcntl(2). The descriptor is read-only, of a file that
    /// holds nothing: nothing to read or write there.
    pub fn keep_across_exec(&self) -> io::Result<()> {
        rustix::io::fcntl_setfd(self.lock.as_fd(), FdFlags::empty())?;
        Ok(())
    }
}

impl UidRange {
    /// The range [`UIDS_ENV`] names, or [`DEFAULT_UIDS`] when it is unset.
    pub fn from_env() -> Result<UidRange, LeaseError> {
        match std::env::var(UIDS_ENV) {
            Ok(text) => UidRange::parse(&text).ok_or(LeaseError::Range(text)),
            Err(_) => Ok(DEFAULT_UIDS),
        }
    }

    /// Leases a free id of the range after the first (the jails' shared
    /// group), its lock file in `dir`. The search starts at an id picked
    /// by a hash of `key` (an instance's id), so an instance gets the
    /// same uid at every boot unless another live process holds it, and
    /// goes on id by id; a range with every id held is an error.
    pub fn lease(&self, dir: &Path, key: &str) -> Result<UidLease, LeaseError> {
        fs::create_dir_all(dir).map_err(io_err("create", dir))?;
        let ids = self.count - 1;
        let start = fnv1a(key) % ids;
        for step in 0..ids {
            let uid = self.first + 1 + (start + step) % ids;
            let path = dir.join(uid.to_string());
            if let Some(lock) = try_lock(&path).map_err(io_err("lock", &path))? {
                return Ok(UidLease { uid, lock });
            }
        }
        Err(LeaseError::NoFreeUid {
            range: *self,
            dir: dir.to_path_buf(),
        })
    }

    /// The group every jail has as its one supplementary group: the
    /// range's first id. A snapshot's files are given to it (mode 640)
    /// when a jailed VM restores from them, so that one jail's snapshot
    /// can be restored under another jail's uid. Nothing else is.
    pub fn shared_group(&self) -> u32 {
        self.first
    }

    /// The range `FIRST-LAST` names, if it is one of ids above root's.
    pub fn parse(text: &str) -> Option<UidRange> {
        let (first, last) = text.split_once('-')?;
        let (first, last): (u32, u32) = (first.parse().ok()?, last.parse().ok()?);
        (first > 0 && last > first && last < u32::MAX).then(|| UidRange {
            first,
            count: last - first + 1,
        })
    }
}

impl std::fmt::Display for UidRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.first, self.first + (self.count - 1))
    }
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> LeaseError + 'a {
    move |source| LeaseError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// FNV-1a, 32 bits: stable across Rust versions, unlike std's hasher.
fn fnv1a(key: &str) -> u32 {
    key.bytes().fold(0x811c_9dc5_u32, |hash, byte| {
        (hash ^ u32::from(byte)).wrapping_mul(0x0100_0193)
    })
}

/// The lock file `path`, made if need be and open read-only (flock
/// needs no more), locked; `None` if another holds it.
fn try_lock(path: &Path) -> io::Result<Option<File>> {
    let flags = OFlags::RDONLY | OFlags::CREATE | OFlags::CLOEXEC;
    let file = File::from(rustix::fs::open(path, flags, Mode::from_raw_mode(0o600))?);
    match rustix::fs::flock(&file, FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(Some(file)),
        Err(rustix::io::Errno::WOULDBLOCK) => Ok(None),
        Err(err) => Err(err.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RANGE: UidRange = UidRange {
        first: 5000,
        count: 4,
    };

    #[test]
    fn an_instance_keeps_its_uid_while_it_is_free() {
        let dir = tempfile::tempdir().unwrap();
        let first = RANGE.lease(dir.path(), "i-0123456789ab").unwrap().uid();
        assert!((5001..5004).contains(&first), "{first}");
        assert_eq!(RANGE.shared_group(), 5000);
        let again = RANGE.lease(dir.path(), "i-0123456789ab").unwrap();
        assert_eq!(again.uid(), first);
        // The VM process inherits it.
        let flags = || rustix::io::fcntl_getfd(again.lock.as_fd()).unwrap();
        assert_eq!(flags(), FdFlags::CLOEXEC);
        again.keep_across_exec().unwrap();
        assert_eq!(flags(), FdFlags::empty());
    }

    #[test]
    fn live_leases_never_share_a_uid_and_a_full_range_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        // One key for all: each lease's preferred id is taken by the last.
        let mut leases: Vec<UidLease> = (0..3)
            .map(|_| RANGE.lease(dir.path(), "i-same").unwrap())
            .collect();
        let mut uids: Vec<u32> = leases.iter().map(UidLease::uid).collect();
        uids.sort_unstable();
        assert_eq!(uids, [5001, 5002, 5003]);
        let err = RANGE.lease(dir.path(), "i-other").unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "every jail uid of 5000-5003 is held by a live VM process or sandbox (leases in {}); \
                 expected a wider $KILN_JAIL_UIDS",
                dir.path().display()
            )
        );
        let freed = leases.remove(1);
        let uid = freed.uid();
        drop(freed);
        assert_eq!(RANGE.lease(dir.path(), "i-other").unwrap().uid(), uid);
    }
}
