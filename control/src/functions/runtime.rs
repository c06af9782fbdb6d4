//! A Runtime API environment seen from the host: the session with one VM
//! (the template while it is made, or a clone) whose guest-init serves a
//! Lambda runtime (`guest_init::function`'s
//! [`SessionRequest`] and [`SessionReply`] lines on vsock port
//! [`FUNCTION_PORT`]).
use std::io;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use guest_init::function::{
    Event, EventResult, FUNCTION_PORT, InitPhase, SessionReply, SessionRequest,
};

use super::invoke_api::Input;
use super::{
    ANSWER_SLACK, FunctionConfig, FunctionError, random_seed, read_line, vsock, write_line,
};

/// The region the functions' ARNs and `AWS_REGION` name: Kiln runs them
/// on this host, and clients must name some region.
pub const REGION: &str = "us-east-1";
/// The account id in the functions' ARNs.
pub const ACCOUNT: &str = "000000000000";

/// A function's ARN, as `Lambda-Runtime-Invoked-Function-Arn` carries it.
pub fn function_arn(name: &str) -> String {
    format!("arn:aws:lambda:{REGION}:{ACCOUNT}:function:{name}")
}

/// The session with one VM's guest-init serving a runtime.
pub struct Session {
    /// The VM's instance id.
    id: String,
    stream: UnixStream,
}

/// A finished init: where the runtime waits, and how long it took.
#[derive(Clone, Copy, Debug)]
pub struct Initialized {
    /// `restore/next` (SnapStart-aware) or `invocation/next`.
    pub phase: InitPhase,
    /// From the runtime's start to that wait, in microseconds.
    pub init_us: u64,
}

impl Session {
    /// Connects to the guest-init of VM `id` through its vsock `socket`,
    /// retried while the VM starts, for at most `within`.
    pub fn connect(id: &str, socket: &Path, within: Duration) -> Result<Self, FunctionError> {
        let id = id.to_string();
        match vsock::connect(socket, FUNCTION_PORT, within) {
            Ok(stream) => Ok(Session { id, stream }),
            Err(source) => Err(FunctionError::Invoke { id, source }),
        }
    }

    fn id(&self) -> &str {
        &self.id
    }

    /// Sends `request` and reads its answer, waiting at most `wait`.
    fn request(
        &mut self,
        request: &SessionRequest,
        wait: Duration,
    ) -> Result<SessionReply, FunctionError> {
        let id = self.id().to_string();
        let invoke_err = |source| FunctionError::Invoke {
            id: id.clone(),
            source,
        };
        self.stream
            .set_read_timeout(Some(wait))
            .map_err(invoke_err)?;
        write_line(&mut self.stream, request).map_err(invoke_err)?;
        let line = read_line(&mut self.stream).map_err(invoke_err)?;
        match serde_json::from_str(&line) {
            Ok(SessionReply::Refused { error }) => Err(FunctionError::Refused { id, error }),
            Ok(reply) => Ok(reply),
            Err(source) => Err(FunctionError::Answer { id, source }),
        }
    }

    /// Waits until the runtime's init is done (at most `timeout` from its
    /// start); its failure is [`FunctionError::InitFailed`].
    pub fn wait_init(
        &mut self,
        name: &str,
        timeout: Duration,
    ) -> Result<Initialized, FunctionError> {
        let request = SessionRequest::WaitInit {
            timeout_ms: millis(timeout),
        };
        match self.request(&request, timeout + ANSWER_SLACK)? {
            SessionReply::InitDone { phase, init_us } => Ok(Initialized { phase, init_us }),
            SessionReply::InitError { message, log } => Err(FunctionError::InitFailed {
                name: name.to_string(),
                message,
                log,
            }),
            other => Err(self.unexpected("wait_init", &other)),
        }
    }

    /// Makes a just-restored clone a machine of its own (fresh randomness,
    /// its own hostname) and lets its runtime's after-restore hooks run.
    pub fn restore(&mut self) -> Result<(), FunctionError> {
        let id = self.id().to_string();
        let seed = random_seed().map_err(|source| FunctionError::Invoke {
            id: id.clone(),
            source,
        })?;
        let request = SessionRequest::Restore {
            seed,
            hostname: Some(id),
        };
        match self.request(&request, ANSWER_SLACK)? {
            SessionReply::Restored => Ok(()),
            other => Err(self.unexpected("restore", &other)),
        }
    }

    /// Hands the runtime one event and waits for its end.
    pub fn invoke(
        &mut self,
        config: &FunctionConfig,
        input: &Input,
    ) -> Result<EventResult, FunctionError> {
        let event = Event {
            request_id: request_id().map_err(|source| FunctionError::Invoke {
                id: self.id().to_string(),
                source,
            })?,
            payload: input.payload.clone(),
            timeout_ms: config.timeout_s * 1000,
            function_arn: function_arn(&config.name),
            trace_id: trace_id(),
            client_context: input.client_context.clone(),
            cognito_identity: None,
        };
        let wait = Duration::from_secs(config.timeout_s) + ANSWER_SLACK;
        match self.request(&SessionRequest::Event(event), wait)? {
            SessionReply::Result(result) => Ok(result),
            other => Err(self.unexpected("event", &other)),
        }
    }

    fn unexpected(&self, request: &'static str, reply: &SessionReply) -> FunctionError {
        FunctionError::Unexpected {
            id: self.id().to_string(),
            request,
            reply: format!("{reply:?}"),
        }
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// A fresh request id: a random UUID (version 4), as Lambda's are.
pub fn request_id() -> io::Result<String> {
    let hex = random_seed()?;
    let mut bytes: Vec<u8> = (0..16)
        .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).expect("hex from random_seed"))
        .collect();
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    Ok(format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    ))
}

/// An X-Ray style trace header (`Root=1-<epoch hex>-<96 bits>;Sampled=0`):
/// Kiln traces nothing, but runtimes expect the header's shape.
fn trace_id() -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let unique = format!("{:024x}", now.as_nanos() & ((1 << 96) - 1));
    format!("Root=1-{:08x}-{unique};Sampled=0", now.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_random_v4_uuids() {
        let (a, b) = (request_id().unwrap(), request_id().unwrap());
        assert_ne!(a, b);
        let parts: Vec<&str> = a.split('-').collect();
        assert_eq!(
            parts.iter().map(|p| p.len()).collect::<Vec<_>>(),
            [8, 4, 4, 4, 12]
        );
        assert!(parts[2].starts_with('4'), "{a}");
        assert!(matches!(&parts[3][..1], "8" | "9" | "a" | "b"), "{a}");
    }

    #[test]
    fn arns_and_trace_ids_have_lambdas_shape() {
        assert_eq!(
            function_arn("echo"),
            "arn:aws:lambda:us-east-1:000000000000:function:echo"
        );
        let trace = trace_id();
        assert!(
            trace.starts_with("Root=1-") && trace.ends_with(";Sampled=0"),
            "{trace}"
        );
        assert_eq!(
            trace.len(),
            "Root=1-".len() + 8 + 1 + 24 + ";Sampled=0".len()
        );
    }
}
