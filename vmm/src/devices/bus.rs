//! Address-range dispatch for port I/O and MMIO exits.
//!
//! A vCPU that exits on an `in`/`out` or an MMIO access asks the matching
//! [`Bus`] to forward it to the device that owns the address. Devices are
//! shared with the event loop, hence `Arc<Mutex<_>>`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device reachable through a [`Bus`]. `offset` is relative to the base
/// address the device was inserted at; `data.len()` is the access width.
pub trait BusDevice: Send {
    /// Fills `data` for a guest read at `offset`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Handles a guest write of `data` at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// A device shared between the bus (vCPU threads) and the event loop.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// Errors from building a [`Bus`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// The new range is empty or wraps past the end of the address space.
    #[error("invalid bus range {base:#x}+{len:#x}")]
    InvalidRange {
        /// The range's first address.
        base: u64,
        /// Its length in bytes.
        len: u64,
    },
    /// The new range overlaps a device already on the bus.
    #[error("bus range {base:#x}+{len:#x} overlaps the device at {other:#x}")]
    Overlap {
        /// The new range's first address.
        base: u64,
        /// Its length in bytes.
        len: u64,
        /// The first address of the device it overlaps.
        other: u64,
    },
}

struct Range {
    len: u64,
    device: SharedDevice,
}

/// Maps non-overlapping address ranges to devices.
#[derive(Default)]
pub struct Bus {
    ranges: BTreeMap<u64, Range>,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Places `device` at `[base, base + len)`.
    pub fn insert(&mut self, device: SharedDevice, base: u64, len: u64) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::InvalidRange { base, len })?;
        let below = self.ranges.range(..end).next_back();
        if let Some((&other, range)) = below
            && other + range.len > base
        {
            return Err(BusError::Overlap { base, len, other });
        }
        self.ranges.insert(base, Range { len, device });
        Ok(())
    }

    /// The device covering `addr` and the offset of `addr` inside it.
    fn find(&self, addr: u64) -> Option<(&SharedDevice, u64)> {
        let (&base, range) = self.ranges.range(..=addr).next_back()?;
        let offset = addr - base;
        (offset < range.len).then_some((&range.device, offset))
    }

    /// Forwards a read; returns false when no device owns `addr` (the caller
    /// then leaves `data` as the guest would see an unclaimed bus: all ones).
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((device, offset)) => {
                lock(device).read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Forwards a write; returns false when no device owns `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((device, offset)) => {
                lock(device).write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// Locks a device, recovering from a poisoned lock: a device's state is a
/// set of registers that stays consistent between accesses, and the panic
/// that poisoned it has already ended the thread that caused it.
fn lock(device: &SharedDevice) -> std::sync::MutexGuard<'_, dyn BusDevice + 'static> {
    device
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Remembers the last write and answers reads with its offset.
    #[derive(Default)]
    struct Probe {
        last_write: Option<(u64, Vec<u8>)>,
    }

    impl BusDevice for Probe {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.last_write = Some((offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatches_by_range_with_relative_offsets() {
        let probe = Arc::new(Mutex::new(Probe::default()));
        let mut bus = Bus::new();
        bus.insert(probe.clone(), 0x3f8, 8).unwrap();

        let mut data = [0u8; 1];
        assert!(bus.read(0x3fd, &mut data));
        assert_eq!(data, [5]);
        assert!(bus.write(0x3f8, &[0x41]));
        assert_eq!(probe.lock().unwrap().last_write, Some((0, vec![0x41])));

        assert!(!bus.read(0x3f7, &mut data));
        assert!(!bus.write(0x400, &[0]));
    }

    #[test]
    fn rejects_overlaps_and_empty_ranges() {
        let mut bus = Bus::new();
        let probe = || Arc::new(Mutex::new(Probe::default()));
        bus.insert(probe(), 0x100, 0x10).unwrap();
        assert_eq!(
            bus.insert(probe(), 0x10f, 1),
            Err(BusError::Overlap {
                base: 0x10f,
                len: 1,
                other: 0x100
            })
        );
        assert_eq!(
            bus.insert(probe(), 0xf8, 0x10),
            Err(BusError::Overlap {
                base: 0xf8,
                len: 0x10,
                other: 0x100
            })
        );
        assert_eq!(
            bus.insert(probe(), 0x0, 0),
            Err(BusError::InvalidRange { base: 0, len: 0 })
        );
        assert_eq!(
            bus.insert(probe(), u64::MAX, 2),
            Err(BusError::InvalidRange {
                base: u64::MAX,
                len: 2
            })
        );
        bus.insert(probe(), 0xf0, 0x10).unwrap();
        bus.insert(probe(), 0x110, 0x10).unwrap();
    }
}
