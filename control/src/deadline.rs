//! Waiting on a blocking call with a deadline.
//!
//! Some waits in the control plane can only block: reading a pipe until
//! its writer closes it, taking a file lock its holder keeps until it
//! exits. Neither call takes a timeout, so the call runs on a thread of
//! its own and the caller waits for its answer at most that long. A call
//! still blocked then is left to finish (or never) on its thread: it holds
//! nothing of the caller's, and it ends when the process does.
use std::time::Duration;

/// Runs `call` on a thread and returns its answer if it comes within
/// `timeout`, or `None` if it does not.
pub(crate) fn within<T: Send + 'static>(
    timeout: Duration,
    call: impl FnOnce() -> T + Send + 'static,
) -> Option<T> {
    let (answer_tx, answer_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        // The receiver may be gone (timed out): nobody wants the answer.
        let _ = answer_tx.send(call());
    });
    answer_rx.recv_timeout(timeout).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_in_time_is_returned_and_a_late_one_is_not() {
        assert_eq!(within(Duration::from_secs(10), || 7), Some(7));
        let late = within(Duration::from_millis(20), || {
            std::thread::sleep(Duration::from_secs(2));
            7
        });
        assert_eq!(late, None);
    }
}
