//! How an error reaches a person: its message and each cause after it, on
//! one line ("cannot install the seccomp filter: ...: Invalid argument").
//!
//! Kiln's errors follow one convention: a message says what failed, and
//! its cause is its `#[source]`, never part of its own text. So a cause is
//! printed once, here, wherever the line goes: the terminal, an instance's
//! record, an API answer, or the control channel's reply.
pub use guest_init::one_line;

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot read base.tar")]
    struct Outer {
        #[source]
        source: std::io::Error,
    }

    #[test]
    fn every_cause_follows_its_message_once() {
        let err = Outer {
            source: std::io::Error::other("not a number"),
        };
        assert_eq!(one_line(&err), "cannot read base.tar: not a number");
        let plain = std::io::Error::other("root cause");
        assert_eq!(one_line(&plain), "root cause");
    }
}
