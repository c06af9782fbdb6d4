//! A NIC's part of a snapshot beyond its transport: the MAC. The guest's
//! driver read it at probe time and keeps using it (it never re-reads the
//! configuration space), so a restored NIC must have it; its tap is the
//! restoring VM's own, created afresh. Frames in flight are not saved: a
//! network drops packets, and TCP resends them.
use serde::{Deserialize, Serialize};

use super::device::Net;
use super::tap::{Tap, TapError};
use crate::devices::persist::Persist;

/// What a snapshot keeps of a NIC besides its transport.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct NetDeviceState {
    /// The MAC the guest knows.
    pub mac: [u8; 6],
}

impl Persist for Net {
    type State = NetDeviceState;
    /// The restoring VM's tap; the MAC is the state's.
    type ConstructorArgs = Tap;
    type Error = TapError;

    fn save(&self) -> NetDeviceState {
        NetDeviceState { mac: self.mac }
    }

    fn restore(tap: Tap, state: &NetDeviceState) -> Result<Self, TapError> {
        Net::new(tap, state.mac)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Snapshots written before the NIC had a state of its own keep
    /// reading: the state is the MAC as a bare array.
    #[test]
    fn the_state_is_the_mac_as_snapshots_have_always_stored_it() {
        let state = NetDeviceState {
            mac: [2, 0x6b, 10, 89, 0, 2],
        };
        let json = serde_json::to_string(&state).unwrap();
        assert_eq!(json, "[2,107,10,89,0,2]");
        assert_eq!(
            serde_json::from_str::<NetDeviceState>(&json).unwrap(),
            state
        );
    }
}
