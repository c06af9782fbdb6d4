//! virtio-net in the event loop: the queues' eventfds, which KVM writes
//! when the driver notifies a queue, and the tap's readiness, watched
//! only while a received frame can go somewhere.
use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

use super::device::{Net, TX};
use crate::logger::error_limited;

/// Event-loop token of the tap (the queues' are their indices).
const TAP_TOKEN: u32 = 2;

impl Net {
    /// Watches the tap exactly while received frames can go somewhere.
    fn watch_tap(&mut self, ops: &mut EventOps) {
        let wanted = self.active.is_some() && self.rx_len == 0;
        if wanted == self.tap_watched {
            return;
        }
        let events = Events::with_data_raw(self.tap.fd(), TAP_TOKEN, EventSet::IN);
        let changed = if wanted {
            ops.add(events)
        } else {
            ops.remove(events)
        };
        match changed {
            Ok(()) => self.tap_watched = wanted,
            Err(err) => error_limited!("virtio-net: cannot change the tap's watch: {err}"),
        }
    }
}

impl MutEventSubscriber for Net {
    fn init(&mut self, ops: &mut EventOps) {
        for (token, evt) in self.queue_evts.iter().enumerate() {
            if let Err(err) = ops.add(Events::with_data(evt, token as u32, EventSet::IN)) {
                log::error!("virtio-net: cannot watch queue {token}: {err}");
            }
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        self.apply_offload();
        match events.data() {
            token @ (0 | 1) => {
                // The count only says "at least one notification".
                let _ = self.queue_evts[token as usize].read();
                if token as usize == TX {
                    self.transmit();
                }
                // New receive buffers, or a just-activated device: a
                // waiting frame may fit now.
                self.receive();
            }
            TAP_TOKEN => self.receive(),
            _ => {}
        }
        self.watch_tap(ops);
    }
}
