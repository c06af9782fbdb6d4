//! The one save/restore interface every device with state of its own
//! implements, each in a `persist.rs` beside it (as Firecracker's
//! `snapshot::Persist`): a snapshot keeps [`Persist::State`], and a
//! restore rebuilds the device from it and the host resources it needs
//! afresh ([`Persist::ConstructorArgs`]: eventfds, guest memory, the
//! backend it drives). Which devices a machine has, and that each is
//! saved, is `crate::persist`'s `Devices::save`, whose destructuring names
//! every one.
//!
//! Devices without state of their own implement nothing: a virtio-blk or
//! virtio-vsock device is all in its transport's state (its queues), the
//! i8042 and the guest-init port hold nothing a snapshot needs.
use serde::Serialize;
use serde::de::DeserializeOwned;

/// A device a snapshot saves and a restore rebuilds.
pub trait Persist: Sized {
    /// What a snapshot keeps of the device.
    type State: Serialize + DeserializeOwned;
    /// What rebuilding it needs besides its state.
    type ConstructorArgs;
    /// Why the state cannot be taken back.
    type Error: std::error::Error;

    /// The device's state now (with the vCPUs parked, so the guest changes
    /// nothing meanwhile).
    fn save(&self) -> Self::State;

    /// The device as it was when `state` was saved, on `args`.
    fn restore(args: Self::ConstructorArgs, state: &Self::State) -> Result<Self, Self::Error>;
}
