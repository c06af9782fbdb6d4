//! A boot's working set (REAP, Ustiugov et al., ASPLOS '21, for disks):
//! the chunks of an image that the first VM to boot it with a hydration
//! cache read, in the order it first read them, kept next to the image
//! ([`path`]). Later volumes of the image queue them for their prefetch
//! workers at open, so the cache holds them before the guest asks.
//!
//! ```text
//! offset 0   header (48 bytes, little endian)
//!              0  magic       b"KILNWS\0\0"
//!              8  version     u32 = 1
//!             12  count       u32, chunk numbers that follow
//!             16  content_id  32 bytes, of the image the chunks are of
//! offset 48  count chunk numbers, u32 each, each once, in the order
//!            first read
//! ```
//!
//! The file is written whole or not at all (temp file, fsync, rename:
//! [`crate::durable`]), once, when the first volume ends.
use std::io;
use std::path::{Path, PathBuf};

use crate::durable;

const MAGIC: [u8; 8] = *b"KILNWS\0\0";
const VERSION: u32 = 1;
const HEADER_LEN: usize = 48;

/// What can go wrong with a working-set record. Each names the file.
#[derive(Debug, thiserror::Error)]
pub enum WorkingSetError {
    /// Reading or writing the record failed.
    #[error("cannot read or write the working-set record {path}")]
    Io {
        /// The record.
        path: PathBuf,
        /// What the system said.
        #[source]
        source: io::Error,
    },
    /// The file does not start with the record's magic.
    #[error("{path} is not a working-set record (bad magic)")]
    BadMagic {
        /// The file.
        path: PathBuf,
    },
    /// The record is of a format version this code does not read.
    #[error("{path}: working-set record version {found}, this Kiln reads version {VERSION}")]
    Version {
        /// The record.
        path: PathBuf,
        /// The version its header holds.
        found: u32,
    },
    /// The file's length is not the header's plus 4 bytes per chunk its
    /// count says.
    #[error("{path}: {len} bytes, expected {expected} for the header and its {count} chunks")]
    Length {
        /// The record.
        path: PathBuf,
        /// The file's length.
        len: usize,
        /// The length its count implies.
        expected: u64,
        /// The count in its header.
        count: u32,
    },
    /// The record is of another image (one rebuilt under the same name).
    #[error("{path}: the record is of another image (content id {found})")]
    OtherImage {
        /// The record.
        path: PathBuf,
        /// The content id it holds, hex.
        found: String,
    },
    /// A chunk number is not one of the image's.
    #[error("{path}: chunk {chunk} listed, the image has {chunk_count} chunks")]
    NoSuchChunk {
        /// The record.
        path: PathBuf,
        /// The number listed.
        chunk: u32,
        /// The image's chunks.
        chunk_count: u32,
    },
    /// A chunk number is listed twice.
    #[error("{path}: chunk {chunk} listed twice")]
    Repeated {
        /// The record.
        path: PathBuf,
        /// The number listed twice.
        chunk: u32,
    },
}

/// Where the working set of the image at `image` is kept: beside it, with
/// the extension `boot` (`image.kiln` → `image.boot`).
pub fn path(image: &Path) -> PathBuf {
    image.with_extension("boot")
}

/// The record of `chunks` (each once) of the image whose content id is
/// `content_id`.
fn encode(content_id: &[u8; 32], chunks: &[u32]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(HEADER_LEN + 4 * chunks.len());
    bytes.extend(MAGIC);
    bytes.extend(VERSION.to_le_bytes());
    bytes.extend((chunks.len() as u32).to_le_bytes());
    bytes.extend(content_id);
    for n in chunks {
        bytes.extend(n.to_le_bytes());
    }
    bytes
}

/// The chunks a record at `path` lists, checked against the image whose
/// content id and chunk count are given.
fn decode(
    path: &Path,
    bytes: &[u8],
    content_id: &[u8; 32],
    chunk_count: u32,
) -> Result<Vec<u32>, WorkingSetError> {
    let path = || path.to_path_buf();
    if bytes.len() < HEADER_LEN || bytes[..8] != MAGIC {
        return Err(WorkingSetError::BadMagic { path: path() });
    }
    let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
    let (version, count) = (u32_at(8), u32_at(12));
    if version != VERSION {
        return Err(WorkingSetError::Version {
            path: path(),
            found: version,
        });
    }
    let expected = HEADER_LEN as u64 + 4 * u64::from(count);
    if bytes.len() as u64 != expected {
        return Err(WorkingSetError::Length {
            path: path(),
            len: bytes.len(),
            expected,
            count,
        });
    }
    if bytes[16..HEADER_LEN] != content_id[..] {
        return Err(WorkingSetError::OtherImage {
            path: path(),
            found: kiln_image::hex(&bytes[16..HEADER_LEN]),
        });
    }
    let mut seen = vec![false; chunk_count as usize];
    let mut chunks = Vec::with_capacity(count as usize);
    for at in (HEADER_LEN..bytes.len()).step_by(4) {
        let chunk = u32_at(at);
        let slot = seen
            .get_mut(chunk as usize)
            .ok_or_else(|| WorkingSetError::NoSuchChunk {
                path: path(),
                chunk,
                chunk_count,
            })?;
        if std::mem::replace(slot, true) {
            return Err(WorkingSetError::Repeated {
                path: path(),
                chunk,
            });
        }
        chunks.push(chunk);
    }
    Ok(chunks)
}

/// The chunks the record at `path` lists for the image whose content id
/// and chunk count are given; `None` when there is no record.
pub fn read(
    path: &Path,
    content_id: &[u8; 32],
    chunk_count: u32,
) -> Result<Option<Vec<u32>>, WorkingSetError> {
    match std::fs::read(path) {
        Ok(bytes) => decode(path, &bytes, content_id, chunk_count).map(Some),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(WorkingSetError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Writes the record of `chunks` (each once) at `path`, durably.
pub fn write(path: &Path, content_id: &[u8; 32], chunks: &[u32]) -> Result<(), WorkingSetError> {
    let io_err = |source| WorkingSetError::Io {
        path: path.to_path_buf(),
        source,
    };
    durable::write(path, &encode(content_id, chunks)).map_err(io_err)
}

/// The chunks a volume's reads reached in the image, each once, in the
/// order first read, written as the image's working set when dropped.
#[derive(Debug)]
pub(super) struct Recorder {
    path: PathBuf,
    content_id: [u8; 32],
    seen: Vec<bool>,
    order: Vec<u32>,
}

impl Recorder {
    /// A recorder that will write at `path` the working set of an image of
    /// `chunk_count` chunks whose content id is `content_id`.
    pub(super) fn new(path: PathBuf, content_id: [u8; 32], chunk_count: u32) -> Self {
        Recorder {
            path,
            content_id,
            seen: vec![false; chunk_count as usize],
            order: Vec::new(),
        }
    }

    /// Notes that a read reached the image's chunks `chunks`.
    pub(super) fn record(&mut self, chunks: std::ops::RangeInclusive<u32>) {
        for n in chunks {
            if let Some(seen) = self.seen.get_mut(n as usize)
                && !std::mem::replace(seen, true)
            {
                self.order.push(n);
            }
        }
    }
}

impl Drop for Recorder {
    /// Writes the record, if the volume read anything; a failure is
    /// logged (the next volume records again).
    fn drop(&mut self) {
        if self.order.is_empty() {
            return;
        }
        if let Err(err) = write(&self.path, &self.content_id, &self.order) {
            log::warn!("{}", crate::report::one_line(&err));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: [u8; 32] = [7; 32];

    fn decoded(bytes: &[u8]) -> Result<Vec<u32>, WorkingSetError> {
        decode(Path::new("image.boot"), bytes, &ID, 10)
    }

    #[test]
    fn a_record_round_trips_in_its_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = path(&dir.path().join("image.kiln"));
        assert_eq!(path, dir.path().join("image.boot"));
        assert_eq!(read(&path, &ID, 10).unwrap(), None);
        write(&path, &ID, &[4, 0, 9, 2]).unwrap();
        assert_eq!(read(&path, &ID, 10).unwrap(), Some(vec![4, 0, 9, 2]));
        assert_eq!(decoded(&encode(&ID, &[])).unwrap(), Vec::<u32>::new());
    }

    #[test]
    fn a_recorder_keeps_first_reads_once_and_writes_when_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("image.boot");
        let mut recorder = Recorder::new(path.clone(), ID, 10);
        recorder.record(5..=6);
        recorder.record(0..=0);
        recorder.record(6..=7);
        drop(recorder);
        assert_eq!(read(&path, &ID, 10).unwrap(), Some(vec![5, 6, 0, 7]));
        drop(Recorder::new(dir.path().join("none.boot"), ID, 10));
        assert!(!dir.path().join("none.boot").exists(), "nothing read");
    }

    #[test]
    fn bad_records_are_refused_with_what_is_wrong() {
        let good = encode(&ID, &[1, 2, 3]);
        let with = |mutate: &dyn Fn(&mut Vec<u8>)| {
            let mut bytes = good.clone();
            mutate(&mut bytes);
            let err = decoded(&bytes).unwrap_err();
            (crate::report::one_line(&err), err)
        };
        let (line, err) = with(&|b| b[0] = b'X');
        assert!(matches!(err, WorkingSetError::BadMagic { .. }), "{line}");
        assert!(line.contains("image.boot"), "{line}");
        let (line, err) = with(&|b| b.truncate(20));
        assert!(matches!(err, WorkingSetError::BadMagic { .. }), "{line}");
        let (line, err) = with(&|b| b[8] = 2);
        assert!(
            matches!(err, WorkingSetError::Version { found: 2, .. }),
            "{line}"
        );
        let (line, err) = with(&|b| b.truncate(b.len() - 1));
        assert!(line.contains("59 bytes, expected 60"), "{line}");
        assert!(matches!(err, WorkingSetError::Length { count: 3, .. }));
        let (line, err) = with(&|b| b[16] = 8);
        assert!(matches!(err, WorkingSetError::OtherImage { .. }), "{line}");
        let (line, err) = with(&|b| b[HEADER_LEN + 4] = 10);
        assert!(line.contains("chunk 10 listed, the image has 10"), "{line}");
        assert!(matches!(
            err,
            WorkingSetError::NoSuchChunk { chunk: 10, .. }
        ));
        let (line, err) = with(&|b| b[HEADER_LEN + 4] = 1);
        assert!(line.contains("chunk 1 listed twice"), "{line}");
        assert!(matches!(err, WorkingSetError::Repeated { chunk: 1, .. }));
    }
}
