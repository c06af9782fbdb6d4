//! The function invocation protocol: how the host asks guest-init, in
//! function mode, to run the function's handler once.
//!
//! The host reaches guest-init over virtio-vsock: guest-init listens on
//! [`FUNCTION_PORT`] of the guest's CID; the host connects through the
//! VMM's unix socket the way Firecracker's vsock does (`CONNECT <port>\n`,
//! answered `OK <host port>\n`), then writes one [`Invocation`] as a JSON
//! line. guest-init runs the handler with the payload on stdin and answers
//! with one [`Outcome`] JSON line, then closes the stream. A [`Ping`]
//! line instead (`{"ping":true}`) is answered `{"pong":true}` at once: the
//! host uses it to know the function is ready.
//!
//! Function mode is on when the kernel command line has
//! [`FUNCTION_CMDLINE_FLAG`]; the handler is the run configuration's
//! entrypoint (with its env and workdir), run afresh for every invocation.
use serde::{Deserialize, Serialize};

/// The guest vsock port guest-init listens on in function mode.
pub const FUNCTION_PORT: u32 = 5000;

/// The kernel command-line word that turns function mode on.
pub const FUNCTION_CMDLINE_FLAG: &str = "kiln.function=1";

/// Bytes of fresh host randomness each invocation carries (as hex).
pub const SEED_BYTES: usize = 32;

/// One call of the handler.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Invocation {
    /// Written to the handler's stdin, then stdin is closed.
    pub payload: String,
    /// The handler (its whole process group) is killed after this long.
    pub timeout_ms: u64,
    /// [`SEED_BYTES`] of host randomness, hex: guest-init mixes them into
    /// the kernel's random pool and forces a reseed before the handler
    /// runs, so VMs cloned from one snapshot never share random state.
    pub seed: String,
    /// The hostname the guest takes before the handler runs (a clone's
    /// own, not its template's); none keeps the current one.
    #[serde(default)]
    pub hostname: Option<String>,
}

/// What one call of the handler did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcome {
    /// Shell convention: the exit code, or 128 + the signal that killed it.
    pub status: i32,
    /// What the handler wrote on its stdout (invalid UTF-8 replaced), at
    /// most `function_mode::OUTPUT_MAX` bytes of it.
    pub stdout: String,
    /// What it wrote on its stderr, likewise capped, with a line from
    /// guest-init at the end for each stream it cut short.
    pub stderr: String,
    /// The handler ran out of time and was killed.
    pub timed_out: bool,
    /// From the invocation's arrival to the handler's end, in microseconds.
    pub duration_us: u64,
    /// Why guest-init could not run the handler at all (a bad request, a
    /// handler that does not exist), with its causes on one line; `None`
    /// when it ran.
    pub error: Option<String>,
}

/// The readiness probe.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ping {
    /// Always true: the line `{"ping":true}`.
    pub ping: bool,
}

/// The answer to a [`Ping`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pong {
    /// Always true: the line `{"pong":true}`.
    pub pong: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_invocation_is_one_json_object_and_strangers_are_refused() {
        let invocation = Invocation {
            payload: "{\"a\":1}".into(),
            timeout_ms: 3000,
            seed: "00".repeat(SEED_BYTES),
            hostname: Some("i-0123456789abcdef".into()),
        };
        let line = serde_json::to_string(&invocation).unwrap();
        assert!(!line.contains('\n'));
        assert_eq!(
            serde_json::from_str::<Invocation>(&line).unwrap(),
            invocation
        );
        assert!(serde_json::from_str::<Invocation>(r#"{"ping":true}"#).is_err());
        assert!(serde_json::from_str::<Ping>(r#"{"ping":true}"#).is_ok());
    }
}
