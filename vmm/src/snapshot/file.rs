//! The snapshot state file: a small binary header, then the state as JSON.
//!
//! | offset   | bytes | field                                            | constant           |
//! |----------|-------|--------------------------------------------------|--------------------|
//! | 0        | 8     | magic `KILNSNAP`                                 | [`MAGIC`]          |
//! | 8        | 4     | format version, u32 LE                           | [`FORMAT_VERSION`] |
//! | 12       | 4     | length `n` of the writer's Kiln version, u32 LE  |                    |
//! | 16       | n     | the writer's Kiln version, UTF-8                 | [`KILN_VERSION`]   |
//! | 16 + n   | 8     | length `len` of the body, u64 LE                 | [`MAX_BODY_LEN`]   |
//! | 24 + n   | 32    | SHA-256 of the body                              |                    |
//! | 56 + n   | len   | body: the state, serde_json                      |                    |
//!
//! The file ends with the body. A file written by another Kiln version in
//! the same format version is read; its writer's version is returned so
//! that callers can show it. Files are replaced whole (`crate::durable`).
use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};

use crate::durable;

/// The first bytes of every state file.
pub const MAGIC: [u8; 8] = *b"KILNSNAP";

/// The layout above and what its body holds; a reader refuses any other.
/// 2: the VM has no PIT, so its state has none (a VM saved with one
/// would be restored without it, under a guest that may use it).
/// 3: the IOAPIC is the VMM's and there is no 8259 (KVM's split
/// irqchip): a guest saved with KVM's chips, whose routes were in them,
/// would find no interrupt routed.
pub const FORMAT_VERSION: u32 = 3;

/// The Kiln version a state file records as its writer.
pub const KILN_VERSION: &str = env!("CARGO_PKG_VERSION");

/// The largest body written or read, so that a damaged length field cannot
/// make a reader allocate wildly; a VM's state is far smaller.
pub const MAX_BODY_LEN: u64 = 64 << 20;

/// Errors from writing or reading a state file; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotFileError {
    /// Staging, writing or renaming the new file failed.
    #[error("cannot write snapshot state file {}", path.display())]
    Write {
        /// The state file.
        path: PathBuf,
        /// Why the write failed.
        #[source]
        source: io::Error,
    },
    /// Opening or reading the file failed.
    #[error("cannot read snapshot state file {}", path.display())]
    Read {
        /// The state file.
        path: PathBuf,
        /// Why the read failed.
        #[source]
        source: io::Error,
    },
    /// The state has a shape JSON cannot hold (a map with non-string keys).
    #[error("cannot serialize the snapshot state for {}", path.display())]
    Serialize {
        /// The state file that was to be written.
        path: PathBuf,
        /// What serde_json refused.
        #[source]
        source: serde_json::Error,
    },
    /// The file does not start with [`MAGIC`].
    #[error("{} is not a Kiln snapshot state file: it does not start with \"KILNSNAP\"", path.display())]
    NotASnapshot {
        /// The file read.
        path: PathBuf,
    },
    /// The header's format version is not [`FORMAT_VERSION`].
    #[error(
        "{} is in snapshot format version {found}; Kiln {} reads version {expected}",
        path.display(),
        KILN_VERSION
    )]
    UnsupportedVersion {
        /// The state file.
        path: PathBuf,
        /// The version in the file's header.
        found: u32,
        /// The one version this Kiln reads.
        expected: u32,
    },
    /// The file ends before a field its header announces.
    #[error("{} is truncated: it is {found} bytes, its header calls for {expected}", path.display())]
    Truncated {
        /// The state file.
        path: PathBuf,
        /// The length the header's fields need, at least.
        expected: u64,
        /// The file's actual length.
        found: u64,
    },
    /// Bytes follow the body; the header does not describe the whole file.
    #[error("{} has {extra} bytes after the state its header describes", path.display())]
    TrailingBytes {
        /// The state file.
        path: PathBuf,
        /// How many bytes follow the body.
        extra: u64,
    },
    /// A body longer than [`MAX_BODY_LEN`], to write or announced by a header.
    #[error(
        "{}: a state of {len} bytes is more than the {max} bytes a state file may hold",
        path.display()
    )]
    TooLarge {
        /// The state file.
        path: PathBuf,
        /// The body's length.
        len: u64,
        /// [`MAX_BODY_LEN`].
        max: u64,
    },
    /// The body's SHA-256 is not the one in the header.
    #[error("{} is corrupt: its state does not match the SHA-256 in its header", path.display())]
    ChecksumMismatch {
        /// The state file.
        path: PathBuf,
    },
    /// The body passed its checksum but is not the JSON of the expected state.
    #[error("{}: the state does not parse", path.display())]
    Parse {
        /// The state file.
        path: PathBuf,
        /// What serde_json refused.
        #[source]
        source: serde_json::Error,
    },
}

/// A state read back, with the version of Kiln that wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SavedState<T> {
    /// The writer's Kiln version, from the header, shown to people when it
    /// differs from this one.
    pub kiln_version: String,
    /// The state itself.
    pub state: T,
}

/// Writes `state` to `path` as a state file, replacing it whole or not at all.
pub fn write_state<T: Serialize>(path: &Path, state: &T) -> Result<(), SnapshotFileError> {
    let body = serde_json::to_vec(state).map_err(|source| SnapshotFileError::Serialize {
        path: path.to_owned(),
        source,
    })?;
    check_body_len(path, body.len() as u64)?;
    let write_error = |source| SnapshotFileError::Write {
        path: path.to_owned(),
        source,
    };
    let mut staged = durable::stage(path).map_err(write_error)?;
    staged
        .write_all(&encode_header(&body))
        .map_err(write_error)?;
    staged.write_all(&body).map_err(write_error)?;
    durable::persist(staged, path).map_err(write_error)
}

/// Reads the state file at `path`, refusing one that is not a state file,
/// is in another format version, is cut short or longer than its header
/// says, fails its checksum or does not parse as `T`.
pub fn read_state<T: DeserializeOwned>(path: &Path) -> Result<SavedState<T>, SnapshotFileError> {
    let frame = read_frame(path)?;
    if <[u8; 32]>::from(Sha256::digest(&frame.body)) != frame.digest {
        return Err(SnapshotFileError::ChecksumMismatch {
            path: path.to_owned(),
        });
    }
    let state = serde_json::from_slice(&frame.body).map_err(|source| SnapshotFileError::Parse {
        path: path.to_owned(),
        source,
    })?;
    Ok(SavedState {
        kiln_version: frame.kiln_version,
        state,
    })
}

/// Everything before the body, for a body written by this Kiln.
fn encode_header(body: &[u8]) -> Vec<u8> {
    let mut header = Vec::new();
    header.extend(MAGIC);
    header.extend(FORMAT_VERSION.to_le_bytes());
    header.extend((KILN_VERSION.len() as u32).to_le_bytes());
    header.extend(KILN_VERSION.as_bytes());
    header.extend((body.len() as u64).to_le_bytes());
    header.extend(Sha256::digest(body));
    header
}

/// A state file's fields, not yet checked against its checksum.
struct Frame {
    kiln_version: String,
    digest: [u8; 32],
    body: Vec<u8>,
}

fn read_frame(path: &Path) -> Result<Frame, SnapshotFileError> {
    let mut fields = FieldReader::open(path)?;
    if fields.array()? != MAGIC {
        return Err(SnapshotFileError::NotASnapshot {
            path: path.to_owned(),
        });
    }
    let format_version = u32::from_le_bytes(fields.array()?);
    if format_version != FORMAT_VERSION {
        return Err(SnapshotFileError::UnsupportedVersion {
            path: path.to_owned(),
            found: format_version,
            expected: FORMAT_VERSION,
        });
    }
    let kiln_version_len = u32::from_le_bytes(fields.array()?);
    // Only shown to people, so a damaged byte is shown rather than refused.
    let kiln_version =
        String::from_utf8_lossy(&fields.bytes(kiln_version_len.into())?).into_owned();
    let body_len = u64::from_le_bytes(fields.array()?);
    check_body_len(path, body_len)?;
    let digest = fields.array()?;
    let body = fields.bytes(body_len)?;
    fields.expect_end()?;
    Ok(Frame {
        kiln_version,
        digest,
        body,
    })
}

fn check_body_len(path: &Path, len: u64) -> Result<(), SnapshotFileError> {
    if len > MAX_BODY_LEN {
        return Err(SnapshotFileError::TooLarge {
            path: path.to_owned(),
            len,
            max: MAX_BODY_LEN,
        });
    }
    Ok(())
}

/// Reads a file's fields front to back. A field that would run past the end
/// of the file is refused before anything is allocated for it.
struct FieldReader<'a> {
    path: &'a Path,
    file: File,
    offset: u64,
    len: u64,
}

impl<'a> FieldReader<'a> {
    fn open(path: &'a Path) -> Result<Self, SnapshotFileError> {
        let read_error = |source| SnapshotFileError::Read {
            path: path.to_owned(),
            source,
        };
        let file = File::open(path).map_err(read_error)?;
        let len = file.metadata().map_err(read_error)?.len();
        Ok(Self {
            path,
            file,
            offset: 0,
            len,
        })
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], SnapshotFileError> {
        let mut field = [0; N];
        self.fill(&mut field)?;
        Ok(field)
    }

    fn bytes(&mut self, count: u64) -> Result<Vec<u8>, SnapshotFileError> {
        self.check_room(count)?;
        let mut field = vec![0; count as usize];
        self.fill(&mut field)?;
        Ok(field)
    }

    fn fill(&mut self, field: &mut [u8]) -> Result<(), SnapshotFileError> {
        self.check_room(field.len() as u64)?;
        self.file
            .read_exact(field)
            .map_err(|source| SnapshotFileError::Read {
                path: self.path.to_owned(),
                source,
            })?;
        self.offset += field.len() as u64;
        Ok(())
    }

    fn check_room(&self, count: u64) -> Result<(), SnapshotFileError> {
        let end = self.offset.saturating_add(count);
        if end > self.len {
            return Err(SnapshotFileError::Truncated {
                path: self.path.to_owned(),
                expected: end,
                found: self.len,
            });
        }
        Ok(())
    }

    fn expect_end(&self) -> Result<(), SnapshotFileError> {
        match self.len - self.offset {
            0 => Ok(()),
            extra => Err(SnapshotFileError::TrailingBytes {
                path: self.path.to_owned(),
                extra,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[derive(Debug, PartialEq, Serialize, serde::Deserialize)]
    struct Sample {
        vcpus: u8,
        name: String,
    }

    fn sample() -> Sample {
        Sample {
            vcpus: 2,
            name: "web".into(),
        }
    }

    /// A state file built from the table in the module doc, field by field.
    fn frame(format_version: u32, kiln_version: &str, body: &[u8]) -> Vec<u8> {
        let mut file = b"KILNSNAP".to_vec();
        file.extend(format_version.to_le_bytes());
        file.extend((kiln_version.len() as u32).to_le_bytes());
        file.extend(kiln_version.as_bytes());
        file.extend((body.len() as u64).to_le_bytes());
        file.extend(Sha256::digest(body));
        file.extend(body);
        file
    }

    fn sample_frame() -> Vec<u8> {
        frame(
            FORMAT_VERSION,
            KILN_VERSION,
            &serde_json::to_vec(&sample()).unwrap(),
        )
    }

    /// The error from reading `bytes` as a state file, and its message.
    fn refusal(bytes: &[u8]) -> (SnapshotFileError, String) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state");
        std::fs::write(&path, bytes).unwrap();
        let err = read_state::<Sample>(&path).unwrap_err();
        let message = err.to_string();
        assert!(message.contains(&path.display().to_string()), "{message}");
        (err, message)
    }

    #[test]
    fn a_state_round_trips_and_the_file_follows_the_documented_layout() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state");
        write_state(&path, &sample()).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), sample_frame());
        let saved = read_state::<Sample>(&path).unwrap();
        assert_eq!(
            saved,
            SavedState {
                kiln_version: KILN_VERSION.into(),
                state: sample()
            }
        );
    }

    #[test]
    fn writing_replaces_the_file_and_leaves_no_temporary_behind() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state");
        write_state(&path, &sample()).unwrap();
        let other = Sample {
            vcpus: 4,
            name: "db".into(),
        };
        write_state(&path, &other).unwrap();
        assert_eq!(read_state::<Sample>(&path).unwrap().state, other);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn a_state_from_another_kiln_version_is_read_and_says_so() {
        let body = serde_json::to_vec(&sample()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state");
        std::fs::write(&path, frame(FORMAT_VERSION, "0.0.9-old", &body)).unwrap();
        let saved = read_state::<Sample>(&path).unwrap();
        assert_eq!(saved.kiln_version, "0.0.9-old");
        assert_eq!(saved.state, sample());
    }

    #[test]
    fn a_flipped_body_byte_fails_the_checksum() {
        let mut bytes = sample_frame();
        *bytes.last_mut().unwrap() ^= 0x01;
        let (err, message) = refusal(&bytes);
        assert!(matches!(err, SnapshotFileError::ChecksumMismatch { .. }));
        assert!(message.contains("corrupt"), "{message}");
    }

    #[test]
    fn a_cut_file_is_truncated() {
        let bytes = sample_frame();
        let (err, message) = refusal(&bytes[..bytes.len() - 3]);
        let expected = bytes.len() as u64;
        assert!(matches!(
            err,
            SnapshotFileError::Truncated { expected: e, found, .. } if e == expected && found == expected - 3
        ));
        assert!(message.contains("truncated"), "{message}");
        let (err, _) = refusal(&bytes[..20]);
        assert!(matches!(err, SnapshotFileError::Truncated { .. }));
    }

    #[test]
    fn extra_bytes_after_the_body_are_refused() {
        let mut bytes = sample_frame();
        bytes.extend(b"junk");
        let (err, _) = refusal(&bytes);
        assert!(matches!(
            err,
            SnapshotFileError::TrailingBytes { extra: 4, .. }
        ));
    }

    #[test]
    fn a_file_without_the_magic_is_not_a_snapshot() {
        let mut bytes = sample_frame();
        bytes[..8].copy_from_slice(b"KILNIMG\0");
        let (err, message) = refusal(&bytes);
        assert!(matches!(err, SnapshotFileError::NotASnapshot { .. }));
        assert!(
            message.contains("not a Kiln snapshot state file"),
            "{message}"
        );
    }

    #[test]
    fn another_format_version_is_unsupported() {
        let body = serde_json::to_vec(&sample()).unwrap();
        // Version 1: a VM state that still carries a PIT.
        let (err, message) = refusal(&frame(1, KILN_VERSION, &body));
        assert!(matches!(
            err,
            SnapshotFileError::UnsupportedVersion {
                found: 1,
                expected: FORMAT_VERSION,
                ..
            }
        ));
        assert!(message.contains("version 1"), "{message}");
    }

    #[test]
    fn a_body_that_is_not_the_state_does_not_parse() {
        let (err, message) = refusal(&frame(FORMAT_VERSION, KILN_VERSION, b"{\"vcpus\": \"two\""));
        assert!(matches!(err, SnapshotFileError::Parse { .. }));
        assert!(message.contains("does not parse"), "{message}");
    }

    #[test]
    fn a_huge_body_length_is_refused_before_reading_it() {
        let mut bytes = frame(FORMAT_VERSION, KILN_VERSION, b"");
        let len_at = 16 + KILN_VERSION.len();
        bytes[len_at..len_at + 8].copy_from_slice(&u64::MAX.to_le_bytes());
        let (err, _) = refusal(&bytes);
        assert!(matches!(
            err,
            SnapshotFileError::TooLarge {
                len: u64::MAX,
                max: MAX_BODY_LEN,
                ..
            }
        ));
    }

    #[test]
    fn a_state_too_large_to_read_back_is_not_written() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state");
        // Each NUL serializes as the six bytes `\u0000`: a big body, quickly.
        let huge = "\0".repeat(MAX_BODY_LEN as usize / 6 + 1);
        let err = write_state(&path, &huge).unwrap_err();
        assert!(matches!(err, SnapshotFileError::TooLarge { .. }));
        assert!(!path.exists());
    }

    #[test]
    fn a_state_json_cannot_express_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state");
        let tuple_keys = BTreeMap::from([((1, 2), 3)]);
        let err = write_state(&path, &tuple_keys).unwrap_err();
        assert!(matches!(err, SnapshotFileError::Serialize { .. }));
        assert!(err.to_string().contains(&path.display().to_string()));
        assert!(!path.exists());
    }

    #[test]
    fn a_missing_file_cannot_be_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state");
        let err = read_state::<Sample>(&path).unwrap_err();
        assert!(matches!(err, SnapshotFileError::Read { .. }));
        assert!(err.to_string().contains(&path.display().to_string()));
    }
}
