//! What a snapshot does to a virtio-vsock device. Its connections do not
//! survive one, and nothing of the device is saved but its transport (the
//! queues, `mmio::MmioTransport::save`). A restored device starts with
//! none on a fresh listening socket (`Vsock::new`) and owes the driver a
//! TRANSPORT_RESET event, which host connections wait for.
use super::device::Vsock;

/// A restored device's TRANSPORT_RESET (§5.10.6.7), which host
/// connections wait for: a REQUEST the guest answered before handling the
/// event would carry its old CID, and the event's handling would then
/// reset the new connection with the stale ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum TransportReset {
    /// Nothing owed (a fresh device, or the guest has handled it).
    Done,
    /// Owed: sent as soon as the event queue has a buffer.
    Due,
    /// Written to an event buffer, not yet handled. The driver's next
    /// event-queue notification says it was: Linux handles each used
    /// event (resets its sockets, re-reads its CID) before it gives the
    /// buffer back and notifies.
    Delivered,
}

impl Vsock {
    /// Owes the driver a TRANSPORT_RESET event (§5.10.6.7), sent as soon
    /// as the event queue has a buffer: for a device restored from a
    /// snapshot, whose connections are gone and whose CID may differ.
    pub fn schedule_transport_reset(&mut self) {
        self.transport_reset = TransportReset::Due;
    }
}
