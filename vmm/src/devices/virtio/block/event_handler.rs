//! virtio-blk in the event loop: the request queue's eventfd, which KVM
//! writes when the driver notifies the queue.
use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

use super::device::Block;

impl MutEventSubscriber for Block {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(err) = ops.add(Events::new(&self.queue_evts[0], EventSet::IN)) {
            log::error!("virtio-blk: cannot watch the request queue: {err}");
        }
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        // The count only says "at least one notification"; the ring says what.
        let _ = self.queue_evts[0].read();
        self.process_queue();
    }
}
