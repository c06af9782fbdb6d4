//! The IOAPIC's part of a snapshot: its ID, the selected register and the
//! redirection table. Its routes are KVM's, given again at restore.
use std::io;

use serde::{Deserialize, Serialize};

use super::{IOAPIC_PINS, Ioapic, MsiRouter};
use crate::devices::persist::Persist;

/// The IOAPIC's registers as a snapshot stores them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IoapicState {
    /// IOAPICID.
    pub id: u32,
    /// IOREGSEL.
    pub selected: u8,
    /// Each pin's redirection entry, pin 0 first.
    pub entries: Vec<u64>,
}

/// Why a saved IOAPIC cannot be taken back.
#[derive(Debug, thiserror::Error)]
pub enum IoapicError {
    /// The state has a redirection table of another size.
    #[error("the snapshot's IOAPIC has {found} pins, expected {IOAPIC_PINS}")]
    Pins {
        /// The entries the state holds.
        found: usize,
    },
    /// KVM refused the routes of the saved table.
    #[error("cannot route the restored IOAPIC's pins in KVM")]
    Routes(#[source] io::Error),
}

impl Persist for Ioapic {
    type State = IoapicState;
    /// Where its routes go.
    type ConstructorArgs = Box<dyn MsiRouter>;
    type Error = IoapicError;

    fn save(&self) -> IoapicState {
        IoapicState {
            id: self.id,
            selected: self.selected,
            entries: self.entries.to_vec(),
        }
    }

    /// The chip as saved, its unmasked pins routed in KVM again.
    fn restore(router: Box<dyn MsiRouter>, state: &IoapicState) -> Result<Self, IoapicError> {
        let entries = state
            .entries
            .as_slice()
            .try_into()
            .map_err(|_| IoapicError::Pins {
                found: state.entries.len(),
            })?;
        let mut chip = Self {
            id: state.id,
            selected: state.selected,
            entries,
            router,
            routes: Vec::new(),
        };
        chip.sync_routes().map_err(IoapicError::Routes)?;
        Ok(chip)
    }
}

#[cfg(test)]
mod tests {
    use super::super::{IOREDTBL, IOREGSEL, IOWIN, Recorder};
    use super::*;
    use crate::devices::bus::BusDevice;

    #[test]
    fn a_restored_chip_routes_what_the_saved_one_did() {
        let before = Recorder::default();
        let mut chip = Ioapic::new(1, Box::new(before.clone()));
        chip.write(IOREGSEL, &[IOREDTBL + 10]);
        chip.write(IOWIN, &0x41u32.to_le_bytes());
        let json = serde_json::to_string(&chip.save()).unwrap();

        let after = Recorder::default();
        let state: IoapicState = serde_json::from_str(&json).unwrap();
        let restored = Ioapic::restore(Box::new(after.clone()), &state).unwrap();
        assert_eq!(after.tables().last(), before.tables().last());
        assert_eq!(restored.save(), state);
    }

    #[test]
    fn a_restored_chip_with_every_pin_masked_gives_kvm_nothing() {
        let state = Ioapic::new(1, Box::new(Recorder::default())).save();
        let after = Recorder::default();
        Ioapic::restore(Box::new(after.clone()), &state).unwrap();
        assert!(after.tables().is_empty());
    }

    #[test]
    fn a_table_of_another_size_is_refused() {
        let state = IoapicState {
            id: 0,
            selected: 0,
            entries: vec![0; 16],
        };
        let err = Ioapic::restore(Box::new(Recorder::default()), &state)
            .err()
            .unwrap();
        assert_eq!(
            err.to_string(),
            "the snapshot's IOAPIC has 16 pins, expected 24"
        );
    }
}
