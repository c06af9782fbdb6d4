//! virtio-vsock in the event loop: the queues' eventfds, which KVM
//! writes when the driver notifies a queue, the listening socket, and
//! each host connection's socket, registered for what it waits for.
use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

use super::connection::{Connection, Verdict};
use super::device::{EVENT, RX, TX, Vsock};
use super::packet::{Header, VIRTIO_VSOCK_OP_RST, VIRTIO_VSOCK_TYPE_STREAM, VSOCK_HOST_CID};
use super::persist::TransportReset;
use crate::logger::error_limited;

/// Event-loop tokens: the queues' indices, the listener, and each host
/// connection's local port (all from
/// [`LOCAL_PORT_FIRST`](super::device::LOCAL_PORT_FIRST) up).
const LISTENER_TOKEN: u32 = 3;
/// Passes over tx, the host sockets and rx per event.
const ROUNDS: usize = 4;

impl Vsock {
    /// Everything the device can do now: guest packets, host sockets,
    /// packets for the guest, then the sockets' registrations.
    pub(super) fn run(&mut self, ops: &mut EventOps) {
        if self.teardown {
            self.teardown = false;
            for (_, connection) in std::mem::take(&mut self.connections) {
                deregister(ops, &connection);
            }
            self.resets.clear();
        }
        let mut used = [false; 3];
        // The transport reset first: REQUESTs wait for it.
        used[EVENT] = self.process_event();
        for _ in 0..ROUNDS {
            used[TX] |= self.process_tx();
            for connection in self.connections.values_mut() {
                connection.host_io();
            }
            self.settle(ops);
            let delivered = self.process_rx();
            used[RX] |= delivered;
            if !delivered {
                break;
            }
        }
        self.settle(ops);
        if used.iter().any(|&u| u)
            && let Some(active) = &self.active
            && let Err(err) = active.interrupt.signal_used_queue()
        {
            error_limited!("virtio-vsock: cannot interrupt the driver: {err}");
        }
    }

    /// Ends the connections that are over and (re)registers the sockets
    /// of the others for what they wait for.
    fn settle(&mut self, ops: &mut EventOps) {
        let cid = self.cid;
        let mut over = Vec::new();
        for (&port, connection) in &mut self.connections {
            match connection.verdict() {
                Verdict::Keep => watch(ops, connection),
                Verdict::Drop => over.push((port, false)),
                Verdict::Reset => over.push((port, true)),
            }
        }
        for (port, reset) in over {
            let Some(connection) = self.connections.remove(&port) else {
                continue;
            };
            deregister(ops, &connection);
            if reset && connection.peer_port != 0 {
                self.resets.push_back(Header {
                    src_cid: VSOCK_HOST_CID,
                    dst_cid: cid,
                    src_port: connection.local_port,
                    dst_port: connection.peer_port,
                    kind: VIRTIO_VSOCK_TYPE_STREAM,
                    op: VIRTIO_VSOCK_OP_RST,
                    ..Header::default()
                });
            }
        }
    }
}

/// Registers, updates or removes `connection`'s socket in the event loop
/// for what it waits for.
fn watch(ops: &mut EventOps, connection: &mut Connection) {
    let wanted = connection.interest();
    if wanted == connection.registered {
        return;
    }
    let events = |set| Events::with_data(&connection.stream, connection.local_port, set);
    let done = match (connection.registered, wanted) {
        (None, Some(set)) => ops.add(events(set)),
        (Some(_), Some(set)) => ops.modify(events(set)),
        (Some(set), None) => ops.remove(events(set)),
        (None, None) => Ok(()),
    };
    match done {
        Ok(()) => connection.registered = wanted,
        Err(err) => error_limited!(
            "virtio-vsock: cannot watch host connection {}: {err}",
            connection.local_port
        ),
    }
}

/// Takes a connection's socket out of the event loop before it closes.
fn deregister(ops: &mut EventOps, connection: &Connection) {
    if let Some(set) = connection.registered {
        let events = Events::with_data(&connection.stream, connection.local_port, set);
        if let Err(err) = ops.remove(events) {
            error_limited!(
                "virtio-vsock: cannot unwatch host connection {}: {err}",
                connection.local_port
            );
        }
    }
}

impl MutEventSubscriber for Vsock {
    fn init(&mut self, ops: &mut EventOps) {
        for (token, evt) in self.queue_evts.iter().enumerate() {
            if let Err(err) = ops.add(Events::with_data(evt, token as u32, EventSet::IN)) {
                log::error!("virtio-vsock: cannot watch queue {token}: {err}");
            }
        }
        let listener = Events::with_data(&self.listener, LISTENER_TOKEN, EventSet::IN);
        if let Err(err) = ops.add(listener) {
            log::error!("virtio-vsock: cannot watch {}: {err}", self.path.display());
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            token @ 0..=2 => {
                // The count only says "at least one notification".
                let _ = self.queue_evts[token as usize].read();
                if token as usize == EVENT && self.transport_reset == TransportReset::Delivered {
                    self.transport_reset = TransportReset::Done;
                }
            }
            LISTENER_TOKEN => self.accept(),
            port => {
                if let Some(connection) = self.connections.get_mut(&port) {
                    connection.on_ready(events.event_set());
                }
            }
        }
        self.run(ops);
    }
}
