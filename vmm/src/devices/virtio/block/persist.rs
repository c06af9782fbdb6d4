//! What a snapshot needs of a virtio-blk device. The device keeps no
//! state of its own beyond its transport's (the queues, saved by
//! `mmio::MmioTransport::save`): a snapshot makes the guest's completed
//! writes durable, since its memory assumes them on disk, and may take a
//! copy of them; a restore opens the disk afresh with `Block::new`.
use std::fs::File;
use std::io;
use std::path::Path;

use super::device::{Block, BlockError};
use crate::durable;

impl Block {
    /// Makes every write the guest has completed durable (before a
    /// snapshot, whose memory assumes them on disk).
    pub fn flush(&mut self) -> Result<(), BlockError> {
        self.disk
            .backend
            .flush()
            .map_err(|source| BlockError::Flush {
                path: self.disk.path.clone(),
                source,
            })
    }

    /// Copies what the guest wrote to this disk (a volume's overlay, or a
    /// writable raw image) to a new file at `path`, holes kept; returns the
    /// bytes of data copied. Flush first.
    pub fn copy_writes_to(&self, path: &Path) -> io::Result<u64> {
        let Some(source) = self.disk.backend.writes_file() else {
            return Err(io::Error::other(
                "the disk is read-only: it holds no writes",
            ));
        };
        let copy = File::create(path)?;
        let copied = durable::copy_sparse(source, &copy)?;
        copy.sync_all()?;
        Ok(copied)
    }
}
