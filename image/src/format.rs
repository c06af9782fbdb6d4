//! The image file's bytes: encoding and decoding its header, index and
//! layer table (the layout is in the crate's documentation), and the
//! checks a decoded index must pass before a reader trusts it.
use std::ops::Range;
use std::path::Path;

use sha2::{Digest, Sha256};

use crate::{ImageError, MAGIC, VERSION};

/// Bytes of the header, and so where the first frame starts.
pub(crate) const HEADER_SIZE: u64 = 64;
/// Bytes of one index entry.
pub(crate) const INDEX_ENTRY_SIZE: usize = 64;
/// Bytes of one layer table entry: a SHA-256.
pub(crate) const LAYER_ENTRY_SIZE: usize = 32;
/// How much of the index's SHA-256 the header keeps.
const INDEX_CHECKSUM_LEN: usize = 24;
/// The most raw bytes a frame may decompress to: a corrupt header must
/// not make a reader allocate gigabytes.
const FRAME_MAX_LIMIT: u32 = 16 << 20;
/// The most other image files one image may take frames from: more than
/// any chain of parents needs, few enough to keep them all open.
const LAYER_LIMIT: u32 = 256;
/// The layer number of a chunk of zeros, which has no frame.
pub(crate) const ZERO_LAYER: u32 = u32::MAX;

/// Where one chunk's raw bytes are and how to check them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct IndexEntry {
    /// Where the chunk starts in the raw filesystem.
    pub raw_offset: u64,
    /// Its raw length.
    pub raw_len: u32,
    /// 0: this file's frame; k: the frame is in the k-th file of the layer
    /// table; [`ZERO_LAYER`]: all zeros, no frame.
    pub layer: u32,
    /// Where its frame is in that file.
    pub frame_offset: u64,
    /// The frame's length.
    pub frame_len: u32,
    /// Where the chunk starts in its frame's decompressed bytes.
    pub within: u32,
    /// SHA-256 of the chunk's raw bytes.
    pub sha256: [u8; 32],
}

impl IndexEntry {
    /// The chunk's raw bytes, as offsets into the raw filesystem.
    pub fn raw_range(&self) -> Range<u64> {
        self.raw_offset..self.raw_offset + u64::from(self.raw_len)
    }
}

/// The header's fields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Header {
    /// The most raw bytes any frame of this file decompresses to.
    pub frame_max: u32,
    /// Bytes of the raw filesystem.
    pub raw_size: u64,
    /// Index entries.
    pub chunk_count: u32,
    /// Layer table entries.
    pub layer_count: u32,
    /// Where the index starts; the layer table follows it and ends the file.
    pub index_offset: u64,
}

impl Header {
    /// Bytes of the index and the layer table, which end the file.
    pub fn tail_len(&self) -> Option<u64> {
        let index = u64::from(self.chunk_count).checked_mul(INDEX_ENTRY_SIZE as u64)?;
        index.checked_add(u64::from(self.layer_count) * LAYER_ENTRY_SIZE as u64)
    }

    /// The header's bytes, with the checksum of `tail` (the index and the
    /// layer table).
    pub fn encode(&self, tail: &[u8]) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(HEADER_SIZE as usize);
        bytes.extend(MAGIC);
        bytes.extend(VERSION.to_le_bytes());
        bytes.extend(self.frame_max.to_le_bytes());
        bytes.extend(self.raw_size.to_le_bytes());
        bytes.extend(self.chunk_count.to_le_bytes());
        bytes.extend(self.layer_count.to_le_bytes());
        bytes.extend(self.index_offset.to_le_bytes());
        bytes.extend(&Sha256::digest(tail)[..INDEX_CHECKSUM_LEN]);
        bytes
    }

    /// The header of `path`, whose first bytes are `bytes`, checked
    /// against the file's size; and the checksum its tail must have.
    pub fn decode(
        path: &Path,
        bytes: &[u8; HEADER_SIZE as usize],
        file_size: u64,
    ) -> Result<(Header, [u8; INDEX_CHECKSUM_LEN]), ImageError> {
        check_magic(path, bytes)?;
        let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4"));
        let u64_at = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8"));
        let header = Header {
            frame_max: u32_at(12),
            raw_size: u64_at(16),
            chunk_count: u32_at(24),
            layer_count: u32_at(28),
            index_offset: u64_at(32),
        };
        let bad = |what: String| ImageError::Header {
            path: path.into(),
            what,
        };
        if !(1..=FRAME_MAX_LIMIT).contains(&header.frame_max) {
            return Err(bad(format!(
                "frame size {} is not within 1 to {FRAME_MAX_LIMIT}",
                header.frame_max
            )));
        }
        if header.layer_count > LAYER_LIMIT {
            return Err(bad(format!(
                "{} layers, at most {LAYER_LIMIT}",
                header.layer_count
            )));
        }
        let ends = header
            .tail_len()
            .and_then(|tail| header.index_offset.checked_add(tail));
        if header.index_offset < HEADER_SIZE || ends != Some(file_size) {
            return Err(bad(format!(
                "the index ({} entries) and layer table ({}) at {} do not end the file ({file_size} bytes): truncated?",
                header.chunk_count, header.layer_count, header.index_offset
            )));
        }
        let checksum = bytes[40..40 + INDEX_CHECKSUM_LEN].try_into().expect("24");
        Ok((header, checksum))
    }
}

/// Refuses `bytes` (a file's first bytes) unless they start an image of
/// this format version.
pub(crate) fn check_magic(path: &Path, bytes: &[u8]) -> Result<(), ImageError> {
    if bytes.len() < 12 || bytes[..8] != MAGIC {
        return Err(ImageError::BadMagic { path: path.into() });
    }
    let found = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
    if found != VERSION {
        return Err(ImageError::Version {
            path: path.into(),
            found,
        });
    }
    Ok(())
}

/// Whether `tail` (the index and the layer table) is what the header's
/// checksum says.
pub(crate) fn check_tail(
    path: &Path,
    tail: &[u8],
    checksum: &[u8; INDEX_CHECKSUM_LEN],
) -> Result<(), ImageError> {
    if Sha256::digest(tail)[..INDEX_CHECKSUM_LEN] != checksum[..] {
        return Err(ImageError::IndexChecksum { path: path.into() });
    }
    Ok(())
}

/// The index's and the layer table's bytes.
pub(crate) fn encode_tail(index: &[IndexEntry], layers: &[[u8; 32]]) -> Vec<u8> {
    let mut bytes =
        Vec::with_capacity(index.len() * INDEX_ENTRY_SIZE + layers.len() * LAYER_ENTRY_SIZE);
    for e in index {
        bytes.extend(e.raw_offset.to_le_bytes());
        bytes.extend(e.raw_len.to_le_bytes());
        bytes.extend(e.layer.to_le_bytes());
        bytes.extend(e.frame_offset.to_le_bytes());
        bytes.extend(e.frame_len.to_le_bytes());
        bytes.extend(e.within.to_le_bytes());
        bytes.extend(e.sha256);
    }
    for layer in layers {
        bytes.extend(layer);
    }
    bytes
}

/// The index entries and the layer table in `tail`, which is as long as
/// `header` says.
pub(crate) fn decode_tail(header: &Header, tail: &[u8]) -> (Vec<IndexEntry>, Vec<[u8; 32]>) {
    let (index, layers) = tail.split_at(header.chunk_count as usize * INDEX_ENTRY_SIZE);
    let u32_at = |e: &[u8], at: usize| u32::from_le_bytes(e[at..at + 4].try_into().expect("4"));
    let u64_at = |e: &[u8], at: usize| u64::from_le_bytes(e[at..at + 8].try_into().expect("8"));
    let index = index
        .chunks_exact(INDEX_ENTRY_SIZE)
        .map(|e| IndexEntry {
            raw_offset: u64_at(e, 0),
            raw_len: u32_at(e, 8),
            layer: u32_at(e, 12),
            frame_offset: u64_at(e, 16),
            frame_len: u32_at(e, 24),
            within: u32_at(e, 28),
            sha256: e[32..64].try_into().expect("32 bytes"),
        })
        .collect();
    let layers = layers
        .chunks_exact(LAYER_ENTRY_SIZE)
        .map(|l| l.try_into().expect("32 bytes"))
        .collect();
    (index, layers)
}

/// Checks that `index` tiles the raw filesystem in order and that every
/// frame it names lies within its file's data and holds the chunk within
/// the file's largest frame (`data[layer]`: the byte range frames occupy
/// in each file, and its `frame_max`): a reader allocates and reads by
/// these numbers.
pub(crate) fn check_index(
    path: &Path,
    header: &Header,
    index: &[IndexEntry],
    data: &[(Range<u64>, u32)],
) -> Result<(), ImageError> {
    let mut raw_end = 0;
    for (n, e) in index.iter().enumerate() {
        let bad = |what: String| ImageError::Header {
            path: path.into(),
            what: format!("chunk {n}: {what}"),
        };
        if e.raw_offset != raw_end || e.raw_len == 0 {
            return Err(bad(format!(
                "{} bytes at {} do not follow the chunk before (ending at {raw_end})",
                e.raw_len, e.raw_offset
            )));
        }
        raw_end = e.raw_range().end;
        if e.layer == ZERO_LAYER {
            continue;
        }
        let Some((within, frame_max)) = data.get(e.layer as usize) else {
            return Err(bad(format!(
                "layer {} is not in the table ({} layers)",
                e.layer,
                data.len() - 1
            )));
        };
        let frame = e.frame_offset..e.frame_offset.saturating_add(u64::from(e.frame_len));
        let frame_bound = zstd::zstd_safe::compress_bound(*frame_max as usize) as u64;
        if u64::from(e.frame_len) > frame_bound
            || frame.start < within.start
            || frame.end > within.end
            || u64::from(e.within) + u64::from(e.raw_len) > u64::from(*frame_max)
        {
            return Err(bad(format!(
                "the frame ({} bytes at {}, holding it at {}) is not within layer {}'s data (bytes {} to {}, frames of at most {} raw bytes)",
                e.frame_len, e.frame_offset, e.within, e.layer, within.start, within.end, frame_max
            )));
        }
    }
    if raw_end != header.raw_size {
        return Err(ImageError::Header {
            path: path.into(),
            what: format!(
                "the chunks hold {raw_end} bytes, the filesystem {}",
                header.raw_size
            ),
        });
    }
    Ok(())
}

/// The content id of an image with `index` over `raw_size` raw bytes: the
/// SHA-256 of the chunks' places and checksums, which two images share
/// exactly when they hold the same raw bytes cut the same way, wherever
/// their frames are stored.
pub(crate) fn content_id(raw_size: u64, index: &[IndexEntry]) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update(raw_size.to_le_bytes());
    for e in index {
        hasher.update(e.raw_offset.to_le_bytes());
        hasher.update(e.raw_len.to_le_bytes());
        hasher.update(e.sha256);
    }
    hasher.finalize().into()
}
